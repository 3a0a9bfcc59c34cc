"""Reading checkpoint files safely, converting foreign formats, and locating weight files.

Formats, each converted exactly (tested against the original implementations):

- CheXNet ``model.pth.tar``: :func:`convert_chexnet`;
- the original single-script hybrid: :func:`convert_original_hybrid`;
- torchxrayvision DenseNet121: :func:`convert_xrv_densenet`;
- any of them onto a qing model, detected: :func:`detect_format`, :func:`convert_for_hybrid`,
  :func:`convert_for_densenet` (the converters the model builder runs).

Loading is safe by default: safetensors, or ``torch.load(weights_only=True)`` (pickled
torchxrayvision modules through inert stand-ins); files that need arbitrary unpickling are refused
unless ``trust_pickle=True`` / ``QING_TRUST_PICKLE=1`` (:func:`read_checkpoint`). Published weights
are downloaded on first use into the qing weights directory, ``$QING_WEIGHTS_DIR`` (default
``~/.cache/qing/weights``), and checked against their integrity record on every load: see
:func:`download_weights`, :func:`verify_integrity`, :func:`weights_dir` and :func:`locate_weights`.
Turning a file into a qing model folder is :mod:`qing.convert`'s job.
"""

from qing.weights.chexnet import CHEXNET_FILE, CXR14_LABELS, convert_chexnet, is_chexnet
from qing.weights.download import (
    IntegrityRecord,
    WeightsDownloadError,
    WeightsIntegrityError,
    download_weights,
    integrity_record_path,
    verify_integrity,
)
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
    OFFLINE_ENV,
    WEIGHTS_DIR_ENV,
    WeightsNotFoundError,
    download_path,
    hub_cached,
    locate_weights,
    not_found_error,
    offline_mode,
    split_sha256,
    weights_dir,
    weights_name,
)
from qing.weights.original import ORIGINAL_PREPROCESSING, convert_original_hybrid, is_original_hybrid
from qing.weights.pickled_modules import PickledModule
from qing.weights.xrv import XRV_MEAN, XRV_PATHOLOGIES, XRV_STD, XRV_WEIGHTS, convert_xrv_densenet, is_xrv_densenet

__all__ = [
    "CHEXNET_FILE",
    "CXR14_LABELS",
    "FORMATS",
    "OFFLINE_ENV",
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
    "IntegrityRecord",
    "PickledModule",
    "UnsafeCheckpointError",
    "WeightsDownloadError",
    "WeightsIntegrityError",
    "WeightsNotFoundError",
    "convert_chexnet",
    "convert_for_densenet",
    "convert_for_hybrid",
    "convert_original_hybrid",
    "convert_xrv_densenet",
    "detect_format",
    "download_path",
    "download_weights",
    "hub_cached",
    "integrity_record_path",
    "is_chexnet",
    "is_original_hybrid",
    "is_xrv_densenet",
    "locate_weights",
    "not_found_error",
    "offline_mode",
    "read_checkpoint",
    "read_state_dict",
    "split_sha256",
    "strip_prefixes",
    "summarize_keys",
    "unwrap_state_dict",
    "verify_integrity",
    "weights_dir",
    "weights_name",
]
