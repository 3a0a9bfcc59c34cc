"""Adapter for torchxrayvision DenseNet121 weights (``xrv.models.DenseNet``).

torchxrayvision's DenseNet121 takes **one** channel scaled to ``[-1024, 1024]``
(``xrv.utils.normalize``: ``x / maxval * 2048 - 1024``), center-crops and resizes to 224 px, and
always has 18 outputs aligned to :data:`XRV_PATHOLOGIES`; weights trained on fewer labels leave
some names empty (``""``). ``op_threshs`` are per-output operating points: torchxrayvision
rescales ``sigmoid(logit)`` so that the threshold maps to 0.5, which makes them exactly
decision thresholds on the sigmoid probability — qing stores them as ``model.qing_meta.thresholds``.

On ``[0, 1]`` input, the torchxrayvision scaling is ``Normalize(mean=0.5, std=1/2048)``; that is
what :data:`XRV_MEAN` / :data:`XRV_STD` record in qing's pretrained cfgs.

Its state-dict keys are the torchvision/timm DenseNet layout (``features.*``, ``classifier.*``)
plus an ``op_threshs`` buffer when thresholds were set. The released weight files are pickled
whole ``nn.Module`` objects: reading them needs ``trust_pickle=True`` (and torchxrayvision
installed); convert once and keep the safetensors. qing looks for them under
``$QING_WEIGHTS_DIR/xrv/<release file name>`` and in torchxrayvision's own cache
``~/.torchxrayvision/models_data/``.

Label names and thresholds below are data from torchxrayvision 1.x (Apache-2.0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from qing.weights.densenet_layout import densenet_summary, normalize_densenet_keys
from qing.weights.files import CheckpointError

__all__ = [
    "XRV_CACHE_DIR",
    "XRV_MEAN",
    "XRV_PATHOLOGIES",
    "XRV_STD",
    "XRV_WEIGHTS",
    "XrvWeights",
    "convert_xrv_densenet",
    "is_xrv_densenet",
    "thresholds_from_op_threshs",
]

#: Mean and std on ``[0, 1]`` input equal to torchxrayvision's ``x * 2048 - 1024`` scaling.
XRV_MEAN = (0.5,)
XRV_STD = (1 / 2048,)

#: torchxrayvision's cache of downloaded weights.
XRV_CACHE_DIR = Path("~/.torchxrayvision/models_data").expanduser()

#: The 18 outputs of torchxrayvision's DenseNet121 in order (``xrv.models.DenseNet.targets``).
XRV_PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
    "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)  # fmt: skip

_RELEASE = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
_SUFFIX = "densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
_NAN = math.nan


@dataclass(frozen=True)
class XrvWeights:
    """One torchxrayvision DenseNet121 weight set.

    Attributes:
        name: torchxrayvision's name, e.g. ``"densenet121-res224-all"``.
        filename: File name of the release asset (and in torchxrayvision's cache).
        labels: 18 output names, ``""`` where the output was not trained.
        op_threshs: 18 operating points, NaN where the output was not trained.
        datasets: Training datasets.
    """

    name: str
    filename: str
    labels: tuple[str, ...]
    op_threshs: tuple[float, ...]
    datasets: str

    @property
    def url(self) -> str:
        """Download URL of the release asset (a pickled ``nn.Module``)."""
        return _RELEASE + self.filename


def _labels(present: str) -> tuple[str, ...]:
    """The 18 names with those not in ``present`` (space-separated indices) blanked."""
    keep = {int(i) for i in present.split()}
    return tuple(name if i in keep else "" for i, name in enumerate(XRV_PATHOLOGIES))


_CHEX_LIKE = "0 1 3 4 7 8 10 14 15 16 17"

#: torchxrayvision's DenseNet121 weights by qing tag.
XRV_WEIGHTS: dict[str, XrvWeights] = {
    "all": XrvWeights(
        "densenet121-res224-all",
        "nih-pc-chex-mimic_ch-google-openi-kaggle-" + _SUFFIX,
        XRV_PATHOLOGIES,
        (0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358, 0.010060724, 0.103246614,
         0.056810737, 0.026791653, 0.050318155, 0.023985857, 0.01939503, 0.042889766, 0.053369623, 0.035975814,
         0.20204692, 0.05015312),
        "nih, padchest, chexpert, mimic-cxr (chexpert labels), google, openi, rsna",
    ),
    "nih": XrvWeights(
        "densenet121-res224-nih",
        "nih-" + _SUFFIX,
        _labels(" ".join(map(str, range(14)))),
        (0.039117552, 0.0034529066, 0.11396341, 0.0057298196, 0.00045666535, 0.0018880932, 0.012037827,
         0.038744126, 0.0037213727, 0.014730946, 0.016149804, 0.054241467, 0.037198864, 0.0004403434,
         _NAN, _NAN, _NAN, _NAN),
        "nih",
    ),
    "pc": XrvWeights(
        "densenet121-res224-pc",
        "pc-" + _SUFFIX,
        _labels(" ".join(map(str, range(14))) + " 15"),
        (0.031012505, 0.013347598, 0.081435576, 0.001262615, 0.002587246, 0.0035944257, 0.0023071, 0.055412333,
         0.044385884, 0.042766232, 0.043258056, 0.037629247, 0.005658899, 0.0091741895, _NAN, 0.026507627,
         _NAN, _NAN),
        "padchest",
    ),
    "chex": XrvWeights(
        "densenet121-res224-chex",
        "chex-" + _SUFFIX,
        _labels(_CHEX_LIKE),
        (0.1988969, 0.05710573, _NAN, 0.0531293, 0.1435217, _NAN, _NAN, 0.27212676, 0.07749717, _NAN,
         0.19712369, _NAN, _NAN, _NAN, 0.09932402, 0.09273402, 0.3270967, 0.10888247),
        "chexpert",
    ),
    "rsna": XrvWeights(
        "densenet121-res224-rsna",
        "kaggle-" + _SUFFIX,
        _labels("8 16"),
        (_NAN,) * 8 + (0.13486601,) + (_NAN,) * 7 + (0.13511065, _NAN),
        "rsna pneumonia challenge",
    ),
    "mimic_nb": XrvWeights(
        "densenet121-res224-mimic_nb",
        "mimic_nb-" + _SUFFIX,
        _labels(_CHEX_LIKE),
        (0.08558747, 0.011884617, _NAN, 0.0040595434, 0.010733786, _NAN, _NAN, 0.118761964, 0.022924708, _NAN,
         0.06358637, _NAN, _NAN, _NAN, 0.022143636, 0.017476924, 0.1258702, 0.014020768),
        "mimic-cxr (negbio labels)",
    ),
    "mimic_ch": XrvWeights(
        "densenet121-res224-mimic_ch",
        "mimic_ch-" + _SUFFIX,
        _labels(_CHEX_LIKE),
        (0.09121389, 0.010573786, _NAN, 0.005023008, 0.003698257, _NAN, _NAN, 0.08001232, 0.037242252, _NAN,
         0.05006329, _NAN, _NAN, _NAN, 0.019866971, 0.03823637, 0.11303808, 0.0069147074),
        "mimic-cxr (chexpert labels)",
    ),
}  # fmt: skip


def thresholds_from_op_threshs(op_threshs: torch.Tensor | tuple[float, ...] | list[float]) -> list[float]:
    """torchxrayvision ``op_threshs`` as qing thresholds: NaN (untrained outputs) becomes 0.5."""
    values = op_threshs.tolist() if isinstance(op_threshs, torch.Tensor) else list(op_threshs)
    return [0.5 if math.isnan(t) else float(t) for t in values]


def is_xrv_densenet(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` is a torchxrayvision DenseNet121.

    True with an ``op_threshs`` buffer, or with a 1-channel stem and 18 outputs (the
    torchxrayvision shape; torchvision and timm DenseNets have 3 channels and 1000 outputs).
    """
    sd = normalize_densenet_keys(state_dict)
    if "features.conv0.weight" not in sd or "classifier.weight" not in sd:
        return False
    if "op_threshs" in sd:
        return True
    return sd["features.conv0.weight"].shape[1] == 1 and sd["classifier.weight"].shape[0] == len(XRV_PATHOLOGIES)


def convert_xrv_densenet(
    state_dict: Mapping[str, torch.Tensor], *, prefix: str = "backbone.", classifier: bool = False
) -> tuple[dict[str, torch.Tensor], Optional[list[float]]]:
    """Map torchxrayvision DenseNet121 weights onto timm's ``densenet121`` layout.

    The default output fits the (1-channel) DenseNet121 backbone of a qing densenet hybrid
    created with ``in_chans=1``; ``prefix="", classifier=True`` gives the full 18-way classifier
    of ``qing_xrv_densenet121``.

    Args:
        state_dict: ``xrv.models.DenseNet(...).state_dict()``.
        prefix: Prepended to every output key.
        classifier: Keep ``classifier.{weight,bias}``.

    Returns:
        ``(state_dict, thresholds)``: ``thresholds`` from the ``op_threshs`` buffer as
        probabilities (NaN -> 0.5), or ``None`` when the weights carry none.

    Raises:
        CheckpointError: Not a torchxrayvision DenseNet121.
    """
    sd = normalize_densenet_keys(state_dict)
    op_threshs = sd.pop("op_threshs", None)
    unknown = [k for k in sd if not k.startswith(("features.", "classifier."))]
    if unknown:
        raise CheckpointError(f"unexpected keys in torchxrayvision DenseNet weights: {unknown[:10]}")
    densenet_summary(sd, source="torchxrayvision weights")
    out = {prefix + k: v for k, v in sd.items() if classifier or not k.startswith("classifier.")}
    thresholds = thresholds_from_op_threshs(op_threshs) if op_threshs is not None else None
    return out, thresholds
