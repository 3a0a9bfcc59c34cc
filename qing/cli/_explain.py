"""``qing explain MODEL IMAGE``: Grad-CAM for chosen labels, or the class-token attention of every block and head,
over one image in one figure."""

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
from qing.explain import save_attention_figure, save_gradcam_figure

EPILOG = """\
examples:
  qing explain runs/pneumonia chest.png                      # writes chest_attention.png
  qing explain hf-hub:me/cxr-pneumonia scan.dcm -o figures/scan.png
  qing explain runs/nih chest.png --method gradcam --label Effusion --label Cardiomegaly   # chest_gradcam.png

--method rollout (default): the input, the attention rollout over all blocks and the last block's mean
over heads, then one overlay per block and head: where the class token read from in the token grid
(a qing CNN-Transformer only). --method gradcam: Grad-CAM at the last CNN stage for each --label
(default: the most probable output), beside the attention rollout where the model has one; it works
for any CNN. Neither is a causal explanation of the prediction (see the qing.explain documentation).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="Grad-CAM or attention maps over one image",
        description="Save Grad-CAM for chosen labels, or the class-token attention of every block and head, "
        "over an image as one PNG figure.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_model_argument(parser)
    parser.add_argument("image", metavar="IMAGE", type=Path, help="a PNG, JPEG or DICOM file")
    parser.add_argument(
        "--method",
        choices=("rollout", "gradcam"),
        default="rollout",
        help="rollout: attention of every block and head; gradcam: Grad-CAM of --label at the last CNN stage",
    )
    parser.add_argument(
        "--label",
        action="append",
        metavar="NAME",
        help="an output to explain with Grad-CAM (repeat for several; default: the most probable)",
    )
    parser.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="PNG to write (default: <IMAGE name>_<method>.png)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_device_flags(parser, batch=False, workers=False)
    add_common_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    gradcam = args.method == "gradcam"
    suffix = "gradcam" if gradcam else "attention"
    output = args.output or Path(f"{args.image.name.split('.')[0]}_{suffix}.png")
    check_new_file(output, overwrite=args.overwrite)
    if not args.image.is_file():
        raise CLIError(f"image file not found: {args.image}")
    if args.label and not gradcam:
        raise CLIError("--label chooses the outputs Grad-CAM explains; add --method gradcam (attention has no label)")
    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device)
    if loaded.model is None:
        raise CLIError(
            f"qing explain needs the PyTorch model: Grad-CAM and attention maps are not part of the ONNX graph of "
            f"{args.model}; give the model folder it was exported from"
        )
    if gradcam and not loaded.has_cnn_stage:
        raise CLIError(f"{args.model} has no CNN stage for Grad-CAM (it needs a timm CNN or a qing CNN-Transformer)")
    if not gradcam and not loaded.has_attention:
        raise CLIError(
            f"{args.model} has no attention maps to show; --method rollout needs a qing CNN-Transformer "
            "(use --method gradcam)"
        )
    unknown = [name for name in args.label or () if name not in loaded.labels]
    if unknown:
        raise CLIError(f"--label {unknown[0]!r} is not one of the model's outputs: {', '.join(loaded.labels)}")
    transform = build_transforms(loaded.model, train=False)
    image = transform(load_image(args.image, channels=transform.channels)).unsqueeze(0).to(device)
    with torch.no_grad():
        probs = loaded.probabilities(loaded.model(image).float().cpu().numpy())[0]
    if gradcam:
        labels = [loaded.labels.index(name) for name in args.label or ()]
        save_gradcam_figure(
            loaded.model, image[0], output, labels=labels or None, mean=transform.mean, std=transform.std
        )
    else:
        save_attention_figure(loaded.model, image[0], output, mean=transform.mean, std=transform.std)
    top = sorted(zip(loaded.labels, probs), key=lambda item: -item[1])[:5]
    print(f"{args.image}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    print(f"{'Grad-CAM' if gradcam else 'attention'} figure: {short_path(output)}")
    return 0
