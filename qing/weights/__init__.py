"""Reading checkpoint files safely, converting foreign formats, and locating weight files.

Formats, each converted exactly (tested against the original implementations):

- CheXNet ``model.pth.tar``: :func:`convert_chexnet`;
- the original single-script hybrid: :func:`convert_original_hybrid`;
- torchxrayvision DenseNet121: :func:`convert_xrv_densenet`;
- any of them onto a qing model, detected: :func:`detect_format`, :func:`convert_for_hybrid`,
  :func:`convert_for_densenet` (the converters the model builder runs).

Loading is safe by default: safetensors, or ``torch.load(weights_only=True)``; files that need
arbitrary unpickling are refused unless ``trust_pickle=True`` / ``QING_TRUST_PICKLE=1``
(:func:`read_checkpoint`). Weights that cannot be downloaded live in the qing weights directory,
``$QING_WEIGHTS_DIR`` (default ``~/.cache/qing/weights``): see :func:`weights_dir` and
:func:`locate_weights`. Turning a file into a qing model folder is :mod:`qing.convert`'s job.
"""

from qing.weights.chexnet import CHEXNET_FILE, CXR14_LABELS, convert_chexnet, is_chexnet
from qing.weights.files import (
    TRUST_PICKLE_ENV,
    WRAPPER_PREFIXES,
    CheckpointError,
    UnsafeCheckpointError,
    read_checkpoint,
    read_state_dict,
    strip_prefixes,
    unwrap_state_dict,
)
from qing.weights.formats import (
    FORMATS,
    Conversion,
    Converter,
    convert_for_densenet,
    convert_for_hybrid,
    detect_format,
    summarize_keys,
)
from qing.weights.locate import (
    WEIGHTS_DIR_ENV,
    WeightsNotFoundError,
    hub_cached,
    locate_weights,
    not_found_error,
    weights_dir,
    weights_name,
)
from qing.weights.original import ORIGINAL_PREPROCESSING, convert_original_hybrid, is_original_hybrid
from qing.weights.xrv import XRV_MEAN, XRV_PATHOLOGIES, XRV_STD, XRV_WEIGHTS, convert_xrv_densenet, is_xrv_densenet

__all__ = [
    "CHEXNET_FILE",
    "CXR14_LABELS",
    "FORMATS",
    "ORIGINAL_PREPROCESSING",
    "TRUST_PICKLE_ENV",
    "WEIGHTS_DIR_ENV",
    "WRAPPER_PREFIXES",
    "XRV_MEAN",
    "XRV_PATHOLOGIES",
    "XRV_STD",
    "XRV_WEIGHTS",
    "CheckpointError",
    "Conversion",
    "Converter",
    "UnsafeCheckpointError",
    "WeightsNotFoundError",
    "convert_chexnet",
    "convert_for_densenet",
    "convert_for_hybrid",
    "convert_original_hybrid",
    "convert_xrv_densenet",
    "detect_format",
    "hub_cached",
    "is_chexnet",
    "is_original_hybrid",
    "is_xrv_densenet",
    "locate_weights",
    "not_found_error",
    "read_checkpoint",
    "read_state_dict",
    "strip_prefixes",
    "summarize_keys",
    "unwrap_state_dict",
    "weights_dir",
    "weights_name",
]
