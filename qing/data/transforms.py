"""Image transforms resolved from a model's pretrained cfg, with mild chest X-ray augmentation.

A transform has two stages so that the deterministic part can be cached:

* ``prepare``: PIL image -> resized/cropped PIL image, exactly timm's eval transform
  (``timm.data.create_transform``) without its tensor conversion. For the original design this is
  ``Resize((224, 224))`` (``crop_mode="squash"``, aspect ratio not kept).
* ``finish``: PIL image -> normalized tensor ``(C, H, W)``; for training it first applies the
  augmentation: a small random rotation, scale and translation (``RandomAffine``) and, only
  when asked, a horizontal flip (off by default: a flip moves the heart to the right).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn
from torchvision import transforms as T

__all__ = ["ImageTransform", "build_transforms", "resolve_image_config"]

_TIMM_DEFAULT_CROP_PCT = 0.875  # timm.data.transforms_factory uses it when crop_pct is None


@dataclass
class ImageTransform:
    """A two-stage image transform (see the module docs).

    Attributes:
        prepare: Deterministic resize/crop, PIL -> PIL (what the in-memory cache stores).
        finish: Augmentation (training only), ``ToTensor`` and ``Normalize``, PIL -> ``(C, H, W)``.
        input_size: ``(C, H, W)`` of the output.
        mean: Per-channel mean used by ``Normalize`` (length C).
        std: Per-channel std used by ``Normalize`` (length C).
        train: Whether ``finish`` augments.
        crop_pct: timm's crop fraction of ``prepare`` (``None``: timm's default, 0.875).
        crop_mode: timm's crop mode of ``prepare``: ``"center"`` (``None``), ``"squash"`` or ``"border"``.
    """

    prepare: Callable[[Image.Image], Image.Image]
    finish: Callable[[Image.Image], torch.Tensor]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: bool
    crop_pct: Optional[float] = None
    crop_mode: Optional[str] = None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> normalized tensor ``(C, H, W)``."""
        return self.finish(self.prepare(img))

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Where the model input lies in the original image: the inverse of ``prepare``'s geometry.

        Args:
            width: Original image width in pixels.
            height: Original image height in pixels.

        Returns:
            ``(left, top, right, bottom)`` in original pixel coordinates: the whole image for a squash
            resize, a centred part of it for a center crop, beyond it (padding) for ``"border"``.
        """
        out_h, out_w = self.input_size[1:]
        crop_pct = self.crop_pct or _TIMM_DEFAULT_CROP_PCT
        scale_h, scale_w = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
        if self.crop_mode == "squash":
            fx, fy = scale_w / width, scale_h / height
        else:  # "border" fits the image inside the scale size, "center" covers it (shorter side)
            fit = min if self.crop_mode == "border" else max
            fx = fy = fit(scale_h / height, scale_w / width)
        left, top = (width * fx - out_w) / 2 / fx, (height * fy - out_h) / 2 / fy
        return left, top, left + out_w / fx, top + out_h / fy

    @property
    def channels(self) -> int:
        """Input channels the images are read with (1 or 3)."""
        return self.input_size[0]


def _fit_channels(values: Sequence[float], channels: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1:
        return values[:1] if len(set(values)) == 1 else (sum(values) / len(values),)
    if len(values) == 1:
        return values * channels
    raise ValueError(f"{name} has {len(values)} values for {channels} input channels")


def resolve_image_config(
    model_or_cfg: Union[nn.Module, dict[str, Any]], *, img_size: Optional[int] = None
) -> dict[str, Any]:
    """timm's data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``).

    ``mean``/``std`` are fitted to the model's ``in_chans`` (averaged for 1-channel models) and
    ``input_size`` to ``(in_chans, img_size, img_size)`` when ``img_size`` is given.

    Args:
        model_or_cfg: A timm/qing model or a pretrained cfg dict.
        img_size: Square input side overriding the cfg's.
    """
    if isinstance(model_or_cfg, nn.Module):
        cfg = resolve_data_config(model=model_or_cfg)
        channels = int(getattr(model_or_cfg, "in_chans", cfg["input_size"][0]))
    else:
        cfg = resolve_data_config(pretrained_cfg=dict(model_or_cfg))
        channels = int(cfg["input_size"][0])
    if channels not in (1, 3):
        raise ValueError(f"models with {channels} input channels are not supported for images (1 or 3)")
    height, width = (img_size, img_size) if img_size else cfg["input_size"][-2:]
    cfg["input_size"] = (channels, int(height), int(width))
    cfg["mean"] = _fit_channels(cfg["mean"], channels, "mean")
    cfg["std"] = _fit_channels(cfg["std"], channels, "std")
    return cfg


def build_transforms(
    model_or_cfg: Union[nn.Module, dict[str, Any]],
    *,
    train: bool,
    img_size: Optional[int] = None,
    rotation: float = 10.0,
    translate: float = 0.05,
    scale: tuple[float, float] = (0.9, 1.1),
    hflip_prob: float = 0.0,
) -> ImageTransform:
    """Transforms for a model: its pretrained cfg's preprocessing, plus augmentation if ``train``.

    Args:
        model_or_cfg: A timm/qing model (uses ``model.pretrained_cfg`` and ``in_chans``) or a cfg dict.
        train: Add the augmentation.
        img_size: Square input side overriding the cfg's ``input_size``.
        rotation: Maximum rotation in degrees (uniform in ``[-rotation, rotation]``); 0 disables.
        translate: Maximum shift as a fraction of width/height; 0 disables.
        scale: Range of the random zoom; ``(1, 1)`` disables.
        hflip_prob: Probability of a horizontal flip (0 by default: anatomy is not symmetric).

    Returns:
        An :class:`ImageTransform`; ``transform(img)`` gives a float tensor ``(C, H, W)``.

    Example:
        >>> import qing
        >>> model = qing.create_model("qing_test_tr1", num_classes=1)
        >>> tf = build_transforms(model, train=False, img_size=64)
        >>> tf(Image.new("RGB", (100, 80))).shape
        torch.Size([3, 64, 64])
    """
    cfg = resolve_image_config(model_or_cfg, img_size=img_size)
    eval_tf = create_transform(**cfg, is_training=False)
    steps = list(eval_tf.transforms)
    if len(steps) < 2 or not isinstance(steps[-1], T.Normalize):
        raise RuntimeError(f"unexpected timm eval transform layout: {eval_tf}")
    prepare, to_tensor = steps[:-2], steps[-2:]

    augment: list[Callable] = []
    if train:
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        if rotation or translate or tuple(scale) != (1.0, 1.0):
            augment.append(
                T.RandomAffine(
                    degrees=rotation,
                    translate=(translate, translate) if translate else None,
                    scale=tuple(scale),
                    interpolation=T.InterpolationMode.BILINEAR,
                    fill=0,
                )
            )
        if hflip_prob > 0:
            augment.append(T.RandomHorizontalFlip(hflip_prob))
    return ImageTransform(
        prepare=T.Compose(prepare),
        finish=T.Compose(augment + to_tensor),
        input_size=cfg["input_size"],
        mean=cfg["mean"],
        std=cfg["std"],
        train=train,
        crop_pct=cfg.get("crop_pct"),
        crop_mode=cfg.get("crop_mode"),
    )
