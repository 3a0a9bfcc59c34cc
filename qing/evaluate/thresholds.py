"""Decision thresholds chosen on validation data, to be applied unchanged to test data.

Two rules, both read off ``sklearn.metrics.roc_curve`` (all distinct scores as candidates,
``drop_intermediate=False``; a sample is positive when ``prob >= threshold``):

- ``"youden"``: maximize Youden's J = sensitivity + specificity - 1. Among equally good
  thresholds the **highest** is chosen (fewest false positives at the same J).
- ``"sensitivity"``: the **highest** threshold whose sensitivity reaches
  ``target_sensitivity`` -- the best specificity among operating points that miss at most
  ``1 - target_sensitivity`` of the positives (a screening setting).

The chosen threshold is always one of the validation scores. Store it with the model
(``qing.meta.set_meta(model, thresholds=..., threshold_method=threshold_method_name(...))``)
so prediction uses it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from sklearn.metrics import roc_curve

from qing.evaluate._inputs import check_inputs

__all__ = ["THRESHOLD_METHODS", "choose_thresholds", "threshold_method_name"]

#: Accepted ``method`` values of :func:`choose_thresholds`.
THRESHOLD_METHODS = ("youden", "sensitivity")

#: Threshold used for an output whose validation targets hold a single class.
FALLBACK_THRESHOLD = 0.5


def threshold_method_name(method: str, target_sensitivity: Optional[float] = None) -> str:
    """Short record of a threshold rule for ``ModelMeta.threshold_method`` and reports.

    Returns:
        ``"youden"`` or ``"sensitivity@0.90"`` (two decimals).
    """
    _check_method(method, target_sensitivity)
    return "youden" if method == "youden" else f"sensitivity@{target_sensitivity:.2f}"


def _check_method(method: str, target_sensitivity: Optional[float]) -> None:
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"method={method!r} is not one of {THRESHOLD_METHODS}")
    if method == "sensitivity":
        if target_sensitivity is None:
            raise ValueError("method='sensitivity' needs target_sensitivity, e.g. target_sensitivity=0.9")
        if not 0.0 < target_sensitivity <= 1.0:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    elif target_sensitivity is not None:
        raise ValueError(f"target_sensitivity={target_sensitivity} is only used with method='sensitivity'")


def _threshold_for(y: np.ndarray, p: np.ndarray, method: str, target_sensitivity: Optional[float], name: str) -> float:
    fpr, tpr, candidates = roc_curve(y, p, drop_intermediate=False)
    # candidates[0] is +inf (nothing positive); the others are the distinct scores, decreasing
    fpr, tpr, candidates = fpr[1:], tpr[1:], candidates[1:]
    if method == "youden":
        youden_j = tpr - fpr
        best = int(np.argmax(youden_j))  # first maximum = highest threshold
        if youden_j[best] <= 0:
            warnings.warn(
                f"{name}: no threshold beats chance on the validation data (max Youden J = {youden_j[best]:.3f})",
                stacklevel=3,
            )
        return float(candidates[best])
    reached = np.flatnonzero(tpr >= target_sensitivity - 1e-12)
    return float(candidates[reached[0]])  # the lowest score reaches sensitivity 1, so never empty


def choose_thresholds(
    targets: Any,
    probs: Any,
    *,
    task: str,
    method: str = "youden",
    target_sensitivity: Optional[float] = None,
    label_names: Optional[Sequence[str]] = None,
) -> list[float]:
    """One decision threshold per output column, chosen on validation data.

    See the module docstring for the rules. An output whose targets hold only one class
    has no ROC curve: it gets 0.5 and a ``UserWarning`` naming it.

    Args:
        targets: ``(N, C)`` 0/1 targets (``(N,)`` for binary) or ``(N,)`` class indices (multiclass).
        probs: ``(N, C)`` probabilities.
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        method: ``"youden"`` or ``"sensitivity"``.
        target_sensitivity: Required for ``method="sensitivity"``, in ``(0, 1]`` (e.g. 0.9).
        label_names: Names used in warnings (default ``output 0, output 1, ...``).

    Returns:
        ``C`` thresholds on the probability scale (``[]`` for multiclass, which uses argmax).
    """
    _check_method(method, target_sensitivity)
    y, p = check_inputs(targets, probs, task=task, label_names=label_names)
    if task == "multiclass":
        return []
    names = list(label_names) if label_names is not None else [f"output {j}" for j in range(p.shape[1])]
    thresholds = []
    for j, name in enumerate(names):
        n_pos = int(y[:, j].sum())
        if n_pos in (0, len(y)):
            warnings.warn(
                f"{name}: validation targets are all {'negative' if n_pos == 0 else 'positive'}; "
                f"no threshold can be chosen, using {FALLBACK_THRESHOLD}",
                stacklevel=2,
            )
            thresholds.append(FALLBACK_THRESHOLD)
        else:
            thresholds.append(_threshold_for(y[:, j], p[:, j], method, target_sensitivity, name))
    return thresholds
