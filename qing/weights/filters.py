"""Format detection and the per-family converters used as timm ``pretrained_filter_fn``.

:func:`detect_format` names the layout of a state dict; :func:`convert_for_hybrid` and
:func:`convert_for_densenet` map any supported layout onto a CNN-Transformer hybrid or a plain
DenseNet121 classifier. :func:`checkpoint_filter_fn` is the timm-style
``filter_fn(state_dict, model) -> state_dict`` built on them (it also fills tensors a
backbone-only checkpoint lacks from the model's initialization).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from qing.weights.chexnet import convert_chexnet, is_chexnet
from qing.weights.densenet_layout import is_densenet121, normalize_densenet_keys
from qing.weights.files import CheckpointError
from qing.weights.original import convert_original_hybrid, is_original_hybrid
from qing.weights.pretrained import CheckpointFilter, Conversion
from qing.weights.xrv import convert_xrv_densenet, is_xrv_densenet

__all__ = ["FORMATS", "checkpoint_filter_fn", "convert_for_densenet", "convert_for_hybrid", "detect_format"]

#: Checkpoint formats qing recognizes, with what identifies them.
FORMATS = {
    "qing": "a qing CNN-Transformer state dict (backbone.*, cls_token, blocks.*, head.*)",
    "original_hybrid": "the original single-script hybrid (cnn_features.*, class_token, transformer_encoder.*)",
    "chexnet": "CheXNet model.pth.tar (module.densenet121.*, legacy norm.1 names, classifier.0)",
    "xrv_densenet": "a torchxrayvision DenseNet121 (1 input channel, 18 outputs, op_threshs)",
    "densenet121": "a torchvision/timm DenseNet121 (features.*, classifier.*)",
}

_WRAPPERS = ("module.", "_orig_mod.")


def _strip_wrappers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPERS):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _is_qing_hybrid(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "cls_token" in state_dict and any(k.startswith("backbone.") for k in state_dict)


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the layout of a state dict: one of :data:`FORMATS`, or ``"unknown"``.

    Args:
        state_dict: Model weights (``module.`` prefixes allowed).
    """
    sd = _strip_wrappers(state_dict)
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
        A :class:`~qing.weights.pretrained.Conversion`.
    """
    fmt = detect_format(state_dict)
    sd = _strip_wrappers(state_dict)
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
        A :class:`~qing.weights.pretrained.Conversion` covering the whole model, with
        torchxrayvision's ``op_threshs`` as ``thresholds`` when present.

    Raises:
        CheckpointError: A hybrid checkpoint, or an unrecognized layout.
    """
    fmt = detect_format(state_dict)
    sd = _strip_wrappers(state_dict)
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


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm-style filter: convert ``state_dict`` for ``model`` and complete it for a strict load.

    Picks :func:`convert_for_hybrid` for qing hybrids (models with a ``backbone``) and
    :func:`convert_for_densenet` otherwise; keys the checkpoint lacks (a backbone-only
    checkpoint's encoder and head, a replaced classifier) are filled from ``model``'s current
    tensors, so ``model.load_state_dict(checkpoint_filter_fn(sd, model))`` loads strictly.

    Args:
        state_dict: Checkpoint weights in any format of :data:`FORMATS` (or a timm backbone's).
        model: The target model; it needs ``pretrained_cfg`` (every qing model has it).

    Returns:
        A complete state dict for ``model``.
    """
    convert = convert_for_hybrid if hasattr(model, "backbone") else convert_for_densenet
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    return CheckpointFilter(name, "checkpoint", convert)(state_dict, model)
