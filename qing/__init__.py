"""qing: a timm model zoo for chest X-ray classification."""

from qing import models as models  # registers the qing_* architectures with timm
from qing._factory import create_model, list_models, list_pretrained
from qing.models import CNNTransformer

__version__ = "0.1.0"

__all__ = ["CNNTransformer", "__version__", "create_model", "list_models", "list_pretrained"]
