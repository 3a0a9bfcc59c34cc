"""mkdocs hook: the model zoo table of ``docs/models.md``, generated from qing's timm registry.

The ``<!-- qing:model-zoo -->`` marker is replaced by one row per registered architecture and
weight tag (``arch`` for an architecture without weights, ``arch.tag`` for each weight), with its
parameter count (counted on the ``meta`` device, so nothing is allocated or downloaded), input size,
labels and license, followed by the label sets the rows refer to. Nothing here is written by hand:
a new ``@register_model`` entrypoint or ``default_cfgs`` tag shows up at the next build.
"""

from __future__ import annotations

import inspect
from typing import Any

from mkdocs.exceptions import PluginError

PAGE = "models.md"
MARKER = "<!-- qing:model-zoo -->"


def _weights_source(cfg: Any) -> str:
    if cfg.hf_hub_id:
        return f"`hf-hub:{cfg.hf_hub_id}`"
    if cfg.url:
        return f"[download]({cfg.url})"
    if cfg.file:
        return f"file `{cfg.file}`"
    if cfg.state_dict is not None:
        return "in-memory state dict"
    return "—"


def _param_count(arch: str, num_classes: int) -> int:
    import qing

    model = qing.create_model(arch, num_classes=num_classes, device="meta")
    return sum(p.numel() for p in model.parameters())


def _description(arch: str, cfg: Any) -> str:
    import timm

    if cfg.description:
        return cfg.description
    doc = inspect.getdoc(timm.models.model_entrypoint(arch)) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def _label_set_name(labels: tuple[str, ...], index: int) -> str:
    from qing.models.cnn_transformer import CXR14_LABELS

    return "ChestX-ray14" if tuple(labels) == tuple(CXR14_LABELS) else f"Label set {index}"


def _anchor(name: str) -> str:
    return "labels-" + "".join(c if c.isalnum() else "-" for c in name.lower())


def model_zoo_markdown() -> str:
    """The model zoo section: a table of every ``qing_*`` architecture and tag, then the label sets."""
    from timm.models import get_arch_pretrained_cfgs

    import qing

    rows = []
    label_sets: dict[tuple[str, ...], str] = {}
    descriptions: dict[str, str] = {}
    n_weights = 0
    archs = qing.list_models()
    if not archs:
        raise PluginError("model zoo: qing.list_models() is empty; are the qing_* models registered?")
    for arch in archs:
        for full_name, cfg in get_arch_pretrained_cfgs(arch).items():
            has_weights = bool(cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict is not None)
            n_weights += has_weights
            labels = tuple(cfg.label_names or ())
            if cfg.num_classes and labels and len(labels) != cfg.num_classes:
                raise PluginError(f"model zoo: {full_name} has {len(labels)} label_names for {cfg.num_classes} classes")
            if labels and labels not in label_sets:
                label_sets[labels] = _label_set_name(labels, len(label_sets) + 1)
            name = label_sets.get(labels)
            label_cell = f"[{name} ({len(labels)})](#{_anchor(name)})" if name else str(cfg.num_classes or "—")
            c, h, w = cfg.input_size
            tag = full_name.partition(".")[2]
            descriptions.setdefault(arch, _description(arch, cfg))
            rows.append(
                "| "
                + " | ".join(
                    [
                        f"`{full_name}`",
                        f"`{tag}`" if tag else "—",
                        _weights_source(cfg),
                        f"{_param_count(arch, cfg.num_classes or 0) / 1e6:.2f} M",
                        f"{c}×{h}×{w}",
                        label_cell,
                        cfg.license or "—",
                    ]
                )
                + " |"
            )
    lines = [
        f"{len(archs)} architectures, {n_weights} with pretrained weights (generated from the registry "
        f"of qing {qing.__version__}).",
        "",
        '<div class="qing-zoo" markdown>',
        "",
        "| Model | Tag | Weights | Params | Input | Labels | License |",
        "|---|---|---|--:|---|---|---|",
        *rows,
        "",
        "</div>",
        "",
        "Weights `—`: the architecture is registered without weights (random initialization).",
        "",
        "## Architectures",
        "",
        *(f"- `{arch}`: {text}" for arch, text in descriptions.items()),
        "",
        "## Label sets",
        "",
    ]
    for labels, name in label_sets.items():
        lines += [f"### {name} {{ #{_anchor(name)} }}", "", ", ".join(f"`{label}`" for label in labels), ""]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Fill the marker of ``models.md``; a missing marker is an error, not an empty page."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/{PAGE} lost its {MARKER} marker: the model zoo table has nowhere to go")
    return markdown.replace(MARKER, model_zoo_markdown())
