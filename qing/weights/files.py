"""Reading checkpoint files safely: safetensors or ``torch.load(weights_only=True)``, clear errors.

Every checkpoint qing reads goes through :func:`read_checkpoint`. PyTorch pickles are opened
with ``weights_only=True``, which only rebuilds tensors and plain containers. Pickled
torchxrayvision modules are read the same way, their classes replaced by inert stand-ins
(:mod:`qing.weights.pickled_modules`), so no code from them runs. A file that needs any other
Python object (a custom class, a function) is an *unsafe pickle*: it is refused with
:class:`UnsafeCheckpointError` unless the caller opts in with ``trust_pickle=True`` or the
environment variable ``QING_TRUST_PICKLE=1``. Unpickling such a file can run arbitrary code:
opt in only for files from a source you trust, and re-save them as safetensors
(:func:`qing.convert.load_checkpoint_file` + ``qing.save_pretrained``) so nobody has to again.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from qing.weights.pickled_modules import PICKLED_MODULE_CLASSES, PickledModule, load_pickled_module

__all__ = [
    "TRUST_PICKLE_ENV",
    "WRAPPER_PREFIXES",
    "CheckpointError",
    "UnsafeCheckpointError",
    "read_checkpoint",
    "read_state_dict",
    "strip_prefixes",
    "trust_pickle_enabled",
    "unwrap_state_dict",
]

_logger = logging.getLogger(__name__)

#: Environment variable that opts in to full unpickling (``1``/``true``/``yes``).
TRUST_PICKLE_ENV = "QING_TRUST_PICKLE"

#: Keys under which training scripts nest the model weights, most specific first.
STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "model_state_dict", "state_dict", "model", "net", "weights")

#: Key prefixes added by model wrappers: ``DataParallel``/``DistributedDataParallel`` and ``torch.compile``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_GLOBAL_NAME = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)")
# What torch's weights_only unpickler says when a pickle asks for more than tensors and containers
# (as opposed to a file that is not a pickle at all, or is cut short).
_UNSAFE_MARKERS = re.compile(
    r"GLOBAL|Can only create new object|Trying to call reduce|Can only build|"
    r"Can only append|Can only extend|Can only setitems|is not a tensor"
)
_DOTTED_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, corrupt, or of an unexpected layout."""


class UnsafeCheckpointError(CheckpointError):
    """A PyTorch pickle that needs arbitrary unpickling; refused unless explicitly trusted."""


