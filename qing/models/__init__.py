"""Model families. Importing this package registers every ``qing_*`` model with timm."""

from qing.models import chexnet as chexnet  # plain DenseNet121 baselines: CheXNet, torchxrayvision
from qing.models.cnn_transformer import CXR14_LABELS, CNNTransformer

__all__ = ["CXR14_LABELS", "CNNTransformer"]
