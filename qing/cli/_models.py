"""``qing models [PATTERN]``: the registry as a table: names and tags, size, input, labels, weights, licence."""

from __future__ import annotations

import argparse
import fnmatch
import json
from typing import Any

from timm.models import get_arch_pretrained_cfgs

from qing._factory import create_model, list_models
from qing.cli._common import HelpFormatter, add_common_flags, format_table
from qing.weights import WeightsNotFoundError, hub_cached, locate_weights  # the loader's own lookup

EPILOG = """\
examples:
  qing models                      every architecture and weight tag
  qing models densenet             names containing "densenet"
  qing models 'qing_xrv_*' --pretrained
  qing models --format json

weights column: "-" = random initialization (no weights), "local: PATH" = a file found on this
machine, "cached" = in the Hugging Face cache, "download" = fetched on first use (from the Hub, or
from the URL the tag names, into the qing weights directory), "missing" = not available here, e.g.
offline (qing.create_model(..., pretrained=True) explains where to put them).
labels column: "head: random (backbone only)" = the tag's weights fill the backbone only; the head is
random until fine-tuned. license column: the weights' licence as their source states it.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list architectures and weight tags",
        description="List the registered qing architectures and weight tags.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "pattern", nargs="?", default="*", metavar="PATTERN", help="wildcard or substring of the name (default: all)"
    )
    parser.add_argument("--pretrained", action="store_true", help="only tags with weights")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    add_common_flags(parser)
    parser.set_defaults(func=run)


def weights_status(full_name: str, cfg: Any) -> str:
    """Where the weights of a pretrained cfg are on this machine, using qing's own lookup (no download)."""
    if not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict is not None):
        return "-"
    try:
        kind, location = locate_weights(cfg, variant=full_name.split(".")[0])
    except WeightsNotFoundError:
        return "missing"
    if kind in ("file", "local-dir"):
        return f"local: {location}"
    if kind == "hf-hub":
        return "cached" if hub_cached(cfg, None) else "download"
    return "download" if kind == "url" else kind


def backbone_only(cfg: Any) -> bool:
    """Whether a tag's weights fill only the backbone of a hybrid (its head starts random)."""
    has_weights = bool(cfg.hf_hub_id or cfg.url or cfg.file)
    return has_weights and str(cfg.first_conv or "").startswith("backbone.")


def _param_count(arch: str, num_classes: int) -> int:
    model = create_model(arch, num_classes=num_classes, device="meta")  # no memory, no weights
    return sum(p.numel() for p in model.parameters())


def collect(pattern: str, *, pretrained: bool) -> list[dict[str, Any]]:
    """One row per architecture and tag whose name matches ``pattern`` (a wildcard, else a substring)."""
    wildcard = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    rows, params = [], {}
    for arch in list_models():
        for full_name, cfg in get_arch_pretrained_cfgs(arch).items():
            if not fnmatch.fnmatch(full_name, wildcard):
                continue
            status = weights_status(full_name, cfg)
            if pretrained and status == "-":
                continue
            key = (arch, cfg.num_classes or 0)
            if key not in params:
                params[key] = _param_count(*key)
            head_random = backbone_only(cfg)
            labels = [] if head_random else [str(name) for name in (cfg.label_names or ())]
            rows.append(
                {
                    "name": full_name,
                    "params": params[key],
                    "input_size": list(cfg.input_size),
                    "num_classes": cfg.num_classes,
                    "labels": labels,
                    "head": "random" if head_random else "loaded" if status != "-" else "-",
                    "weights": status,
                    "license": cfg.license if status != "-" else None,
                }
            )
    return rows


def _labels_cell(row: dict[str, Any]) -> str:
    if row["head"] == "random":
        return "head: random (backbone only)"
    labels = [name or "(unused)" for name in row["labels"]]
    if not labels:
        return f"{row['num_classes']} outputs"
    shown = ", ".join(labels[:3]) + (", ..." if len(labels) > 3 else "")
    return f"{len(labels)}: {shown}"


def run(args: argparse.Namespace) -> int:
    rows = collect(args.pattern, pretrained=args.pretrained)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no qing models match {args.pattern!r}; `qing models` lists them all")
        return 0
    table = [
        [
            row["name"],
            f"{row['params'] / 1e6:.2f} M",
            "x".join(map(str, row["input_size"])),
            _labels_cell(row),
            row["weights"],
            row["license"] or "-",
        ]
        for row in rows
    ]
    print(format_table(["name", "params", "input", "labels", "weights", "license"], table, max_width=60))
    return 0
