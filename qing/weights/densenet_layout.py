"""The torchvision/timm DenseNet121 state-dict layout that CheXNet and torchxrayvision weights share.

torchvision, timm and torchxrayvision name DenseNet121 tensors identically
(``features.conv0``, ``features.denseblock{b}.denselayer{l}.{norm1,conv1,norm2,conv2}``,
``features.transition{t}.{norm,conv}``, ``features.norm5``, ``classifier``). Older files differ
only in spelling: torchvision before 0.3 (and CheXNet, trained with it) wrote ``norm.1`` /
``conv.1`` / ``norm.2`` / ``conv.2`` inside dense layers, DataParallel adds ``module.``,
wrappers add a ``densenet121.`` attribute prefix, and CheXNet's head is ``classifier.0``
(a ``Linear`` followed by a ``Sigmoid``). :func:`normalize_densenet_keys` maps all of these to
the modern layout, which is also timm's ``densenet121`` layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from qing.weights.files import WRAPPER_PREFIXES, CheckpointError, strip_prefixes

__all__ = ["DENSENET121_BLOCKS", "densenet_summary", "is_densenet121", "normalize_densenet_keys"]

#: Dense layers per block of DenseNet121.
DENSENET121_BLOCKS = (6, 12, 24, 16)

#: Prefixes stripped from DenseNet keys: the wrappers' and the ``densenet121.``/``model.`` attributes of CXR code.
DENSENET_PREFIXES = (*WRAPPER_PREFIXES, "model.", "densenet121.")
_LEGACY_LAYER = re.compile(r"^(features\.denseblock\d+\.denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def normalize_densenet_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a DenseNet state dict to the modern torchvision/timm layout.

    Removes ``module.``, ``_orig_mod.``, ``model.`` and ``densenet121.`` prefixes, joins legacy
    ``norm.1``-style names (``...denselayer1.norm.1.weight`` -> ``...denselayer1.norm1.weight``)
    and maps ``classifier.0.*`` (CheXNet's ``Sequential(Linear, Sigmoid)``) to ``classifier.*``.
    Other keys pass through unchanged.

    Args:
        state_dict: DenseNet weights in any of those spellings.

    Returns:
        A new dict; tensors are shared, not copied.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in strip_prefixes(state_dict, DENSENET_PREFIXES).items():
        new = _LEGACY_LAYER.sub(r"\1\2.", key)
        if new.startswith("classifier.0."):
            new = "classifier." + new.removeprefix("classifier.0.")
        if new in out:
            raise CheckpointError(f"two tensors map to {new!r} after renaming (one of them is {key!r})")
        out[new] = value
    return out


def is_densenet121(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether normalized keys describe a DenseNet121 (block sizes 6, 12, 24, 16)."""
    if "features.conv0.weight" not in state_dict or "features.norm5.weight" not in state_dict:
        return False
    for block, layers in enumerate(DENSENET121_BLOCKS, start=1):
        prefix = f"features.denseblock{block}.denselayer"
        if f"{prefix}{layers}.conv2.weight" not in state_dict or f"{prefix}{layers + 1}.conv2.weight" in state_dict:
            return False
    return True


def densenet_summary(state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> dict[str, int]:
    """``in_chans``, ``num_features`` and ``num_classes`` (0 without classifier) of normalized DenseNet121 weights.

    Raises:
        CheckpointError: Not a DenseNet121.
    """
    if not is_densenet121(state_dict):
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointError(
            f"{source} is not a DenseNet121: expected features.conv0.weight, features.denseblock1-4 with "
            f"{'/'.join(map(str, DENSENET121_BLOCKS))} dense layers and features.norm5, found keys like {sample}"
        )
    weight = state_dict.get("classifier.weight")
    return dict(
        in_chans=int(state_dict["features.conv0.weight"].shape[1]),
        num_features=int(state_dict["features.norm5.weight"].shape[0]),
        num_classes=int(weight.shape[0]) if weight is not None else 0,
    )
