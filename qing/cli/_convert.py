"""``qing convert SRC DST``: a CheXNet, original-hybrid or torchxrayvision checkpoint -> a qing model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from qing.cli._common import CLIError, HelpFormatter, add_common_flags, check_new_folder, short_path
from qing.convert import load_checkpoint_file
from qing.hub import save_pretrained
from qing.weights import FORMATS, read_state_dict, summarize_keys

EPILOG = """\
examples:
  qing convert model.pth.tar chexnet-qing                         # CheXNet -> qing_chexnet_densenet121
  qing convert best_model.pth pneumonia-qing                      # the original hybrid script's state_dict
  qing convert best_model.pth pneumonia-qing --label-names PNEUMONIA
  qing convert xrv_all.pt xrv-qing                                # torchxrayvision DenseNet121 state dict
  qing convert ~/.torchxrayvision/models_data/<release>.pt xrv-qing   # a release file (a pickled module)
  qing convert model.pth.tar tr4-backbone --model qing_densenet121_tr4   # CheXNet as a hybrid's backbone

The format is detected from the tensor names. Files are read with torch.load(weights_only=True) or as
safetensors (torchxrayvision's pickled modules through inert stand-ins: no code runs); any other
pickle is refused as unsafe unless you trust it (--trust-pickle or QING_TRUST_PICKLE=1). DST gets
model.safetensors, config.json (architecture, preprocessing, labels, thresholds) and a README.md model
card; every tensor is checked after loading. DST is replaced only if it is empty or a qing model folder.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a CheXNet / original-hybrid / torchxrayvision checkpoint to a qing model folder",
        description="Convert a checkpoint file to a qing safetensors model folder; print what was found and mapped.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", type=Path, help="the checkpoint file")
    parser.add_argument("dst", metavar="DST", type=Path, help="the model folder to write")
    parser.add_argument(
        "--model", metavar="ARCH", help="target qing architecture (default: the format's, see the examples)"
    )
    parser.add_argument("--label-names", nargs="+", metavar="NAME", help="output names instead of the format's")
    parser.add_argument(
        "--trust-pickle", action="store_true", help="allow full unpickling of SRC (runs code: trusted files only)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model folder at DST")
    add_common_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.src.exists():
        raise CLIError(f"checkpoint file not found: {args.src}")
    check_new_folder(args.dst, overwrite=args.overwrite, what="DST")
    trust = True if args.trust_pickle else None
    converted = load_checkpoint_file(args.src, model_name=args.model, label_names=args.label_names, trust_pickle=trust)
    source_keys = list(read_state_dict(converted.source, trust_pickle=trust))
    shared = _shared_prefix(source_keys)
    model = converted.create_model().eval()
    report = model.qing_load_report
    cfg = model.pretrained_cfg
    kwargs = ", ".join(f"{k}={v}" for k, v in converted.model_kwargs.items())

    print(f"detected format: {converted.format} ({FORMATS[converted.format]})")
    rest = summarize_keys([k[len(shared) :] for k in source_keys])
    print(f"read: {len(source_keys)} tensors from {converted.source}: " + (f"{shared}{{{rest}}}" if shared else rest))
    print(f"target: {converted.model_name}" + (f" ({kwargs})" if kwargs else ""))
    print(f"mapped: {len(report.loaded)} tensors loaded and checked: {summarize_keys(report.loaded)}")
    fresh = [k for k in report.filled if not k.endswith("num_batches_tracked")]
    if fresh:
        print(f"initialized (not in the checkpoint): {len(fresh)} tensors: {summarize_keys(fresh)}")
    if report.unused:
        print(f"unused checkpoint tensors: {len(report.unused)}: {summarize_keys(report.unused)}")
    if report.dropped:
        print(f"dropped (class count differs): {', '.join(report.dropped)}")
    labels = [str(n) or "(unused)" for n in cfg.get("label_names") or ()]
    print(f"outputs: {model.num_classes}" + (f" ({', '.join(labels)})" if labels else " (no label names)"))
    meta = model.qing_meta if hasattr(model, "qing_meta") else None
    if meta is not None and meta.thresholds is not None:
        origin = " (from the checkpoint)" if converted.thresholds is not None else ""
        print(f"thresholds: {', '.join(f'{t:.3g}' for t in meta.thresholds)}{origin}")
    mean = ", ".join(f"{v:.4g}" for v in cfg["mean"])
    std = ", ".join(f"{v:.4g}" for v in cfg["std"])
    print(
        f"preprocessing: input {'x'.join(map(str, cfg['input_size']))}, mean ({mean}), std ({std}), "
        f"crop {cfg.get('crop_mode')} {cfg.get('crop_pct')}, {cfg.get('interpolation')}"
    )
    folder = save_pretrained(
        model,
        args.dst,
        description=f"Converted with `qing convert` from {FORMATS[converted.format]} ({Path(converted.source).name}).",
    )
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    print(f"saved: {short_path(folder)} ({files})")
    print(f"next: qing predict {short_path(folder)} IMAGE.png")
    return 0


def _shared_prefix(keys: list[str]) -> str:
    """The dotted prefix every key starts with (e.g. ``module.densenet121.``), or ``""``."""
    parts = [k.split(".")[:-1] for k in keys]
    prefix: list[str] = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return "".join(f"{p}." for p in prefix)
