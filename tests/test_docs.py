"""The documentation is executed and built: code blocks run, the site builds strictly, Chromium renders it.

- Every ```python block of docs/**/*.md and README.md runs, page by page in order, in a fresh
  namespace inside a temporary working directory that holds a generated ``xray.png``. The large
  architectures the docs name are swapped for the tiny ``qing_test_tr1`` (``qing_test_r1`` for the
  residual-head ``*_r*`` ones; set
  ``QING_DOCS_FULL_MODELS=1`` to run them as written); names with a tag keep their model. A block
  opts out only with ``<!-- docs-test: skip <reason> -->`` on the line before it; opted-out blocks
  are reported. Pages that work with the reader's own files get files of the same layout with
  random weights (the weights guide: CheXNet's ``model.pth.tar``, the original script's
  ``best_model.pth``); the Hub guide talks to the loopback Hub of ``tests/hub_server.py``.
- Every ``qing`` command in a ```bash block parses with the real argument parser.
- ``mkdocs build --strict`` runs as a subprocess (once per test session, shared by xdist workers);
  the generated pages are checked against the code: every public module and name in the API
  reference, every registered model in the zoo, every subcommand on the command-line page.
- Debian's Chromium renders Home, Model zoo, the fine-tuning guide and the ``qing`` API page from
  ``file://`` with the theme's JavaScript; the test reads the DOM it dumps.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import qing
from tests.docs_helpers import CodeBlock, MarkdownError, Node, code_blocks, parse_html
from tests.hub_server import hub, hub_server  # noqa: F401 (fixtures of the Hub guide)

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
PAGES = [*sorted(DOCS.rglob("*.md")), REPO_ROOT / "README.md"]
TEST_MODEL = "qing_test_tr1"
TEST_RESIDUAL_MODEL = "qing_test_r1"  # stands in for the residual-head architectures
CHROMIUM = Path(os.environ.get("QING_CHROMIUM", "/usr/bin/chromium"))
#: Pages whose code the reader runs first: they must keep at least one executed block.
MUST_HAVE_CODE = [
    "docs/index.md",
    "docs/quickstart.md",
    "docs/installation.md",
    "docs/models.md",
    "docs/guides/fine-tuning.md",
    "docs/guides/weights.md",
    "docs/guides/hub.md",
    "docs/guides/explainability.md",
    "README.md",
]


def _rel(page: Path) -> str:
    return page.relative_to(REPO_ROOT).as_posix()


def _blocks(page: Path) -> list[CodeBlock]:
    return [b for b in code_blocks(page) if b.lang in {"python", "py"}]


def _with_tiny_models(source: str) -> str:
    """Replace every registered architecture name except the test model (tags keep their name)."""
    if os.environ.get("QING_DOCS_FULL_MODELS") == "1":
        return source
    tiny = {TEST_MODEL, TEST_RESIDUAL_MODEL}
    names = sorted((n for n in qing.list_models() if n not in tiny), key=len, reverse=True)

    def swap(match: re.Match) -> str:
        residual = getattr(qing.create_model(match.group(1), device="meta"), "head_type", "") == "residual"
        return TEST_RESIDUAL_MODEL if residual else TEST_MODEL

    return re.sub(rf"\b({'|'.join(map(re.escape, names))})\b(?![.\w])", swap, source)


def _write_xray(path: Path) -> None:
    """A generated 300 x 256 grayscale 'radiograph': dark film, two lung fields, a spine, noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:256]
    image = np.full((300, 256), 40.0)
    for cx in (80, 176):
        image[((xx - cx) / 55) ** 2 + ((yy - 150) / 110) ** 2 < 1] = 110
    image[:, 122:134] = 200
    image += rng.normal(0, 8, image.shape)
    Image.fromarray(image.clip(0, 255).astype(np.uint8), mode="L").save(path)


def _write_chexnet_checkpoint(path: Path) -> None:
    """A file laid out as arnoweng/CheXNet's ``model.pth.tar`` (random weights): legacy format, old names."""
    import torchvision
    from torch import nn

    torch.manual_seed(0)
    densenet = torchvision.models.densenet121(weights=None)
    densenet.classifier = nn.Sequential(nn.Linear(1024, 14), nn.Sigmoid())
    state_dict = {
        "module.densenet121." + re.sub(r"(denselayer\d+\.)(norm|relu|conv)([12])\.", r"\1\2.\3.", key): value
        for key, value in densenet.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }
    checkpoint = {"epoch": 1, "arch": "densenet121", "state_dict": state_dict}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)


