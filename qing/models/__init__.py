"""Model families and qing's model builder. Importing this package registers every ``qing_*`` model with timm.

- :mod:`qing.models.cnn_transformer`: the CNN-Transformer hybrids (:class:`CNNTransformer`);
- :mod:`qing.models.cxr_densenet`: the plain DenseNet121 baselines, CheXNet and torchxrayvision's.

Both build through :func:`build_model_with_weights`, whose ``pretrained=True`` finds, converts and
checks the weights and records what happened in a :class:`LoadReport` on ``model.qing_load_report``.
"""

from qing.models import cxr_densenet as cxr_densenet  # registers the DenseNet121 baselines
from qing.models._builder import (
    CheckpointFilter,
    LoadReport,
    build_model_with_weights,
    checkpoint_filter_fn,
    pretrained_cfg_dict,
)
from qing.models.cnn_transformer import CNNTransformer

__all__ = [
    "CNNTransformer",
    "CheckpointFilter",
    "LoadReport",
    "build_model_with_weights",
    "checkpoint_filter_fn",
    "pretrained_cfg_dict",
]
