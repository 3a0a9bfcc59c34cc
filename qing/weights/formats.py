"""Checkpoint formats: which layout a state dict has, and its tensors under a qing model's key names.

:func:`detect_format` names the layout of a state dict (one of :data:`FORMATS`);
:func:`convert_for_hybrid` and :func:`convert_for_densenet` map any supported layout onto a
CNN-Transformer hybrid or a plain DenseNet121 classifier and say what they made of it in a
:class:`Conversion`. The model builder (``qing.models``) runs them as timm's ``pretrained_filter_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from qing.weights.chexnet import convert_chexnet, is_chexnet
from qing.weights.densenet_layout import is_densenet121, normalize_densenet_keys
from qing.weights.files import CheckpointError, strip_prefixes
from qing.weights.original import convert_original_hybrid, is_original_hybrid
from qing.weights.xrv import convert_xrv_densenet, is_xrv_densenet

__all__ = [
    "FORMATS",
    "Conversion",
    "Converter",
    "convert_for_densenet",
    "convert_for_hybrid",
    "detect_format",
    "summarize_keys",
]

#: Checkpoint formats qing recognizes, with what identifies them.
FORMATS = {
    "qing": "a qing CNN-Transformer state dict (backbone.*, cls_token, blocks.*, head.*)",
    "original_hybrid": "the original single-script hybrid (cnn_features.*, class_token, transformer_encoder.*)",
    "chexnet": "CheXNet model.pth.tar (module.densenet121.*, legacy norm.1 names, classifier.0)",
    "xrv_densenet": "a torchxrayvision DenseNet121 (1 input channel, 18 outputs, op_threshs)",
    "densenet121": "a torchvision/timm DenseNet121 (features.*, classifier.*)",
}


@dataclass
class Conversion:
    """What a model family's converter made of a checkpoint.

    Attributes:
        state_dict: Tensors under the model's key names.
        format: Detected format, e.g. ``"chexnet"``, ``"xrv_densenet"``, ``"original_hybrid"``, ``"qing"``.
        required_prefix: ``""`` when the checkpoint is a whole model (every key must be present);
            ``"backbone."`` when it only covers the backbone (the rest keeps its initialization).
        unused: Checkpoint keys with no place in the model (e.g. a backbone's ImageNet classifier).
        thresholds: Decision thresholds carried by the checkpoint (torchxrayvision ``op_threshs``).
    """

    state_dict: dict[str, torch.Tensor]
    format: str
    required_prefix: str = ""
    unused: list[str] = field(default_factory=list)
    thresholds: Optional[list[float]] = None


#: ``converter(state_dict, model) -> Conversion``
Converter = Callable[[Mapping[str, torch.Tensor], nn.Module], Conversion]


def summarize_keys(keys: Sequence[str], *, limit: int = 8) -> str:
    """``"blocks.* (24), cls_token, head.* (2)"``: keys grouped by their first component."""
    groups: dict[str, int] = {}
    for key in keys:
        group = key.split(".", 1)[0] + ".*" if "." in key else key
        groups[group] = groups.get(group, 0) + 1
    parts = [f"{g} ({n})" if n > 1 else g for g, n in groups.items()]
    return ", ".join(parts[:limit]) + (f", ... ({len(parts) - limit} more groups)" if len(parts) > limit else "")


def _is_qing_hybrid(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "cls_token" in state_dict and any(k.startswith("backbone.") for k in state_dict)


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the layout of a state dict: one of :data:`FORMATS`, or ``"unknown"``.

    Args:
        state_dict: Model weights (``module.`` prefixes allowed).
    """
    sd = strip_prefixes(state_dict)
    if is_original_hybrid(sd):
        return "original_hybrid"
    if _is_qing_hybrid(sd):
        return "qing"
    if is_chexnet(sd):
        return "chexnet"
    if is_densenet121(normalize_densenet_keys({k: v for k, v in sd.items() if k != "op_threshs"})):
        return "xrv_densenet" if is_xrv_densenet(sd) else "densenet121"
    return "unknown"


def convert_for_hybrid(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Conversion:
    """Map a checkpoint onto a CNN-Transformer hybrid's keys.

    Whole-model formats (``qing``, ``original_hybrid``) must cover every tensor. Everything
    else is a backbone: CheXNet, torchxrayvision and torchvision/timm DenseNet121 weights, or any
    timm CNN matching ``model.backbone`` (e.g. ``timm/resnet50.a1_in1k``); their classifiers are
    reported as unused and the token projection, encoder and head keep their initialization.

    Args:
        state_dict: The checkpoint's weights.
        model: The freshly built hybrid.

    Returns:
        A :class:`Conversion`.
    """
    fmt = detect_format(state_dict)
    sd = strip_prefixes(state_dict)
    if fmt == "original_hybrid":
        converted, _ = convert_original_hybrid(sd)
        return Conversion(converted, fmt, unused=[k for k in sd if k.startswith("base_model.classifier.")])
    if fmt == "qing":
        return Conversion(sd, fmt)
    if fmt == "chexnet":
        converted = convert_chexnet(sd)
        return Conversion(converted, fmt, "backbone.", unused=[k for k in sd if ".classifier." in k])
    if fmt == "xrv_densenet":
        converted, _ = convert_xrv_densenet(sd)
        unused = ["classifier.weight", "classifier.bias"] + (["op_threshs"] if "op_threshs" in sd else [])
        return Conversion(converted, fmt, "backbone.", unused=unused)
    if fmt == "densenet121":
        sd = normalize_densenet_keys(sd)
    target = set(model.state_dict())
    if sd and all(k in target for k in sd):  # already in qing naming, e.g. a converted backbone
        prefix = "" if any(not k.startswith("backbone.") for k in sd) else "backbone."
        return Conversion(sd, "qing", prefix)
    backbone = {f"backbone.{k}" for k in model.backbone.state_dict()}
    converted = {f"backbone.{k}": v for k, v in sd.items() if f"backbone.{k}" in backbone}
    unused = [k for k in sd if f"backbone.{k}" not in backbone]
    return Conversion(converted, fmt if fmt != "unknown" else "timm", "backbone.", unused=unused)


def convert_for_densenet(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Conversion:
    """Map a checkpoint onto a plain DenseNet121 classifier (``qing_chexnet_densenet121``, ``qing_xrv_densenet121``).

    Args:
        state_dict: CheXNet, torchxrayvision or torchvision/timm DenseNet121 weights.
        model: The freshly built timm ``DenseNet``.

    Returns:
        A :class:`Conversion` covering the whole model, with
        torchxrayvision's ``op_threshs`` as ``thresholds`` when present.

    Raises:
        CheckpointError: A hybrid checkpoint, or an unrecognized layout.
    """
    fmt = detect_format(state_dict)
    sd = strip_prefixes(state_dict)
    if fmt == "chexnet":
        return Conversion(convert_chexnet(sd, prefix="", classifier=True), fmt)
    if fmt == "xrv_densenet":
        converted, thresholds = convert_xrv_densenet(sd, prefix="", classifier=True)
        return Conversion(converted, fmt, thresholds=thresholds)
    if fmt == "densenet121":
        return Conversion(normalize_densenet_keys(sd), fmt)
    if fmt in ("qing", "original_hybrid"):
        raise CheckpointError(
            f"found {FORMATS[fmt]}, expected a DenseNet121 classifier: create qing_densenet121_tr2 "
            "(or the qing architecture it was trained with) for this checkpoint"
        )
    sample = ", ".join(list(sd)[:4])
    raise CheckpointError(f"found an unrecognized layout (keys like {sample}), expected {FORMATS['densenet121']}")
