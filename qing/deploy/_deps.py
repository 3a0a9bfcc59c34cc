"""The optional packages of qing.deploy, imported when first needed with an error that says how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

_EXTRA = "pip install 'qing[onnx]'"


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` (``onnx``, ``onnxruntime``, ...) or raise an ImportError naming the extra.

    Args:
        module: The module to import.
        what: What needs it, for the message (e.g. ``"ONNX export"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{what} needs the {module.split('.')[0]} package: {_EXTRA}") from err
