"""Checks and conversions shared by the metrics, threshold and plotting functions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from qing.meta import TASKS

__all__ = ["as_2d_float", "as_numpy", "check_inputs", "check_task", "jsonable"]


def as_numpy(x: Any) -> np.ndarray:
    """A numpy array from a numpy array, a list or a (possibly bf16, CUDA) torch tensor."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def as_2d_float(x: Any, name: str, task: str) -> np.ndarray:
    """``x`` as a float64 ``(N, C)`` array (``(N,)`` accepted for binary); ``ValueError`` naming ``name`` otherwise."""
    check_task(task)
    a = as_numpy(x).astype(np.float64, copy=False)
    if task == "binary" and a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, C), got shape {list(a.shape)}")
    return a


def check_task(task: str) -> None:
    """Raise ``ValueError`` unless ``task`` is one of ``qing.meta.TASKS``."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {TASKS}")


def check_inputs(
    targets: Any, probs: Any, *, task: str, label_names: Optional[Sequence[str]] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate targets and probabilities and bring them to one shape.

    Args:
        targets: ``(N, C)`` 0/1 for binary (``(N,)`` also accepted) and multilabel;
            ``(N,)`` class indices for multiclass.
        probs: ``(N, C)`` probabilities (binary: ``C == 1``, ``(N,)`` also accepted).
        task: One of ``"binary"``, ``"multilabel"``, ``"multiclass"``.
        label_names: If given, must have ``C`` entries.

    Returns:
        ``(indicator, probs)``: ``(N, C)`` int64 0/1 targets (one-hot for multiclass) and
        ``(N, C)`` float64 probabilities.

    Raises:
        ValueError: naming the argument, the expected shape or range and what was found.
    """
    p = as_2d_float(probs, "probs", task)
    n, c = p.shape
    if n == 0:
        raise ValueError("probs has no samples (N == 0); nothing to evaluate")
    if task == "binary" and c != 1:
        raise ValueError(f"task='binary' expects probs of shape (N, 1) (one sigmoid output), got {list(p.shape)}")
    if task == "multiclass" and c < 2:
        raise ValueError(f"task='multiclass' expects probs of shape (N, C) with C >= 2, got {list(p.shape)}")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(
            f"probs must be finite probabilities in [0, 1], found values in [{np.nanmin(p)}, {np.nanmax(p)}]"
            + (" and NaN/inf" if not np.isfinite(p).all() else "")
            + "; convert logits with qing.evaluate.probabilities(logits, task) first"
        )
    if label_names is not None and len(label_names) != c:
        raise ValueError(f"{len(label_names)} label_names for {c} output column(s) in probs")

    t = as_numpy(targets)
    if task == "multiclass":
        if t.shape != (n,):
            raise ValueError(f"multiclass targets must be class indices of shape ({n},), got shape {list(t.shape)}")
        if not np.all(np.equal(np.mod(t, 1), 0)) or t.min() < 0 or t.max() >= c:
            raise ValueError(
                f"multiclass targets must be integers in [0, {c - 1}], found values in [{t.min()}, {t.max()}]"
            )
        indicator = np.zeros((n, c), dtype=np.int64)
        indicator[np.arange(n), t.astype(np.int64)] = 1
        return indicator, p
    if task == "binary" and t.ndim == 1:
        t = t[:, None]
    if t.shape != (n, c):
        raise ValueError(f"{task} targets must have shape ({n}, {c}) like probs, got {list(t.shape)}")
    if not np.isin(t, (0, 1)).all():
        raise ValueError(f"{task} targets must be 0/1, found values {sorted(np.unique(t).tolist())[:10]}")
    return t.astype(np.int64), p


def jsonable(obj: Any) -> Any:
    """Plain Python types for ``json.dump``: numpy scalars/arrays converted, NaN and inf become ``None``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