def trust_pickle_enabled(trust_pickle: Optional[bool] = None) -> bool:
    """Whether full unpickling is allowed: ``trust_pickle`` if given, else ``$QING_TRUST_PICKLE``."""
    if trust_pickle is not None:
        return bool(trust_pickle)
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _is_safetensors(path: Path) -> bool:
    """Sniff the safetensors layout: an 8-byte little-endian header length, then a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}"
    return CheckpointError(
        f"cannot read checkpoint {path}: the file looks truncated or corrupt ({detail}). "
        "Expected a PyTorch checkpoint written by torch.save or a .safetensors file; "
        "download or copy it again."
    )


def _unsafe(path: Path, names: list[str]) -> UnsafeCheckpointError:
    names = sorted(set(names), key=lambda n: (n.startswith("torch."), n))  # the unusual classes first
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more classes" if len(names) > 5 else "")
    found = shown or "Python objects that are not tensors or plain containers"
    return UnsafeCheckpointError(
        f"refusing to unpickle {path}: unsafe pickle: it contains {found}. qing loads checkpoints with "
        "torch.load(weights_only=True) because unpickling other objects can run arbitrary code. "
        f"If you trust the source of this file, opt in explicitly with trust_pickle=True "
        f"(e.g. qing.weights.load_checkpoint_file(path, trust_pickle=True)) or the environment variable "
        f"{TRUST_PICKLE_ENV}=1, then save the converted model as safetensors with qing.save_pretrained."
    )


def _unsafe_globals(path: Path, err: BaseException) -> Optional[list[str]]:
    """Names of the non-allowlisted globals (maybe ``[]``), or ``None`` when the error is not about unsafe content."""
    names: list[str] = []
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) files cannot be scanned; fall back to the message
        names = []
    if names:
        return names
    names = [n for n in _GLOBAL_NAME.findall(str(err)) if _DOTTED_NAME.match(n)]
    if names or _UNSAFE_MARKERS.search(str(err)):
        return names
    if "Unsupported operand" in str(err) and _starts_like_a_pickle(path):
        return names  # a pickle (protocol 2+) using instructions the safe unpickler does not run; not garbage
    return None


def _starts_like_a_pickle(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(1) == b"\x80"  # pickle's PROTO opcode


def _load_pickled_module(path: Path, names: list[str]) -> tuple[Optional[Any], list[str]]:
    """The file read with stand-ins for pickled torchxrayvision modules, or ``(None, offending names)``.

    Legacy (non-zip) files name one unsupported global at a time, so a file whose first name is
    allowed is tried, and a name beyond the allow-list then fails the safe unpickler.
    """
    if not names or not set(names) <= PICKLED_MODULE_CLASSES:
        return None, [n for n in names if n not in PICKLED_MODULE_CLASSES]
    try:
        return load_pickled_module(path), []
    except pickle.UnpicklingError as err:
        found = _unsafe_globals(path, err) or []
        return None, [n for n in found if n not in PICKLED_MODULE_CLASSES]


def read_checkpoint(path: Union[str, Path], *, trust_pickle: Optional[bool] = None) -> Any:
    """Read a checkpoint file without running arbitrary code.

    ``.safetensors`` files (recognized by content, not name) load with ``safetensors``; anything
    else with ``torch.load(map_location="cpu", weights_only=True)``, which reads both the zip
    format and the legacy pre-1.6 format (e.g. CheXNet's ``model.pth.tar``).

    Args:
        path: The file.
        trust_pickle: Allow full unpickling for files that need it (arbitrary code execution).
            ``None`` reads the environment variable ``QING_TRUST_PICKLE``.

    A pickled torchxrayvision module is read as a tree of inert stand-ins
    (:class:`~qing.weights.pickled_modules.PickledModule`) without any trust: no code from the file
    runs and ``torchxrayvision`` is not imported.

    Returns:
        Whatever the file holds: a state dict, a training checkpoint dict, a
        :class:`~qing.weights.pickled_modules.PickledModule`, or (trusted pickles only) an ``nn.Module``.

    Raises:
        FileNotFoundError: No such file.
        UnsafeCheckpointError: An unsafe pickle (it needs arbitrary unpickling) that was not trusted.
        CheckpointError: The file is empty, truncated or not a checkpoint.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        where = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint file {path} {where}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise _corrupt(path, err) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = _unsafe_globals(path, err)
        if names is None:
            raise _corrupt(path, err) from err
        standing_in, beyond = _load_pickled_module(path, names)
        if standing_in is not None:
            return standing_in
        if not trust_pickle_enabled(trust_pickle):
            raise _unsafe(path, beyond or names) from err
    except Exception as err:  # zip reader errors, EOFError, KeyError from garbage, ...
        raise _corrupt(path, err) from err
    _logger.warning("Unpickling %s with weights_only=False (trusted by the caller): it may run code", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"cannot unpickle trusted checkpoint {path}: {type(err).__name__}: {err}") from err


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(checkpoint: Any, *, source: Union[str, Path] = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights inside what :func:`read_checkpoint` returned.

    Accepts a plain state dict, a training checkpoint that nests it (under ``state_dict``,
    ``model_state_dict``, ``model``, ... as in ``{"epoch": 3, "state_dict": ..., "optimizer": ...}``),
    a trusted, unpickled ``nn.Module`` or a :class:`~qing.weights.pickled_modules.PickledModule`.
    Non-tensor entries are ignored.

    Args:
        checkpoint: The loaded object.
        source: Name used in error messages (usually the file path).

    Returns:
        ``{name: tensor}`` with the original key names (prefixes such as ``module.`` are kept).

    Raises:
        CheckpointError: No tensors found.
    """
    if isinstance(checkpoint, (nn.Module, PickledModule)):
        return dict(checkpoint.state_dict())
    if isinstance(checkpoint, Mapping):
        for key in STATE_DICT_KEYS:
            inner = checkpoint.get(key)
            if isinstance(inner, (nn.Module, PickledModule)):
                return dict(inner.state_dict())
            if _is_tensor_mapping(inner):
                return dict(inner)
        tensors = {k: v for k, v in checkpoint.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        keys = ", ".join(map(str, list(checkpoint)[:10]))
        raise CheckpointError(
            f"{source} holds no model weights: a dict with keys [{keys}] and no tensor state dict "
            f"(looked for a state dict at the top level and under {', '.join(STATE_DICT_KEYS)})"
        )
    raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, not model weights (a dict of tensors)")


def strip_prefixes(state_dict: Mapping[str, Any], prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict[str, Any]:
    """The state dict with leading ``prefixes`` removed from every key, repeatedly (``module._orig_mod.x`` -> ``x``).

    Args:
        state_dict: Weights whose keys may start with wrapper prefixes.
        prefixes: Prefixes to remove; default :data:`WRAPPER_PREFIXES`.

    Returns:
        A new dict (tensors shared, not copied).

    Raises:
        CheckpointError: Two keys become the same after stripping.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key
        while new.startswith(prefixes):
            new = new[len(next(p for p in prefixes if new.startswith(p))) :]
        if new in out:
            raise CheckpointError(f"two tensors map to {new!r} after removing wrapper prefixes (one is {key!r})")
        out[new] = value
    return out


def read_state_dict(path: Union[str, Path], *, trust_pickle: Optional[bool] = None) -> dict[str, torch.Tensor]:
    """:func:`read_checkpoint` followed by :func:`unwrap_state_dict`."""
    return unwrap_state_dict(read_checkpoint(path, trust_pickle=trust_pickle), source=Path(path))
