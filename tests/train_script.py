"""Run ``Trainer(TrainConfig.from_file(config)).fit()`` in a subprocess (DDP under torchrun, kill -9 tests).

Usage: ``python tests/train_script.py config.json [--pause-at EPOCH,STEP]``. With ``--pause-at``
the run prints ``PAUSED epoch=E step=S`` after that optimizer step (0-based) and sleeps, so a
test can kill it mid-epoch at a known point. At the end rank 0 prints ``DONE <json>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

torch.set_num_threads(1)  # same arithmetic as the in-process reference runs

from qing.train import Callback, TrainConfig, Trainer  # noqa: E402


class PauseAt(Callback):
    """Announce a step on stdout, then sleep until killed."""

    def __init__(self, epoch: int, step: int) -> None:
        self.at = (epoch, step)

    def on_step_end(self, trainer: Trainer, *, epoch: int, step: int, loss: float) -> None:
        if (epoch, step) == self.at:
            print(f"PAUSED epoch={epoch} step={step}", flush=True)
            time.sleep(600)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--pause-at", default=None)
    args = parser.parse_args()
    callbacks = [PauseAt(*map(int, args.pause_at.split(",")))] if args.pause_at else []
    result = Trainer(TrainConfig.from_file(args.config), callbacks=callbacks).fit()
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {"best_epoch": result.best_epoch, "epochs": result.epochs_completed, "history": result.history}
        print("DONE " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
