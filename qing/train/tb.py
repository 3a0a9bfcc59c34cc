"""TensorBoard events of a run: scalars, gradient histograms, inputs, feature maps, attention maps."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from qing import explain  # the module qing.explain

__all__ = ["TensorBoardLogger"]

_log = logging.getLogger("qing.train")


class TensorBoardLogger:
    """Writes a run's TensorBoard events; every method is a no-op when disabled (e.g. rank > 0).

    Tags: ``train/loss`` (per step), ``train/lr/<group>``, ``epoch/<history key>`` (per epoch),
    ``grad/<module>`` histograms, ``images/input`` (denormalized), ``images/feature_maps``,
    ``images/attention`` (class-token attention rollout over the inputs). Every event's step is
    the optimizer step it follows, so all tags share one monotonic x axis.

    Args:
        log_dir: Event folder.
        enabled: Write anything at all.
        purge_step: On resume, the first step to write; TensorBoard drops the events at or after
            it that the interrupted run wrote before it was killed.
    """

    def __init__(self, log_dir: Union[str, os.PathLike], *, enabled: bool, purge_step: Optional[int] = None):
        if enabled and purge_step is not None:
            _wait_for_a_later_file_name(Path(log_dir))
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step) if enabled else None

    def scalars(self, values: dict[str, float], step: int, *, prefix: str = "") -> None:
        """``add_scalar`` for every finite number in ``values``."""
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
                self.writer.add_scalar(f"{prefix}{key}", value, step)

    def grad_histograms(self, model: nn.Module, step: int) -> None:
        """One histogram of gradients per top-level submodule (``backbone``, ``blocks``, ``head``, ...)."""
        if self.writer is None:
            return
        grads: dict[str, list[torch.Tensor]] = {}
        for name, param in model.named_parameters():
            if param.grad is not None:
                grads.setdefault(name.split(".")[0], []).append(param.grad.detach().float().flatten().cpu())
        for module, values in grads.items():
            self.writer.add_histogram(f"grad/{module}", torch.cat(values), step)

    def images(
        self,
        model: nn.Module,
        images: torch.Tensor,
        step: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        inputs: bool = True,
    ) -> None:
        """Inputs (denormalized), CNN feature maps and attention overlays for ``images`` ``(B, C, H, W)``.

        Feature and attention maps need a qing ``CNNTransformer``; for other models only the
        inputs are logged.
        """
        if self.writer is None or images is None or len(images) == 0:
            return
        shown = explain.denormalize(images, mean, std)
        if inputs:
            self.writer.add_images("images/input", shown, step)
        if not hasattr(model, "forward_attention"):
            return
        maps = explain.feature_maps(model, images[:1], n=16)[0]  # (n, h, w) of the first image
        low = maps.amin(dim=(1, 2), keepdim=True)
        high = maps.amax(dim=(1, 2), keepdim=True)
        maps = (maps - low) / (high - low).clamp_min(1e-8)
        self.writer.add_image("images/feature_maps", make_grid(maps[:, None], nrow=4, pad_value=1.0), step)
        heat = explain.class_token_heatmap(model, images, method="rollout")
        overlays = np.stack([explain.overlay(img, h) for img, h in zip(shown, heat)])
        self.writer.add_images("images/attention", overlays, step, dataformats="NHWC")

    def flush(self) -> None:
        """Write pending events."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _wait_for_a_later_file_name(log_dir: Path) -> None:
    """Make the new event file sort after the existing ones.

    TensorBoard reads a folder's event files in name order, and a name starts with the creation
    second (then host and process id). A resumed run that starts within the same second as the
    interrupted one would sort before it if its process id is lower, so its purge would be read first.
    """
    stamps = [
        int(p.name.split(".")[3]) for p in log_dir.glob("events.out.tfevents.*") if p.name.split(".")[3].isdigit()
    ]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)