def _write_original_checkpoint(path: Path) -> None:
    """What the original script saved, ``torch.save(model.state_dict(), path)``, for a binary model (random weights)."""
    from tests.reference.original_hybrid import OriginalHybrid

    torch.manual_seed(0)
    torch.save(OriginalHybrid(num_classes=1).state_dict(), path)


#: Files a page works with that the reader brings: ``{page: {file name: writer}}``.
PAGE_FILES = {
    "docs/guides/weights.md": {
        "model.pth.tar": _write_chexnet_checkpoint,
        "best_model.pth": _write_original_checkpoint,
    },
}
#: Pages that talk to a Hugging Face Hub: they run against the loopback Hub.
HUB_PAGES = {"docs/guides/hub.md"}


def run_blocks(blocks: list[CodeBlock], workdir: Path) -> dict:
    """Run ``blocks`` (opted-out ones aside) in order, in one fresh namespace, with ``workdir`` as working directory.

    Code is compiled against the page's own path and line numbers, so a traceback points at the
    Markdown line that failed. The environment variables are restored afterwards.
    """
    namespace: dict = {"__name__": "__main__"}
    previous, environ = Path.cwd(), dict(os.environ)
    os.chdir(workdir)
    try:
        for block in blocks:
            if block.skip_reason:
                continue
            source = "\n" * (block.line - 1) + _with_tiny_models(block.source)
            exec(compile(source, str(block.page), "exec"), namespace)
    finally:
        os.chdir(previous)
        os.environ.clear()
        os.environ.update(environ)  # a page may set variables such as QING_WEIGHTS_DIR
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
    return namespace


