"""``python -m qing.train config.yaml [--set key=value ...]``; the same under ``torchrun -m qing.train``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

import yaml

from qing.train.config import TrainConfig, apply_overrides
from qing.train.trainer import Trainer


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qing.train", description="Fine-tune a qing model.")
    parser.add_argument("config", help="YAML or JSON TrainConfig file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with open(args.config) as f:
        values = yaml.safe_load(f) or {}
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
