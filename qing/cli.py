"""The ``qing`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch

    import qing

    model = qing.create_model(args.model).eval()
    cfg = model.pretrained_cfg
    side = cfg["input_size"][-1]
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, cfg["input_size"][0], side, side, generator=generator)  # a generated image
    with torch.no_grad():
        logits = model(image)
    print(model)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\n{args.model}: {n_params:.2f} M parameters, input {tuple(image.shape)}")
    for name, p in zip(cfg["label_names"], torch.sigmoid(logits)[0].tolist()):
        print(f"  {name:<20s} {p:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qing", description="Chest X-ray models on timm.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a qing model on a generated image")
    demo.add_argument("--model", default="qing_densenet121_tr2")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
