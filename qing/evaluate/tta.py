"""Test-time augmentation: average a model's probabilities over a few shifted and scaled views of each image.

The default views are the image itself, shifts by 4% of its size to the left, right, up and down, and
zooms to 95% and 105% (7 forward passes). Each view is an affine resampling of the normalized input
(bilinear, edges continued by their border pixels). There is **no horizontal flip by default**: on a
chest X-ray left and right are anatomy (the heart sits on the patient's left, a situs inversus or a
dextrocardia is a finding), and the laterality marker turns into mirror writing.

:class:`TTAModel` wraps a model so the rest of qing needs no change: its "logits" are those of the
averaged probability (``logit(mean_v sigmoid(z_v))`` per output, or ``log(mean_v softmax(z_v))`` for
multiclass), so ``sigmoid``/``softmax`` of them, e.g. :func:`qing.evaluate.probabilities`, give the
average. A model's temperatures (``qing_meta.temperatures``) are applied to these logits like to any
others; they were fitted on single-view logits, which averaging makes a little less confident.

Example::

    from qing.evaluate import TTAModel, collect_logits

    out = collect_logits(TTAModel(model, task="binary"), loader)   # 7 views per image
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from qing.evaluate._inputs import check_task

__all__ = ["DEFAULT_TTA_VIEWS", "TTAModel", "View", "augment", "tta_views"]

_EPS = 1e-12  # keeps logit(mean probability) finite where every view is certain


@dataclass(frozen=True)
class View:
    """One test-time view of an image.

    Attributes:
        name: Short description, e.g. ``"shift right 4%"``.
        shift: ``(dx, dy)`` as fractions of the width and height; positive moves the content right / down.
        scale: Zoom factor: ``> 1`` magnifies the center (the edges leave the frame), ``< 1`` shrinks the
            image (the frame's border pixels are continued).
        hflip: Mirror left and right (off in the defaults: laterality).
    """

    name: str
    shift: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    hflip: bool = False

    @property
    def is_identity(self) -> bool:
        """Whether the view is the image as it is."""
        return self.shift == (0.0, 0.0) and self.scale == 1.0 and not self.hflip


def tta_views(*, shift: float = 0.04, scales: Sequence[float] = (0.95, 1.05), hflip: bool = False) -> list[View]:
    """The identity, four shifts and the given zooms (and, only if asked, the mirrored image).

    Args:
        shift: Shift as a fraction of the image size (0 for none).
        scales: Zoom factors besides 1.
        hflip: Add the horizontally mirrored image (read the module docstring first).

    Returns:
        The views, identity first.
    """
    if not 0.0 <= shift < 0.5:
        raise ValueError(f"shift must be in [0, 0.5), got {shift}")
    if any(not 0.5 <= s <= 2.0 for s in scales):
        raise ValueError(f"scales must be in [0.5, 2], got {list(scales)}")
    views = [View("identity")]
    if shift:
        pct = f"{100 * shift:g}%"
        views += [
            View(f"shift right {pct}", (shift, 0.0)),
            View(f"shift left {pct}", (-shift, 0.0)),
            View(f"shift down {pct}", (0.0, shift)),
            View(f"shift up {pct}", (0.0, -shift)),
        ]
    views += [View(f"zoom {s:g}", scale=float(s)) for s in scales if s != 1.0]
    if hflip:
        views.append(View("horizontal flip", hflip=True))
    return views


#: The views ``--tta`` uses: identity, shifts of 4% in four directions, zooms 0.95 and 1.05; no flip.
DEFAULT_TTA_VIEWS = tuple(tta_views())


def augment(images: torch.Tensor, view: View) -> torch.Tensor:
    """``images`` as seen in ``view``.

    Args:
        images: ``(B, C, H, W)`` normalized images.
        view: The view.

    Returns:
        ``(B, C, H, W)`` of the same dtype and device; the identity view returns ``images`` itself.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be a batch (B, C, H, W), got shape {list(images.shape)}")
    if view.is_identity:
        return images
    dx, dy = view.shift
    flip = -1.0 if view.hflip else 1.0
    # output pixel (x, y) in [-1, 1] reads the input at ((x * flip) / scale - 2 dx, y / scale - 2 dy)
    theta = torch.tensor(
        [[flip / view.scale, 0.0, -2.0 * dx], [0.0, 1.0 / view.scale, -2.0 * dy]],
        dtype=torch.float32,
        device=images.device,
    )
    grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(images.dtype)


class TTAModel(nn.Module):
    """A model whose logits are those of its probabilities averaged over test-time views.

    Args:
        model: The model; it is a submodule (``TTAModel(model).eval()`` sets its mode).
        task: ``"binary"``, ``"multilabel"`` (sigmoid per output) or ``"multiclass"`` (softmax).
        views: The views (default :data:`DEFAULT_TTA_VIEWS`).

    Attributes:
        num_classes, pretrained_cfg, qing_meta: Those of ``model`` (where it has them).
    """

    def __init__(self, model: nn.Module, *, task: str, views: Optional[Sequence[View]] = None) -> None:
        super().__init__()
        check_task(task)
        self.model = model
        self.task = task
        self.views = tuple(views if views is not None else DEFAULT_TTA_VIEWS)
        if not self.views:
            raise ValueError("TTAModel needs at least one view")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("num_classes", "pretrained_cfg", "qing_meta", "default_cfg"):
                return getattr(self.model, name)
            raise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> ``(B, num_classes)`` logits of the view-averaged probabilities."""
        total: Optional[torch.Tensor] = None
        for view in self.views:
            logits = self.model(augment(x, view)).double()
            probs = logits.softmax(dim=-1) if self.task == "multiclass" else logits.sigmoid()
            total = probs if total is None else total + probs
        mean = total / len(self.views)
        if self.task == "multiclass":
            out = mean.clamp_min(_EPS).log()
        else:
            mean = mean.clamp(_EPS, 1.0 - _EPS)
            out = torch.log(mean) - torch.log1p(-mean)
        return out.float()
