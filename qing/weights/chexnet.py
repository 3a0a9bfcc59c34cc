"""Adapter for CheXNet checkpoints (``model.pth.tar`` of the arnoweng/CheXNet reimplementation).

The file is a ``torch.save``-d training checkpoint, a dict whose ``state_dict`` holds a
DataParallel-wrapped ``DenseNet121`` module::

    module.densenet121.features.conv0.weight
    module.densenet121.features.denseblock1.denselayer1.norm.1.weight     # legacy torchvision names
    module.densenet121.features.transition1.conv.weight
    module.densenet121.features.norm5.running_var
    module.densenet121.classifier.0.weight                                # Linear(1024, 14), then Sigmoid

It predates PyTorch 0.4, so there are no ``num_batches_tracked`` buffers (accepted if present).
It was trained on ChestX-ray14 with ImageNet normalization, 224 px inputs, and predicts the 14
labels of :data:`CXR14_LABELS` through a sigmoid (qing returns the logits before it).

Where qing finds the file: ``pretrained=True`` downloads it once from the repository
(:data:`CHEXNET_WEIGHTS_URL`) to ``$QING_WEIGHTS_DIR/chexnet/model.pth.tar`` (default
``~/.cache/qing/weights/chexnet/model.pth.tar``); on a machine without network, put it there by hand,
or pass it explicitly with ``pretrained_cfg_overlay=dict(file="/path/to/model.pth.tar")``. The
repository states no licence for its code or weights (:data:`NO_LICENSE`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from qing.weights.densenet_layout import densenet_summary, normalize_densenet_keys
from qing.weights.files import CheckpointError, strip_prefixes

__all__ = [
    "CHEXNET_FILE",
    "CHEXNET_URL",
    "CHEXNET_WEIGHTS_URL",
    "CXR14_LABELS",
    "NO_LICENSE",
    "convert_chexnet",
    "is_chexnet",
]

#: The 14 ChestX-ray14 findings in the order of the dataset's list files and of CheXNet's outputs.
CXR14_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip

#: Where the file is expected, relative to the qing weights directory (``$QING_WEIGHTS_DIR``).
CHEXNET_FILE = "chexnet/model.pth.tar"

#: The repository that distributes ``model.pth.tar``.
CHEXNET_URL = "https://github.com/arnoweng/CheXNet"

#: The raw-file URL of ``model.pth.tar`` on the repository's master branch (downloaded on first use).
CHEXNET_WEIGHTS_URL = "https://raw.githubusercontent.com/arnoweng/CheXNet/master/model.pth.tar"

#: The ``license`` of weights whose source states none (the CheXNet repository has no licence file).
NO_LICENSE = "no licence stated by the source"


def is_chexnet(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` has CheXNet's layout: a ``densenet121.`` module with a ``classifier.0`` head."""
    keys = list(strip_prefixes(state_dict))
    return any(k.startswith("densenet121.features.") for k in keys) and "densenet121.classifier.0.weight" in keys


def convert_chexnet(
    state_dict: Mapping[str, torch.Tensor], *, prefix: str = "backbone.", classifier: bool = False
) -> dict[str, torch.Tensor]:
    """Map CheXNet weights onto timm's ``densenet121`` layout.

    The default output fits the DenseNet121 backbone of every qing densenet hybrid
    (``backbone.features.*``); ``prefix="", classifier=True`` gives the full 14-way classifier
    of ``qing_chexnet_densenet121`` (``features.*`` and ``classifier.*``).

    Args:
        state_dict: CheXNet's ``checkpoint["state_dict"]`` (``module.densenet121.*`` keys).
        prefix: Prepended to every output key.
        classifier: Keep the ``Linear(1024, 14)`` head as ``classifier.{weight,bias}``.

    Returns:
        The renamed tensors (shared, not copied). ``num_batches_tracked`` buffers are kept if the
        file has them; models fill missing ones.

    Raises:
        CheckpointError: Not CheXNet's layout, or not a DenseNet121.
    """
    if not is_chexnet(state_dict):
        sample = ", ".join(list(state_dict)[:3])
        raise CheckpointError(
            "not a CheXNet checkpoint: expected keys like module.densenet121.features.conv0.weight and "
            f"module.densenet121.classifier.0.weight, found {sample}"
        )
    sd = normalize_densenet_keys(state_dict)
    unknown = [k for k in sd if not k.startswith(("features.", "classifier."))]
    if unknown:
        raise CheckpointError(f"unexpected keys in CheXNet checkpoint: {unknown[:10]}")
    densenet_summary(sd, source="CheXNet checkpoint")
    return {prefix + k: v for k, v in sd.items() if classifier or not k.startswith("classifier.")}
