"""Checkpoint adapters and qing's checked ``pretrained=True`` loading.

Foreign formats, each converted exactly (tested against the original implementations):

- CheXNet ``model.pth.tar``: :func:`convert_chexnet`, :func:`load_chexnet_file`;
- the original single-script hybrid: :func:`convert_original_hybrid`, :func:`load_original_hybrid_file`;
- torchxrayvision DenseNet121: :func:`convert_xrv_densenet`, :func:`load_xrv_file`;
- any of them, detected: :func:`load_checkpoint_file` (the dispatcher behind ``qing convert``).

Loading is safe by default: safetensors, or ``torch.load(weights_only=True)``; files that need
arbitrary unpickling are refused unless ``trust_pickle=True`` / ``QING_TRUST_PICKLE=1``
(:func:`read_checkpoint`). Weights that cannot be downloaded live in the qing weights directory,
``$QING_WEIGHTS_DIR`` (default ``~/.cache/qing/weights``): see :func:`weights_dir`.
"""

from qing.weights.chexnet import CHEXNET_FILE, CHEXNET_LABELS, convert_chexnet, is_chexnet
from qing.weights.convert import (
    ConvertedCheckpoint,
    load_checkpoint_file,
    load_chexnet_file,
    load_original_hybrid_file,
    load_xrv_file,
)
from qing.weights.files import (
    TRUST_PICKLE_ENV,
    CheckpointError,
    UnsafeCheckpointError,
    read_checkpoint,
    read_state_dict,
    unwrap_state_dict,
)
from qing.weights.filters import FORMATS, checkpoint_filter_fn, detect_format
from qing.weights.original import convert_original_hybrid, is_original_hybrid
from qing.weights.pretrained import WEIGHTS_DIR_ENV, LoadReport, WeightsNotFoundError, locate_weights, weights_dir
from qing.weights.xrv import XRV_MEAN, XRV_PATHOLOGIES, XRV_STD, XRV_WEIGHTS, convert_xrv_densenet, is_xrv_densenet

__all__ = [
    "CHEXNET_FILE",
    "CHEXNET_LABELS",
    "FORMATS",
    "TRUST_PICKLE_ENV",
    "WEIGHTS_DIR_ENV",
    "XRV_MEAN",
    "XRV_PATHOLOGIES",
    "XRV_STD",
    "XRV_WEIGHTS",
    "CheckpointError",
    "ConvertedCheckpoint",
    "LoadReport",
    "UnsafeCheckpointError",
    "WeightsNotFoundError",
    "checkpoint_filter_fn",
    "convert_chexnet",
    "convert_original_hybrid",
    "convert_xrv_densenet",
    "detect_format",
    "is_chexnet",
    "is_original_hybrid",
    "is_xrv_densenet",
    "load_checkpoint_file",
    "load_chexnet_file",
    "load_original_hybrid_file",
    "load_xrv_file",
    "locate_weights",
    "read_checkpoint",
    "read_state_dict",
    "unwrap_state_dict",
    "weights_dir",
]
