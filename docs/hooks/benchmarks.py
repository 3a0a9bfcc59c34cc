"""mkdocs hook: the benchmark tables of ``docs/benchmarks.md``, rendered from ``benchmarks/results/*.json``.

Each results file is ``{"config": {...}, "rows": [{...}, ...]}`` as the scripts in ``benchmarks/``
write it, possibly with more top-level entries (e.g. ``"targets"``). The ``<!-- qing:benchmarks -->``
marker is replaced by one section per file: its config, its other entries, and its rows (one table
per ``phase`` when rows carry one). An expected file that is absent gets a
note saying so and how to produce it; a file that is not such JSON stops the build with its path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

PAGE = "benchmarks.md"
MARKER = "<!-- qing:benchmarks -->"
RESULTS = Path("benchmarks") / "results"
#: Files the benchmarks are expected to write, with what writes them.
EXPECTED = {
    "throughput_cpu.json": "the CPU throughput benchmark in `benchmarks/` (training and inference images/s, "
    "peak memory, ratio against DenseNet121 measured in the same run): "
    "`python benchmarks/throughput.py --device cpu`",
    "throughput_cpu_compile.json": "the same benchmark under `torch.compile`: "
    "`python benchmarks/throughput.py --device cpu --modes compile "
    "--out benchmarks/results/throughput_cpu_compile.json`",
    "throughput_cuda.json": "the same benchmark on a CUDA GPU: `python benchmarks/throughput.py --device cuda`",
    "inference_cpu.json": "the CPU inference benchmark (PyTorch fp32 and bf16 + channels_last, onnxruntime fp32 "
    "and int8, `qing predict` end to end, int8 test AUROC): `python benchmarks/inference.py --trained RUN_DIR`",
}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 10 else f"{value:,.1f}"  # ratios keep 3 decimals: 1.033, 0.965
    if value is None:
        return "—"
    if isinstance(value, (list, tuple, dict)):
        return f"`{json.dumps(value)}`"
    return str(value).replace("|", "\\|")


def _table(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def load_results(path: Path) -> dict[str, Any]:
    """Read one results file; anything but ``{"config": dict, "rows": list of dicts}`` is an error."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PluginError(f"benchmark results {path}: not readable JSON ({error})") from error
    if not (
        isinstance(data, dict)
        and isinstance(data.get("config", {}), dict)
        and isinstance(data.get("rows"), list)
        and all(isinstance(row, dict) for row in data["rows"])
    ):
        raise PluginError(f'benchmark results {path}: expected {{"config": {{...}}, "rows": [{{...}}, ...]}}')
    return data


def results_section(path: Path) -> str:
    """Markdown for one results file: a heading, its config and its rows."""
    data = load_results(path)
    text = f"## `{path.name}`\n\n"
    config = data.get("config", {})
    if config:
        text += "| Setting | Value |\n|---|---|\n" + "".join(f"| {k} | {_cell(v)} |\n" for k, v in config.items())
        text += "\n"
    for key, value in data.items():
        if key in ("config", "rows"):
            continue
        text += f"**{key}**\n\n"
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            text += _table([{"": name, **fields} for name, fields in value.items()]) + "\n"
        else:
            text += f"```json\n{json.dumps(value, indent=2)}\n```\n\n"
    rows = data["rows"]
    if not rows:
        return text + f'!!! note "No rows"\n    `{RESULTS / path.name}` holds no measurements.\n'
    phases = list(dict.fromkeys(row.get("phase") for row in rows))
    if phases == [None]:
        return text + _table(rows)
    for phase in phases:
        text += f"### {phase if phase is not None else 'other'}\n\n"
        text += _table([{k: v for k, v in row.items() if k != "phase"} for row in rows if row.get("phase") == phase])
        text += "\n"
    return text


def benchmarks_markdown(root: Path) -> str:
    """All sections: the expected files (or a note for each one absent), then any other results file."""
    results = root / RESULTS
    present = sorted(results.glob("*.json")) if results.is_dir() else []
    sections = []
    for name, writer in EXPECTED.items():
        if (results / name).is_file():
            sections.append(results_section(results / name))
        else:
            sections.append(
                f"## `{name}`\n\n"
                f'!!! note "Not measured yet"\n'
                f"    `{RESULTS / name}` is absent, so this build has no numbers for it. "
                f"It is written by {writer}; run it and rebuild the docs.\n"
            )
    sections += [results_section(path) for path in present if path.name not in EXPECTED]
    return "\n".join(sections)


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    """Fill the marker of ``benchmarks.md``; a missing marker is an error, not an empty page."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/{PAGE} lost its {MARKER} marker: the benchmark tables have nowhere to go")
    return markdown.replace(MARKER, benchmarks_markdown(Path(config["config_file_path"]).parent))
