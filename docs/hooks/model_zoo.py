"""mkdocs hook: the model zoo of ``docs/models.md``, generated from qing's timm registry.

The ``<!-- qing:model-zoo -->`` marker is replaced by

- a table with one row per registered architecture and weight tag (``arch`` for the untagged
  configuration, ``arch.tag`` for each tag; the architecture's default tag is marked): tag, where the
  weights come from, parameter count (counted on the ``meta`` device, so nothing is allocated or
  downloaded), input size, labels (``head: random (backbone only)`` for tags whose weights fill only a
  hybrid's backbone) and license;
- the architectures, each with the first paragraph of its entrypoint's docstring;
- the weights, each with its pretrained config's description, file or Hub id, normalization,
  origin and paper;
- the label sets the rows refer to.

Nothing here is written by hand: a new ``@register_model`` entrypoint or ``default_cfgs`` tag
shows up at the next build, and a tag whose ``label_names`` disagree with ``num_classes`` stops it.
"""

from __future__ import annotations

import inspect
from typing import Any

from mkdocs.exceptions import PluginError

PAGE = "models.md"
MARKER = "<!-- qing:model-zoo -->"


def _anchor(kind: str, name: str) -> str:
    return f"{kind}-" + "".join(c if c.isalnum() else "-" for c in name.lower())


def _has_weights(cfg: Any) -> bool:
    return bool(cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict is not None)


def _backbone_only(cfg: Any) -> bool:
    return _has_weights(cfg) and str(cfg.first_conv or "").startswith("backbone.")


def _source(cfg: Any) -> str:
    if cfg.hf_hub_id:
        return f"Hugging Face Hub `{cfg.hf_hub_id}`"
    if cfg.url and cfg.file:
        return f"<{cfg.url}>, downloaded on first use into the qing weights directory as `{cfg.file}`"
    if cfg.url:
        return f"<{cfg.url}>"
    if cfg.file:
        return f"file `{cfg.file}` (absolute, or relative to the working directory or the qing weights directory)"
    return "an in-memory state dict"


def _weights_cell(full_name: str, cfg: Any) -> str:
    if not _has_weights(cfg):
        return "—"
    kind = "Hub" if cfg.hf_hub_id else "URL" if cfg.url else "file" if cfg.file else "state dict"
    return f"[{kind}](#{_anchor('weights', full_name)})"


def _param_count(arch: str, num_classes: int) -> int:
    import qing

    model = qing.create_model(arch, num_classes=num_classes, device="meta")
    return sum(p.numel() for p in model.parameters())


def _first_paragraph(text: str) -> str:
    return " ".join(text.split("\n\n")[0].split())


def _numbers(values: Any) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def _weights_entry(full_name: str, cfg: Any) -> list[str]:
    lines = [f"### `{full_name}` {{ #{_anchor('weights', full_name)} }}", ""]
    if cfg.description:
        lines += [cfg.description, ""]
    lines += [f"- Weights: {_source(cfg)}"]
    lines += [f"- Preprocessing: mean ({_numbers(cfg.mean)}), std ({_numbers(cfg.std)}), crop mode `{cfg.crop_mode}`"]
    if cfg.origin_url:
        lines += [f"- Origin: <{cfg.origin_url}>"]
    if cfg.paper_name or cfg.paper_ids:
        lines += [f"- Paper: {', '.join(str(p) for p in (cfg.paper_name, cfg.paper_ids) if p)}"]
    return [*lines, f"- License: {cfg.license or 'not stated'}", ""]


def model_zoo_markdown() -> str:
    """The model zoo: the table of every ``qing_*`` architecture and tag, then architectures, weights, labels."""
    from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, model_entrypoint

    import qing
    from qing.weights import CXR14_LABELS

    archs = qing.list_models()
    if not archs:
        raise PluginError("model zoo: qing.list_models() is empty; are the qing_* models registered?")
    rows, architectures, weights = [], [], []
    label_sets: dict[tuple[str, ...], str] = {tuple(CXR14_LABELS): "ChestX-ray14"}
    users: dict[tuple[str, ...], list[str]] = {}
    params: dict[tuple[str, int], int] = {}
    for arch in archs:
        doc = inspect.getdoc(model_entrypoint(arch)) or ""
        architectures.append(f"- `{arch}`: {_first_paragraph(doc) or 'no description'}")
        for full_name, cfg in get_arch_pretrained_cfgs(arch).items():
            labels = tuple(cfg.label_names or ())
            if labels and len(labels) != cfg.num_classes:
                raise PluginError(f"model zoo: {full_name} has {len(labels)} label_names for {cfg.num_classes} classes")
            label_cell = str(cfg.num_classes)
            if _backbone_only(cfg):
                label_cell = "head: random (backbone only)"
            elif labels:
                name = label_sets.setdefault(labels, f"Label set {len(label_sets) + 1}")
                users.setdefault(labels, []).append(f"`{full_name}`")
                label_cell = f"[{name} ({len(labels)})](#{_anchor('labels', name)})"
            key = (arch, cfg.num_classes or 0)
            if key not in params:
                params[key] = _param_count(*key)
            tag = full_name.partition(".")[2]
            default = " (default)" if tag == (get_pretrained_cfg(arch).tag or "") else ""
            cells = [
                f"`{full_name}`",
                (f"`{tag}`" if tag else "—") + default,
                _weights_cell(full_name, cfg),
                f"{params[key] / 1e6:.2f} M",
                "×".join(map(str, cfg.input_size)),
                label_cell,
                cfg.license or "—",
            ]
            rows.append("| " + " | ".join(cells) + " |")
            if _has_weights(cfg):
                weights += _weights_entry(full_name, cfg)
    n_weights = sum(1 for line in weights if line.startswith("### "))
    lines = [
        f"{len(archs)} architectures, {n_weights} sets of weights (generated from the registry of "
        f"qing {qing.__version__}). The tag marked (default) is what the architecture name alone means, "
        "and what `pretrained=True` loads without a tag; Weights `—`: no weights, random initialization.",
        "",
        '<div class="qing-zoo" markdown>',
        "",
        "| Model | Tag | Weights | Params | Input | Labels | License |",
        "|---|---|---|--:|---|---|---|",
        *rows,
        "",
        "</div>",
        "",
        "## Architectures",
        "",
        *architectures,
        "",
        "## Weights",
        "",
        *weights,
        "## Label sets",
        "",
    ]
    for labels, name in label_sets.items():
        if labels in users:
            names = ", ".join(f"`{label}`" if label else "(unused output)" for label in labels)
            lines += [f"### {name} {{ #{_anchor('labels', name)} }}", "", names, ""]
            lines += [f"Used by {', '.join(users[labels])}.", ""]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Fill the marker of ``models.md``; a missing marker is an error, not an empty page."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/{PAGE} lost its {MARKER} marker: the model zoo table has nowhere to go")
    return markdown.replace(MARKER, model_zoo_markdown())
