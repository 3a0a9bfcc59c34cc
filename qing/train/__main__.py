"""``python -m qing.train config.yaml [--set key=value ...]``; the same under ``torchrun -m qing.train``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

import yaml

from qing.train.config import TrainConfig, apply_overrides
from qing.train.trainer import Trainer
from qing.train.wording import option_style

_PROG = "python -m qing.train"


def main(argv: Optional[list[str]] = None) -> int:
    """Run the config file; a failure prints one ``python -m qing.train: error: ...`` line and returns 1."""
    parser = argparse.ArgumentParser(prog=_PROG, description="Fine-tune a qing model.")
    parser.add_argument("config", help="YAML or JSON TrainConfig file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with option_style("script"):
            return _run(args)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, ImportError, yaml.YAMLError) as err:  # a mistake in the input: one line
        if args.debug:
            raise
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    try:
        with open(args.config, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {args.config}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{args.config} must hold a mapping of TrainConfig fields, got {type(values).__name__}")
    values = apply_overrides(values, args.overrides)
    if args.resume:
        values["resume"] = True
    result = Trainer(TrainConfig.from_dict(values)).fit()
    best = f"epoch {result.best_epoch}, {result.monitor}={result.best_value:.4g}"
    print(f"best checkpoint: {result.best_checkpoint} ({best})")
    if result.report_path:
        print(f"report: {result.report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
