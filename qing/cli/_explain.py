"""``qing explain MODEL IMAGE``: class-token attention of every block and head over one image, in one figure."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qing.cli._common import (
    CLIError,
    HelpFormatter,
    add_common_flags,
    add_device_flags,
    add_model_argument,
    check_new_file,
    load_model,
    resolve_device,
    short_path,
)
from qing.data import build_transforms, load_image
from qing.evaluate import probabilities
from qing.explain import save_attention_figure

EPILOG = """\
examples:
  qing explain runs/pneumonia chest.png                      # writes chest_attention.png
  qing explain hf-hub:me/cxr-pneumonia scan.dcm -o figures/scan.png

The figure shows the input, the attention rollout over all blocks and the last block's mean over
heads, then one overlay per block and head: where the class token read from in the token grid.
Attention is not a causal explanation of the prediction (see the qing.explain documentation).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="attention maps per block and head over one image",
        description="Save the class-token attention of every block and head over an image as one PNG figure.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_model_argument(parser)
    parser.add_argument("image", metavar="IMAGE", type=Path, help="a PNG, JPEG or DICOM file")
    parser.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="PNG to write (default: <IMAGE name>_attention.png)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_device_flags(parser, batch=False, workers=False)
    add_common_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    output = args.output or Path(f"{args.image.name.split('.')[0]}_attention.png")
    check_new_file(output, overwrite=args.overwrite)
    if not args.image.is_file():
        raise CLIError(f"image file not found: {args.image}")
    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device)
    if loaded.model is None:
        raise CLIError(
            f"qing explain needs the PyTorch model: attention maps are not part of the ONNX graph of {args.model}; "
            "give the model folder it was exported from"
        )
    if not loaded.has_attention:
        raise CLIError(f"{args.model} has no attention maps to show; qing explain needs a qing CNN-Transformer")
    transform = build_transforms(loaded.model, train=False)
    image = transform(load_image(args.image, channels=transform.channels)).unsqueeze(0).to(device)
    with torch.no_grad():
        probs = probabilities(loaded.model(image).float().cpu().numpy(), loaded.task)[0]
    save_attention_figure(loaded.model, image[0], output, mean=transform.mean, std=transform.std)
    top = sorted(zip(loaded.labels, probs), key=lambda item: -item[1])[:5]
    print(f"{args.image}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    print(f"attention figure: {short_path(output)}")
    return 0
