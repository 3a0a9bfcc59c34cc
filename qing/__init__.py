"""qing: a timm model zoo for chest X-ray classification.

Importing qing registers every ``qing_*`` architecture with timm, so ``timm.create_model``
works for them too.
"""

from qing import models as models  # registers the qing_* architectures with timm
from qing._factory import create_model, list_models, list_pretrained
from qing.hub import ModelSourceNotFoundError, from_pretrained, push_to_hub, save_pretrained
from qing.meta import ModelMeta, get_meta, set_meta
from qing.models import CNNTransformer

__version__ = "0.1.0"

__all__ = [
    "CNNTransformer",
    "ModelMeta",
    "ModelSourceNotFoundError",
    "__version__",
    "create_model",
    "from_pretrained",
    "get_meta",
    "list_models",
    "list_pretrained",
    "push_to_hub",
    "save_pretrained",
    "set_meta",
]
