"""Checkpoints: a loadable qing model folder plus the training state, written atomically, no pickles.

A checkpoint folder (``checkpoints/best``, ``checkpoints/last``) is what
:func:`qing.hub.save_pretrained` writes (``model.safetensors``, ``config.json``, ``README.md``),
so ``qing.create_model("local-dir:.../best", pretrained=True)`` loads it, plus:

- ``training_state.safetensors``: every tensor of the training state (optimizer moments, EMA
  weights, ...), under path-like keys such as ``optimizer/state/3/exp_avg``;
- ``training_state.json``: the rest (epoch, step, history, scheduler and early-stopping state,
  optimizer hyper-parameters), with ``{"__tensor__": key}`` where a tensor was.

The whole folder is built beside the target and renamed into place, so a run killed at any
moment leaves either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
from huggingface_hub.constants import CONFIG_NAME, SAFETENSORS_SINGLE_FILE
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_bytes
from timm.utils import unwrap_model
from torch import nn

from qing._io import fsync_dir
from qing.hub import save_pretrained

__all__ = [
    "STATE_JSON",
    "STATE_TENSORS",
    "find_checkpoint",
    "load_model_weights",
    "load_training_state",
    "pack_state",
    "save_checkpoint",
    "unpack_state",
]

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


def pack_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, numbers) into JSON and tensors.

    Tensors become ``{"__tensor__": key}``, tuples ``{"__tuple__": [...]}``, dicts with
    non-string keys (e.g. optimizer state by parameter index) ``{"__items__": [[k, v], ...]}``
    and non-finite floats ``{"__float__": "inf"}``, so the JSON is strict and round-trips exactly.

    Returns:
        ``(json_value, tensors)``; :func:`unpack_state` inverts it.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = path.lstrip("/")
            tensors[key] = value.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {k: walk(v, f"{path}/{k}") for k, v in value.items()}
            return {"__items__": [[k, walk(v, f"{path}/{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, float) and not math.isfinite(value):
            return {"__float__": repr(value)}
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar
            return walk(value.item(), path)
        raise TypeError(f"training state at {path or '/'} holds a {type(value).__name__}; only tensors and JSON types")

    return walk(state, prefix), tensors


def unpack_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack_state`."""
    if isinstance(value, list):
        return [unpack_state(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(unpack_state(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {k: unpack_state(v, tensors) for k, v in value["__items__"]}
    if "__float__" in value:
        return float(value["__float__"])
    return {k: unpack_state(v, tensors) for k, v in value.items()}


def save_checkpoint(
    directory: Union[str, os.PathLike],
    model: nn.Module,
    *,
    label_names: list[str],
    data_config: dict[str, Any],
    training_state: Optional[dict[str, Any]] = None,
    model_card: bool = False,
    **card_fields: Any,
) -> Path:
    """Write a checkpoint folder atomically (see the module docs).

    Args:
        directory: Target folder (replaced when it holds an earlier checkpoint).
        model: The model to save (DDP/compile wrappers are unwrapped); its ``qing_meta`` is saved too.
        label_names: One name per output.
        data_config: Preprocessing to record in ``config.json`` (input size, mean, std, ...).
        training_state: Nested state with tensors (see :func:`pack_state`); ``None`` saves the model only.
        model_card: Write a ``README.md`` model card.
        **card_fields: Model card fields (see :func:`qing.hub.save_pretrained`).

    Returns:
        The folder.
    """
    model = unwrap_model(model)
    extra: dict[str, Union[str, bytes]] = {}
    if training_state is not None:
        packed, tensors = pack_state(training_state)
        extra[STATE_JSON] = json.dumps(packed, indent=1, allow_nan=False)
        extra[STATE_TENSORS] = save_safetensors_bytes(tensors) if tensors else save_safetensors_bytes({})
    return save_pretrained(
        model,
        directory,
        label_names=label_names,
        data_config=data_config,
        model_card=model_card,
        extra_files=extra,
        **card_fields,
    )


def find_checkpoint(
    directory: Union[str, os.PathLike], *, repair: bool = True, require_state: bool = False
) -> Optional[Path]:
    """The complete checkpoint at ``directory``, repairing an interrupted replacement.

    :func:`qing.hub.save_pretrained` builds a new folder beside the old one (``.<name>.*.tmp``),
    moves the old one aside (``.<name>.old-*``), renames the new one into place and then deletes
    the old one. A kill between the two renames leaves no ``directory``: the newest *complete*
    copy set aside is moved back (newest by the training state's epoch and step, else by time;
    a copy whose deletion was interrupted is incomplete and never chosen). Half-written staging
    folders and copies left aside beside a complete checkpoint are removed.

    Args:
        directory: The checkpoint folder (e.g. ``checkpoints/last``).
        repair: Move back and clean up as described; ``False`` only looks (processes other than
            the first of a ``torchrun`` job look, after the first one repaired).
        require_state: Complete means with a readable training state too (a ``last`` checkpoint).

    Returns:
        The folder, or ``None`` when there is no complete checkpoint.
    """
    directory = Path(directory)
    parent = directory.parent
    if repair and parent.is_dir():
        for staging in parent.glob(f".{directory.name}.*.tmp"):
            shutil.rmtree(staging, ignore_errors=True)
        aside = [p for p in parent.glob(f".{directory.name}.old-*") if p.is_dir()]
        if not directory.exists():
            complete = [p for p in aside if _complete(p, require_state)]
            if complete:
                newest = max(complete, key=_recency)
                os.replace(newest, directory)
                fsync_dir(parent)
                aside.remove(newest)
        if _complete(directory, require_state):
            for old in aside:  # older versions, or ones whose deletion was interrupted
                shutil.rmtree(old, ignore_errors=True)
    return directory if _complete(directory, require_state) else None


def _complete(folder: Path, require_state: bool) -> bool:
    """Every file of a checkpoint folder is there and readable (JSON parses, safetensors headers check out)."""
    try:
        json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        with safe_open(str(folder / SAFETENSORS_SINGLE_FILE), framework="pt") as f:
            f.keys()
        if require_state or (folder / STATE_JSON).exists():
            json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
            with safe_open(str(folder / STATE_TENSORS), framework="pt") as f:
                f.keys()
    except (OSError, ValueError, SafetensorError):
        return False
    return True


def _recency(folder: Path) -> tuple[int, int, float]:
    """(epoch, step, modification time) of a checkpoint folder, for choosing the newest copy."""
    try:
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        epoch, step = int(state.get("epoch", -1)), int(state.get("global_step", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        epoch, step = -1, -1
    return epoch, step, (folder / SAFETENSORS_SINGLE_FILE).stat().st_mtime


def load_model_weights(directory: Union[str, os.PathLike], model: nn.Module) -> None:
    """Load ``model.safetensors`` of a checkpoint into ``model`` (strict: every key must match)."""
    state = load_file(Path(directory) / SAFETENSORS_SINGLE_FILE)
    unwrap_model(model).load_state_dict(state, strict=True)


def load_training_state(directory: Union[str, os.PathLike]) -> dict[str, Any]:
    """The training state saved with a checkpoint.

    Raises:
        FileNotFoundError: The folder has no training state (e.g. a ``best`` checkpoint).
    """
    directory = Path(directory)
    if not (directory / STATE_JSON).is_file():
        raise FileNotFoundError(f"{directory} holds no {STATE_JSON}; it is not a resumable checkpoint")
    tensors = load_safetensors_bytes((directory / STATE_TENSORS).read_bytes())
    return unpack_state(json.loads((directory / STATE_JSON).read_text()), tensors)
