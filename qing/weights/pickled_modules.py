"""Reading pickled ``nn.Module`` files (torchxrayvision's releases) without running code from them.

torchxrayvision publishes its weights as ``torch.save(model)`` of a whole ``DenseNet`` module. Unpickling
such a file normally imports ``torchxrayvision`` and rebuilds its classes, and any pickle can name other
callables too. qing instead reads the file with ``torch.load(weights_only=True)`` and registers, under each
allowed class name, an inert stand-in class (:class:`PickledModule`) through ``torch.serialization.safe_globals``:

- the unpickler creates stand-ins with ``object.__new__`` and fills their ``__dict__``; no method of the
  file's classes exists, so none runs, and ``torchxrayvision`` need not be installed (it is never imported);
- only the names in :data:`PICKLED_MODULE_CLASSES` are accepted; any other global (a function such as
  ``os.system``, another class) is refused by torch's safe unpickler exactly as before;
- files in PyTorch's legacy (pre-1.6, non-zip) format record each module class as a persistent id that
  ``weights_only=True`` does not accept; they are read by ``torch.load`` with a restricted unpickler
  whose ``find_class`` returns only the same stand-ins and the globals torch's own ``weights_only``
  unpickler allows, so the allow-list is the same for both formats;
- :meth:`PickledModule.state_dict` walks the stand-ins' ``_parameters``, ``_buffers`` and ``_modules``
  (qing's code, not the file's) and returns the tensors under their usual state-dict names.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import pickle
import types
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["PICKLED_MODULE_CLASSES", "PickledModule", "load_pickled_module", "pickled_module_globals"]

#: Class names a pickled torchxrayvision DenseNet is made of: its own classes and the torch layers it uses.
PICKLED_MODULE_CLASSES = frozenset({
    "torchxrayvision.models.DenseNet",
    "torchxrayvision.models._DenseBlock",
    "torchxrayvision.models._DenseLayer",
    "torchxrayvision.models._Transition",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.container.ModuleDict",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.pooling.AvgPool2d",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
})  # fmt: skip


class PickledModule:
    """An inert stand-in for a pickled ``nn.Module``: its attributes as the file holds them, no behaviour.

    Attributes:
        pickled_class: The class name the file gave (e.g. ``"torchxrayvision.models.DenseNet"``).
    """

    pickled_class = "?"

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors of this module and its children under ``nn.Module.state_dict`` names.

        Non-persistent buffers are left out, as ``nn.Module.state_dict`` does.
        """
        out: dict[str, torch.Tensor] = {}
        state = vars(self)
        skip = state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            for name, value in _mapping(state.get(group)).items():
                if isinstance(value, torch.Tensor) and not (group == "_buffers" and name in skip):
                    out[prefix + name] = value.detach() if isinstance(value, torch.nn.Parameter) else value
        for name, child in _mapping(state.get("_modules")).items():
            if isinstance(child, PickledModule):
                out.update(child.state_dict(f"{prefix}{name}."))
        return out

    def __repr__(self) -> str:
        return f"PickledModule({self.pickled_class}, {len(self.state_dict())} tensors)"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _stand_in(full_name: str) -> type[PickledModule]:
    return type(full_name.rsplit(".", 1)[-1], (PickledModule,), {"pickled_class": full_name, "__module__": __name__})


_STAND_INS = {name: _stand_in(name) for name in sorted(PICKLED_MODULE_CLASSES)}


@contextlib.contextmanager
def pickled_module_globals() -> Iterator[None]:
    """Within the block, ``torch.load(weights_only=True)`` turns the allowed module classes into stand-ins."""
    with torch.serialization.safe_globals([(cls, name) for name, cls in _STAND_INS.items()]):
        yield


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only stand-ins and the globals of torch's ``weights_only`` allow-list."""

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles name Python 2 modules (``__builtin__.set``); map them as pickle itself does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full_name = f"{module}.{name}"
        if full_name in _STAND_INS:
            return _STAND_INS[full_name]
        allowed = torch._weights_only_unpickler._get_allowed_globals()
        if full_name in allowed:
            return allowed[full_name]
        raise pickle.UnpicklingError(
            f"Unsupported global: GLOBAL {full_name} (not a tensor or an allowed module class)"
        )


_RESTRICTED_PICKLE = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler,
    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load(),
    __name__="qing_restricted",
)


def load_pickled_module(path: Path) -> Any:
    """Read a pickled module file with stand-ins for the allowed module classes; nothing else is accepted.

    Args:
        path: A ``torch.save(module)`` file, zip or legacy format.

    Returns:
        What the file holds, every allowed module replaced by a :class:`PickledModule`.

    Raises:
        pickle.UnpicklingError: The file names a global beyond the allow-list (the message names it).
    """
    if zipfile.is_zipfile(path):
        with pickled_module_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():  # torch warns that it cannot compare the stand-ins' (absent) source code
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
