"""``qing export MODEL OUT.onnx``: an ONNX file checked against PyTorch, with labels and preprocessing inside."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from qing.cli._common import (
    CLIError,
    HelpFormatter,
    add_common_flags,
    add_model_argument,
    check_new_file,
    load_model,
    short_path,
)
from qing.deploy import DEFAULT_OPSET, EXPORTERS, OnnxParityError, export_onnx

EPILOG = """\
examples:
  qing export runs/pneumonia pneumonia.onnx
  qing export hf-hub:me/cxr-pneumonia pneumonia.onnx --check-images scans/
  qing export qing_xrv_densenet121.all xrv.onnx --spatial fixed --opset 18

MODEL is anything qing predict accepts. The graph takes `image` (N, C, H, W) float32 and gives
`logits` (N, num_classes); the batch is dynamic, and so are height and width where the model allows
it (checked at another size). Before the file is written, onnxruntime's logits are compared with
PyTorch's on random inputs, two synthetic chest images and --check-images; a difference above --atol
writes nothing. Labels, task, thresholds and preprocessing (input size, mean, std, interpolation,
crop) are in the file's metadata_props, one JSON value per key: see the Deploy guide.
Run the file with `qing predict OUT.onnx ...` / `qing eval OUT.onnx ...`, or with onnxruntime alone.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX (checked against PyTorch; labels and preprocessing in its metadata)",
        description="Export a model to an ONNX file for onnxruntime and other ONNX runtimes.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_model_argument(parser)
    parser.add_argument("output", metavar="OUT.onnx", type=Path, help="the ONNX file to write")
    check = parser.add_argument_group("parity check")
    check.add_argument(
        "--check-images",
        nargs="+",
        type=Path,
        default=[],
        metavar="PATH",
        help="image files or folders to compare ONNX and PyTorch on (besides random and synthetic inputs)",
    )
    check.add_argument(
        "--atol", type=float, default=1e-4, metavar="X", help="largest accepted |logit difference| (default 1e-4)"
    )
    graph = parser.add_argument_group("graph")
    graph.add_argument(
        "--opset",
        type=int,
        metavar="N",
        help=f"ONNX opset (default {DEFAULT_OPSET['torchscript']}; {DEFAULT_OPSET['dynamo']} with --exporter dynamo)",
    )
    graph.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="torchscript",
        help="torch.onnx exporter: torchscript (tracing, fast) or dynamo (torch.export)",
    )
    graph.add_argument(
        "--spatial",
        choices=("auto", "dynamic", "fixed"),
        default="auto",
        help="height and width: dynamic where the model allows it (auto), required dynamic, or fixed",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT.onnx")
    add_common_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    output: Path = args.output
    if output.suffix.lower() != ".onnx":
        raise CLIError(f"the output file must end in .onnx, got {output}")
    check_new_file(output, overwrite=args.overwrite)
    if args.model.lower().endswith(".onnx"):
        raise CLIError(f"{args.model} is already an ONNX file; give the model folder, Hub repo or checkpoint")
    missing = [str(p) for p in args.check_images if not p.exists()]
    if missing:
        raise CLIError(f"--check-images: not found: {', '.join(missing)}")
    loaded = load_model(args.model, device=torch.device("cpu"))
    assert loaded.model is not None
    try:
        report = export_onnx(
            loaded.model,
            output,
            images=args.check_images,
            opset=args.opset,
            exporter=args.exporter,
            spatial=args.spatial,
            atol=args.atol,
            source=args.model,
            overwrite=args.overwrite,
        )
    except OnnxParityError as err:
        raise CLIError(str(err)) from err
    for path, reason in report.skipped_images:
        print(f"qing: skipped {path} in the parity check: {reason}", file=sys.stderr)
    meta = report.metadata
    size_mib = output.stat().st_size / 2**20
    spatial = (
        f"dynamic (sides that are multiples of {report.spatial_multiple})" if report.spatial == "dynamic" else "fixed"
    )
    channels, height, width = meta["input_size"]
    print(f"{short_path(output)}: {size_mib:.1f} MiB, opset {report.opset} ({report.exporter} exporter)")
    print(f"  input  {meta['input_name']} (N, {channels}, {height}, {width}) float32, batch dynamic, size {spatial}")
    labels = ", ".join(meta["labels"][:6]) + (", ..." if len(meta["labels"]) > 6 else "")
    print(f"  output {meta['output_name']} (N, {len(meta['labels'])}): {meta['task']}, {meta['activation']}; {labels}")
    print(f"  preprocessing: {meta['preprocessing']}")
    checks = ", ".join(f"{name} {value:.2g}" for name, value in report.max_abs_diff.items())
    print(f"  parity with PyTorch, max |logit difference|: {checks} (tolerance {args.atol:g})")
    return 0
