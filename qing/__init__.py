"""qing: a timm model zoo for chest X-ray classification.

Importing qing registers every ``qing_*`` architecture with timm, so ``timm.create_model``
works for them too. The training and data names load on first use, which keeps
``import qing`` as light as importing timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qing import models as models  # registers the qing_* architectures with timm
from qing._factory import create_model, from_pretrained, list_models, list_pretrained
from qing.hub import ModelSourceNotFoundError, push_to_hub, save_pretrained
from qing.meta import ModelMeta, get_meta, set_meta
from qing.models import CNNTransformer
from qing.version import __version__

if TYPE_CHECKING:
    from qing.convert import load_checkpoint_file
    from qing.data import DataConfig, build_datasets, build_transforms, load_image, load_splits, make_synthetic_cxr
    from qing.deploy import export_onnx
    from qing.train import Callback, NonFiniteLossError, RunResult, TrainConfig, Trainer


_LAZY = {
    "DataConfig": "qing.data",
    "build_datasets": "qing.data",
    "build_transforms": "qing.data",
    "load_image": "qing.data",
    "load_splits": "qing.data",
    "make_synthetic_cxr": "qing.data",
    "Callback": "qing.train",
    "NonFiniteLossError": "qing.train",
    "RunResult": "qing.train",
    "TrainConfig": "qing.train",
    "Trainer": "qing.train",
    "load_checkpoint_file": "qing.convert",
    "export_onnx": "qing.deploy",
}

__all__ = [
    "CNNTransformer",
    "Callback",
    "DataConfig",
    "ModelMeta",
    "ModelSourceNotFoundError",
    "NonFiniteLossError",
    "RunResult",
    "TrainConfig",
    "Trainer",
    "__version__",
    "build_datasets",
    "build_transforms",
    "create_model",
    "export_onnx",
    "from_pretrained",
    "get_meta",
    "list_models",
    "list_pretrained",
    "load_checkpoint_file",
    "load_image",
    "load_splits",
    "make_synthetic_cxr",
    "push_to_hub",
    "save_pretrained",
    "set_meta",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
