"""``python -m qing.train config.yaml [--set key=value ...]``; the same under ``torchrun -m qing.train``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Optional

import yaml

from qing.train.config import TrainConfig
from qing.train.trainer import Trainer


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (YAML values; ``data.root=...`` for nested fields) to a config dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        target = values
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(raw)
    return values


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