# ---- the code blocks --------------------------------------------------------------------------


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=_rel)
def test_page_code_blocks_run(page: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = _blocks(page)
    skipped = [b for b in blocks if b.skip_reason]
    workdir = tmp_path / "work"
    workdir.mkdir()
    _write_xray(workdir / "xray.png")
    for name, write in PAGE_FILES.get(_rel(page), {}).items():
        write(workdir / name)
    if _rel(page) in HUB_PAGES:
        request.getfixturevalue("hub")  # HF_ENDPOINT, HF_TOKEN and the Hub cache point at the loopback Hub
    run_blocks(blocks, workdir)
    if skipped:
        where = ", ".join(f"line {b.line} ({b.skip_reason})" for b in skipped)
        warnings.warn(f"{_rel(page)}: {len(skipped)} Python block(s) opted out of the docs test: {where}", stacklevel=1)


def test_docs_have_code_and_every_opt_out_is_explicit() -> None:
    runnable, opted_out = {}, []
    for page in PAGES:
        blocks = _blocks(page)  # raises MarkdownError on a stray or reason-less marker
        runnable[_rel(page)] = sum(not b.skip_reason for b in blocks)
        opted_out += [f"{_rel(page)}:{b.line}: {b.skip_reason}" for b in blocks if b.skip_reason]
    assert [p for p in MUST_HAVE_CODE if not runnable.get(p)] == []
    print(f"\n{sum(runnable.values())} Python blocks run, {len(opted_out)} opted out", *opted_out, sep="\n  ")


def test_a_renamed_function_breaks_the_docs_test(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n```python\nimport qing\nmodel = qing.create_model('qing_densenet121_tr2')\n```\n\n"
        "```python\nmodel.forward_attentions\n```\n"
    )
    with pytest.raises(AttributeError, match="forward_attentions") as error:
        run_blocks(_blocks(page), tmp_path)
    in_page = [entry.lineno + 1 for entry in error.traceback if str(entry.path) == str(page)]
    assert in_page == [9]  # the traceback points at the Markdown line of the failing call


def test_opt_out_markers_are_parsed_strictly(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: skip needs weights -->\n\n```python\nraise SystemExit\n```\n\n```py\nx = 1\n```\n")
    first, second = code_blocks(page)
    assert (first.skip_reason, first.line) == ("needs weights", 4)
    assert (second.skip_reason, second.source) == (None, "x = 1\n")
    assert run_blocks(_blocks(page), tmp_path)["x"] == 1  # the opted-out block did not run

    cases = {
        "<!-- docs-test: skip -->\n```python\nx = 1\n```\n": "skip marker without a reason",
        "<!-- docs-test: skip slow -->\n```bash\nls\n```\n": "skip marker before a bash block",
        "<!-- docs-test: skip slow -->\nSome text.\n```python\nx = 1\n```\n": "not followed by a code block",
        "<!-- docs-test: skipp slow -->\n```python\nx = 1\n```\n": "unknown docs-test marker",
        "```python\nx = 1\n": "is never closed",
    }
    for text, message in cases.items():
        page.write_text(text)
        with pytest.raises(MarkdownError, match=message):
            code_blocks(page)


def test_tiny_model_swap_keeps_tags_and_the_test_model() -> None:
    source = 'a("qing_densenet121_tr2"), b("qing_densenet121_tr4.chexnet"), c("qing_test_tr1"), d("qing_resnet50_tr2x")'
    source += ', e("qing_densenet121_r2"), f("qing_test_r1")'
    expected = 'a("qing_test_tr1"), b("qing_densenet121_tr4.chexnet"), c("qing_test_tr1"), d("qing_resnet50_tr2x")'
    expected += ', e("qing_test_r1"), f("qing_test_r1")'
    assert _with_tiny_models(source) == expected


SHELL_LANGS = {"bash", "sh", "shell"}
SHELL_OPERATORS = {"&&", "||", "|", ";"}
REDIRECTION = re.compile(r"^\d*(>>?|<)(&\d+)?")


def _shell_words(text: str) -> list[tuple[str, bool]]:
    """``(word, quoted)`` per word of a shell line, comments dropped: a quoted ``";"`` is a word, not an operator."""
    lexer = shlex.shlex(text, posix=False)
    lexer.whitespace_split, lexer.commenters = True, "#"
    return [("".join(shlex.split(raw)), "'" in raw or '"' in raw) for raw in lexer]


def shell_commands(page: Path) -> list[tuple[int, list[str]]]:
    """``(line, argv)`` of every command in the page's shell blocks (continuations joined, comments,
    redirections and ``VAR=value`` prefixes removed, ``&&``/``|``/``;`` lists split)."""
    commands = []
    for block in code_blocks(page):
        if block.lang not in SHELL_LANGS:
            continue
        lines = block.source.splitlines()
        i = 0
        while i < len(lines):
            start, text = i, lines[i]
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i]
            i += 1
            current: list[str] = []
            tokens = iter(_shell_words(text))
            for token, quoted in tokens:
                if token in SHELL_OPERATORS and not quoted:
                    commands.append((block.line + start, current))
                    current = []
                elif match := REDIRECTION.match(token):
                    if match.end() == len(token):
                        next(tokens, None)  # "> file": the target is the next token
                elif current or not re.match(r"^[A-Z_][A-Z0-9_]*=", token):
                    current.append(token)
            commands.append((block.line + start, current))
    return [(line, argv) for line, argv in commands if argv]


def test_documented_qing_commands_parse() -> None:
    """Every ``qing ...`` line of the docs' shell blocks is accepted by the real parser (flags, choices, arity)."""
    from qing.cli import build_parser

    parser = build_parser()
    checked, failures = 0, []
    for page in PAGES:
        for line, argv in shell_commands(page):
            if argv[0] != "qing":
                continue
            checked += 1
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                try:
                    parser.parse_args(argv[1:])
                except SystemExit as exit_:
                    if exit_.code:
                        failures.append(f"{_rel(page)}:{line}: {shlex.join(argv)}: {stderr.getvalue().strip()}")
    assert failures == []
    assert checked >= 20  # the guides and the command-line page hold many


def test_shell_commands_are_split_like_a_shell(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nHF_HUB_OFFLINE=1 qing pull me/x out   # offline\npip install -e . && qing demo\n"
        "qing train --config a.yaml \\\n    --print-config > resolved.yaml 2>&1\n```\n"
        "```python\nqing = 1\n```\n"
    )
    assert shell_commands(page) == [
        (2, ["qing", "pull", "me/x", "out"]),
        (3, ["pip", "install", "-e", "."]),
        (3, ["qing", "demo"]),
        (4, ["qing", "train", "--config", "a.yaml", "--print-config"]),
    ]


# ---- the built site ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built by ``mkdocs build --strict``; built once even when xdist workers share the session."""
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="the docs extra is not installed: pip install -e '.[docs]'")
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this session's directory, common to all workers
    out, log = shared / "docs-site", shared / "docs-site.json"
    with FileLock(str(shared / "docs-site.lock")):
        if not log.is_file():
            env = dict(os.environ, HF_HUB_OFFLINE="1", NO_MKDOCS_2_WARNING="1")
            command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO_ROOT / "mkdocs.yml")]
            result = subprocess.run(
                [*command, "-d", str(out)],
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            log.write_text(json.dumps({"returncode": result.returncode, "output": result.stdout + result.stderr}))
    built = json.loads(log.read_text())
    assert built["returncode"] == 0, f"mkdocs build --strict failed:\n{built['output']}"
    assert "WARNING" not in built["output"], built["output"]
    return out


EXTERNAL_RESOURCE = re.compile(
    r'<(?:script|img|iframe|source|video|audio)\b[^>]*\bsrc="(?:https?:)?//'
    r'|<link\b(?![^>]*\brel="canonical")[^>]*\bhref="(?:https?:)?//'
    r"|url\(\s*['\"]?(?:https?:)?//"
)


def test_site_loads_nothing_from_other_hosts(site: Path) -> None:
    """Scripts, styles, fonts and images all come from the site itself (privacy, offline reading)."""
    offending = []
    for path in sorted(p for p in site.rglob("*") if p.suffix in {".html", ".css"}):
        found = EXTERNAL_RESOURCE.finditer(path.read_text(encoding="utf-8"))
        offending += [f"{path.relative_to(site)}: {match.group(0)}" for match in found]
    assert offending == []


def test_site_publishes_no_build_code(site: Path) -> None:
    """The build hooks (docs/hooks/*.py) run while the site is built; they are not copied into it."""
    assert sorted(p.name for p in (DOCS / "hooks").glob("*.py"))  # the hooks are there to be left out
    assert sorted(str(p.relative_to(site)) for p in site.rglob("*.py")) == []
    assert not (site / "hooks").exists()


def _public_modules() -> list[str]:
    """Public modules of qing, found by importing the package tree (independently of the docs hook)."""
    names = ["qing"]
    for info in pkgutil.walk_packages(qing.__path__, "qing."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def _reference_ids(site: Path) -> dict[str, str]:
    """``{html id: html of its page}`` over the API reference pages."""
    ids = {}
    for page in (site / "reference").rglob("index.html"):
        html = page.read_text(encoding="utf-8")
        ids.update(dict.fromkeys(re.findall(r'\bid="([^"]+)"', html), html))
    return ids


def _reexport_links(html: str) -> dict[str, str]:
    """``{exported name: id it links to}`` from the re-export tables of a reference page."""
    links = {}
    for row in parse_html(html).find_all(lambda n: n.tag == "tr"):
        cells = row.find_all(lambda n: n.tag == "td")
        anchors = cells[1].find_all(lambda n: n.tag == "a") if len(cells) == 2 else []
        if anchors and "#" in anchors[0].attrs.get("href", ""):
            links[cells[0].text()] = anchors[0].attrs["href"].rpartition("#")[2]
    return links


def test_api_reference_documents_every_public_module_and_name(site: Path) -> None:
    ids = _reference_ids(site)
    missing, sphinx_roles = [], []
    for module_name in _public_modules():
        if module_name not in ids:
            missing.append(module_name)
            continue
        page = ids[module_name]
        links = _reexport_links(page)
        for name in getattr(importlib.import_module(module_name), "__all__", []):
            full = f"{module_name}.{name}"
            if full not in ids and links.get(full) not in ids:  # rendered here, or linked to where it is
                missing.append(full)
        sphinx_roles += [f"{module_name}: {role}" for role in re.findall(r":(?:func|class|meth|mod|attr):`?\w*", page)]
    assert missing == []
    # mkdocstrings renders Markdown: a Sphinx role shows up as literal text; use [name][qing.path.name]
    assert sorted(set(sphinx_roles)) == []
    function = parse_html(ids["qing.create_model"]).by_id("qing.create_model").parent.text()
    assert "create_model( model_name: str," in function and "Create a model by name" in function


def _zoo_rows(document: Node) -> dict[str, list[str]]:
    zoo = document.find_all(lambda n: "qing-zoo" in n.classes)
    assert len(zoo) == 1, "the model zoo table (div.qing-zoo) is missing"
    rows = [tr for tr in zoo[0].find_all(lambda n: n.tag == "tr") if tr.find_all(lambda n: n.tag == "td")]
    return {cells[0]: cells for cells in ([td.text() for td in tr.find_all(lambda n: n.tag == "td")] for tr in rows)}


def _expected_zoo() -> set[str]:
    from timm.models import get_arch_pretrained_cfgs

    return {full for arch in qing.list_models() for full in get_arch_pretrained_cfgs(arch)}


def test_model_zoo_lists_the_registry(site: Path) -> None:
    rows = _zoo_rows(parse_html((site / "models" / "index.html").read_text(encoding="utf-8")))
    assert set(rows) == _expected_zoo()
    tiny = qing.create_model(TEST_MODEL)
    cfg = tiny.pretrained_cfg
    assert rows[TEST_MODEL][3] == f"{sum(p.numel() for p in tiny.parameters()) / 1e6:.2f} M"
    assert rows[TEST_MODEL][4] == "×".join(map(str, cfg["input_size"]))
    assert rows[TEST_MODEL][5] == f"ChestX-ray14 ({len(cfg['label_names'])})"
    assert rows[TEST_MODEL][6] == cfg["license"]
    assert rows[TEST_MODEL][1] == "— (default)"  # what the bare name means
    assert rows["qing_densenet121_tr2.chexnet"][1] == "chexnet (default)"
    assert rows["qing_densenet121_tr2.original"][1:3] == ["original", "—"]  # a tag without weights


def test_command_line_page_shows_every_subcommand(site: Path) -> None:
    from qing.cli import build_parser

    page = parse_html((site / "cli" / "index.html").read_text(encoding="utf-8")).text()
    pending = [(build_parser(), "qing")]
    while pending:
        parser, command = pending.pop()
        assert f"usage: {command}" in page
        for action in parser._actions:
            for option in action.option_strings:
                assert option in page, f"{command} {option} is not on the command-line page"
            if isinstance(action, argparse._SubParsersAction):
                pending += [(sub, f"{command} {name}") for name, sub in action.choices.items()]


def _load_hook(name: str):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL_MODULE = '''
class Tool:
    def run(self):
        """Run with :meth:`run`, :func:`~pkgx.helper`, :class:`pkgx.tools.Tool` and :func:`nothing`.

        Example:
            >>> Tool().run()
        """
'''


def test_griffe_extension_turns_sphinx_habits_into_markdown(tmp_path: Path) -> None:
    griffe = pytest.importorskip("griffe", reason="the docs extra is not installed: pip install -e '.[docs]'")
    package = tmp_path / "pkgx"
    package.mkdir()
    (package / "__init__.py").write_text("from pkgx._impl import helper\n\n__all__ = ['helper']\n")
    (package / "_impl.py").write_text("def helper():\n    'Help.'\n")
    (package / "tools.py").write_text(TOOL_MODULE)
    extension = griffe.load_extensions(str(DOCS / "hooks" / "griffe_docstrings.py"))
    tree = griffe.load("pkgx", search_paths=[str(tmp_path)], extensions=extension, resolve_aliases=True)
    docstring = tree["tools.Tool.run"].docstring
    assert docstring.value.splitlines()[0] == (
        "Run with [`run`][pkgx.tools.Tool.run], [`helper`][pkgx.helper], [`pkgx.tools.Tool`][pkgx.tools.Tool] "
        "and `nothing`."
    )
    assert [section.kind.value for section in docstring.parse("google")] == ["text", "examples"]


def test_benchmarks_page_matches_the_results_files(site: Path) -> None:
    page = parse_html((site / "benchmarks" / "index.html").read_text(encoding="utf-8")).text()
    results = REPO_ROOT / "benchmarks" / "results" / "throughput_cpu.json"
    if results.is_file():
        for row in json.loads(results.read_text())["rows"]:
            assert row["model"] in page
    else:
        assert "Not measured yet" in page and "benchmarks/results/throughput_cpu.json is absent" in page


def test_benchmarks_hook_renders_rows_and_rejects_bad_files(tmp_path: Path) -> None:
    hook = _load_hook("benchmarks")
    from mkdocs.exceptions import PluginError

    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    row = dict(model="qing_test_tr1", mode="eager", phase="inference", batch=8, images_per_s=123.456)
    row.update(peak_mem_mib=512.0, ratio_vs_densenet121=4.25)
    data = {"config": {"threads": 2}, "rows": [row], "targets": {"speed": {"min_ratio": 0.97, "met": True}}}
    (results / "throughput_cpu.json").write_text(json.dumps(data))
    text = hook.benchmarks_markdown(tmp_path)
    assert "| model | mode | batch | images_per_s | peak_mem_mib | ratio_vs_densenet121 |" in text
    assert "| qing_test_tr1 | eager | 8 | 123.5 | 512.0 | 4.25 |" in text  # a ratio above 1 keeps its decimals
    assert "### inference" in text and "| threads | 2 |" in text and "| speed | 0.97 | True |" in text
    assert "throughput_cpu.json` is absent" not in text and "throughput_cuda.json` is absent" in text

    (results / "throughput_cpu.json").unlink()
    assert "throughput_cpu.json` is absent" in hook.benchmarks_markdown(tmp_path)
    (results / "broken.json").write_text('{"rows": 3}')
    with pytest.raises(PluginError, match=r"broken\.json: expected"):
        hook.benchmarks_markdown(tmp_path)


# ---- rendered in a browser --------------------------------------------------------------------


def _render(url: str, profile: Path) -> Node:
    """The DOM Chromium holds once the page and its scripts have run."""
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "</html>" in result.stdout, result.stderr[-2000:]
    return parse_html(result.stdout)


def _nav_titles(document: Node) -> list[str]:
    navs = document.find_all(lambda n: n.tag == "nav" and "md-nav--primary" in n.classes)
    assert navs, "no primary navigation in the page"
    return [link.text() for link in navs[0].find_all(lambda n: n.tag in ("a", "label") and "md-nav__link" in n.classes)]


def test_chromium_renders_home_model_zoo_guide_and_api_page(site: Path, tmp_path: Path) -> None:
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)) and not shutil.which(str(CHROMIUM)):
        pytest.skip(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium (or set QING_CHROMIUM)")
    nav_config = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text())["nav"]
    top_titles = [next(iter(item)) for item in nav_config]

    home = _render((site / "index.html").as_uri(), tmp_path / "profile")
    assert "js" in home.find_all(lambda n: n.tag == "html")[0].classes  # the theme's JavaScript ran
    assert home.find_all(lambda n: "md-code__button" in n.classes), "no copy button: scripts did not run"
    titles = _nav_titles(home)
    assert [t for t in top_titles if t not in titles] == []
    assert {"Overview", "qing", "qing.models"} <= set(titles)
    assert home.find_all(lambda n: n.tag == "img" and n.attrs.get("src", "").endswith("assets/architecture.svg"))

    zoo = _render((site / "models" / "index.html").as_uri(), tmp_path / "profile")
    assert set(_zoo_rows(zoo)) == _expected_zoo()
    assert "Model zoo" in _nav_titles(zoo)

    guide = _render((site / "guides" / "fine-tuning" / "index.html").as_uri(), tmp_path / "profile")
    titles = _nav_titles(guide)
    assert {"Guides", "Fine-tuning", "Weights and adapters", "Hub", "Explainability"} <= set(titles)
    headings = {node.attrs.get("id") for node in guide.find_all(lambda n: n.tag == "h2")}
    assert {"thresholds", "reading-the-report", "several-processes-ddp-with-torchrun"} <= headings
    links = {a.attrs.get("href", "") for a in guide.find_all(lambda n: n.tag == "a")}
    assert any(href.endswith("reference/qing.train/#qing.train.config.TrainConfig") for href in links)  # API page

    api = _render((site / "reference" / "qing" / "index.html").as_uri(), tmp_path / "profile")
    heading = api.by_id("qing.create_model")
    assert heading is not None, "qing.create_model is not on the rendered API page"
    signature = heading.parent.text()
    assert "create_model( model_name: str, pretrained: bool = False" in signature
    assert inspect.getdoc(qing.create_model).splitlines()[0].replace("``", "") in signature  # the docstring
    assert "API reference" in _nav_titles(api)
