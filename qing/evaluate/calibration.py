"""Calibration: how far predicted probabilities are from observed frequencies, and temperature scaling.

A model is calibrated when, among the images it gives probability ``p``, a fraction ``p`` are positive.
Three numbers per output (one-vs-rest for multiclass) say how far it is:

- **ECE** (expected calibration error), 15 equal-width bins of the probability: the sample-weighted
  mean of ``|fraction positive - mean probability|`` over the bins,
  ``sum_b n_b / N * |mean(y_b) - mean(p_b)|``;
- **equal-mass ECE**: the same over 15 bins holding about ``N / 15`` samples each (edges at the
  quantiles of the probabilities), steadier when most probabilities crowd near 0 or 1;
- **Brier score**: ``mean((p - y)^2)``, calibration and discrimination together (0 is perfect; always
  predicting the prevalence ``pi`` scores ``pi * (1 - pi)``).

Bins follow ``sklearn.calibration.calibration_curve`` exactly (same edges, a probability on an edge
goes to the lower bin), so its curve and these numbers agree.

**Temperature scaling** (Guo et al., 2017) divides the logits by a temperature ``T > 0`` fitted on
validation data by minimizing the negative log-likelihood: one ``T`` per sigmoid output, one shared
``T`` for a softmax. ``T > 1`` softens over-confident probabilities, ``T < 1`` sharpens timid ones.
The ranking of images per output does not change, so AUROC, PR-AUC and the decisions at
correspondingly mapped thresholds stay the same; only the probabilities move.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.metrics import brier_score_loss

from qing.evaluate._inputs import as_2d_float, as_numpy, check_task

__all__ = [
    "CALIBRATION_BINS",
    "TEMPERATURE_BOUNDS",
    "apply_temperatures",
    "calibration_bins",
    "calibration_scores",
    "expected_calibration_error",
    "fit_temperatures",
    "temperature_nll",
]

#: Bins of the ECE and of the reliability diagrams.
CALIBRATION_BINS = 15

#: The search interval of :func:`fit_temperatures`; a fit that ends on a bound is warned about.
TEMPERATURE_BOUNDS = (0.05, 20.0)

_STRATEGIES = ("uniform", "quantile")


def _binary_pair(targets: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    y = as_numpy(targets).reshape(-1)
    p = as_numpy(probs).astype(np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"targets and probs differ in length: {len(y)} vs {len(p)}")
    if len(y) == 0:
        raise ValueError("no samples: calibration needs at least one (target, probability) pair")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"targets must be 0/1, found {sorted(np.unique(y).tolist())[:10]}")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probs must be finite probabilities in [0, 1]")
    return y.astype(np.float64), p


def calibration_bins(
    targets: Any, probs: Any, *, n_bins: int = CALIBRATION_BINS, strategy: str = "uniform"
) -> dict[str, list[float]]:
    """The reliability table of one binary output: per non-empty bin, its count and means.

    Args:
        targets: ``(N,)`` 0/1 labels.
        probs: ``(N,)`` predicted probabilities of the positive class.
        n_bins: Number of bins.
        strategy: ``"uniform"`` (equal-width bins over ``[0, 1]``) or ``"quantile"`` (edges at the
            ``k / n_bins`` quantiles of ``probs``: about equal counts; tied probabilities share a bin).

    Returns:
        ``{"edges": n_bins + 1 floats, "count": [...], "mean_prob": [...], "frac_pos": [...]}``; the
        last three have one entry per **non-empty** bin, in increasing order, as
        ``sklearn.calibration.calibration_curve`` returns ``prob_pred`` and ``prob_true``.
    """
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {_STRATEGIES}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _binary_pair(targets, probs)
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    else:
        edges = np.percentile(p, np.linspace(0.0, 100.0, n_bins + 1))
    ids = np.searchsorted(edges[1:-1], p)  # sklearn's rule: a probability on an inner edge goes below it
    count = np.bincount(ids, minlength=n_bins)
    sum_p = np.bincount(ids, weights=p, minlength=n_bins)
    sum_y = np.bincount(ids, weights=y, minlength=n_bins)
    full = count > 0
    return {
        "edges": edges.tolist(),
        "count": count[full].astype(int).tolist(),
        "mean_prob": (sum_p[full] / count[full]).tolist(),
        "frac_pos": (sum_y[full] / count[full]).tolist(),
    }


def expected_calibration_error(
    targets: Any, probs: Any, *, n_bins: int = CALIBRATION_BINS, strategy: str = "uniform"
) -> float:
    """ECE of one binary output: ``sum_b n_b / N * |fraction positive in b - mean probability in b|``.

    Args:
        targets: ``(N,)`` 0/1 labels.
        probs: ``(N,)`` predicted probabilities.
        n_bins: Number of bins (15 in qing's reports).
        strategy: ``"uniform"`` (equal width) or ``"quantile"`` (equal mass); see :func:`calibration_bins`.

    Returns:
        The ECE in ``[0, 1]``.
    """
    table = calibration_bins(targets, probs, n_bins=n_bins, strategy=strategy)
    count = np.asarray(table["count"], dtype=np.float64)
    gaps = np.abs(np.asarray(table["frac_pos"]) - np.asarray(table["mean_prob"]))
    return float((count * gaps).sum() / count.sum())


def calibration_scores(targets: Any, probs: Any, *, n_bins: int = CALIBRATION_BINS) -> dict[str, float]:
    """ECE (equal-width and equal-mass bins) and Brier score of one binary output.

    Args:
        targets: ``(N,)`` 0/1 labels.
        probs: ``(N,)`` predicted probabilities.
        n_bins: Bins of both ECEs.

    Returns:
        ``{"ece", "ece_equal_mass", "brier"}``.
    """
    y, p = _binary_pair(targets, probs)
    return {
        "ece": expected_calibration_error(y, p, n_bins=n_bins, strategy="uniform"),
        "ece_equal_mass": expected_calibration_error(y, p, n_bins=n_bins, strategy="quantile"),
        "brier": float(brier_score_loss(y, p, pos_label=1)),
    }


def apply_temperatures(logits: Any, temperatures: Optional[Sequence[float]], *, task: str) -> np.ndarray:
    """``logits / T`` per output column.

    Args:
        logits: ``(N, C)`` logits (``(N,)`` accepted for binary).
        temperatures: ``C`` positive temperatures, or ``None`` (returned unchanged, as float64).
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.

    Returns:
        float64 ``(N, C)``.
    """
    z = as_2d_float(logits, "logits", task)
    if temperatures is None:
        return z
    t = np.asarray([float(v) for v in temperatures], dtype=np.float64)
    if t.shape != (z.shape[1],):
        raise ValueError(f"{len(t)} temperatures for {z.shape[1]} output column(s)")
    if not (np.isfinite(t).all() and (t > 0).all()):
        raise ValueError(f"temperatures must be finite and > 0, got {t.tolist()}")
    return z / t[None, :]


def temperature_nll(logits: Any, targets: Any, temperature: float, *, task: str) -> float:
    """Mean negative log-likelihood of ``targets`` under ``logits / temperature``.

    Sigmoid tasks: the mean binary cross-entropy over samples of one output (pass one column);
    multiclass: the mean cross-entropy of the softmax over all columns.

    Args:
        logits: ``(N,)`` or ``(N, 1)`` logits of one sigmoid output, or ``(N, C)`` multiclass logits.
        targets: ``(N,)`` 0/1 labels, or ``(N,)`` class indices for multiclass.
        temperature: ``T > 0``.
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
    """
    z = as_2d_float(logits, "logits", "binary" if task != "multiclass" else task) / float(temperature)
    y = as_numpy(targets).reshape(-1)
    if task == "multiclass":
        return float(-log_softmax(z, axis=1)[np.arange(len(y)), y.astype(np.int64)].mean())
    z = z[:, 0]
    return float(np.mean(np.logaddexp(0.0, z) - y * z))  # softplus(z) - y z = BCE(sigmoid(z), y)


def _fit_one(nll: Any, name: str) -> float:
    low, high = TEMPERATURE_BOUNDS
    # the NLL is convex in 1/T, so unimodal in log T: a bounded Brent search finds its minimum
    result = minimize_scalar(
        lambda log_t: nll(math.exp(log_t)),
        bounds=(math.log(low), math.log(high)),
        method="bounded",
        options={"xatol": 1e-7},
    )
    temperature = math.exp(float(result.x))
    if temperature < low * 1.001 or temperature > high / 1.001:
        warnings.warn(
            f"{name}: the fitted temperature {temperature:.3g} is at the bound of {TEMPERATURE_BOUNDS} "
            "(validation data separable or anti-correlated with the logits); the calibration is unreliable",
            stacklevel=3,
        )
    return temperature


def fit_temperatures(
    logits: Any, targets: Any, *, task: str, label_names: Optional[Sequence[str]] = None
) -> list[float]:
    """Temperatures minimizing the validation negative log-likelihood of ``logits / T``.

    One ``T`` per output for ``"binary"`` and ``"multilabel"`` (each output's binary cross-entropy),
    one shared ``T`` for ``"multiclass"`` (the softmax cross-entropy; the argmax is unchanged), repeated
    for every output. The search runs over ``log T`` in :data:`TEMPERATURE_BOUNDS` (bounded Brent, to
    ``1e-7`` in ``log T``). An output whose targets hold one class, or whose logits are all equal,
    keeps ``T = 1`` with a ``UserWarning``.

    Args:
        logits: ``(N, C)`` validation logits (``(N,)`` accepted for binary).
        targets: ``(N, C)`` 0/1 targets, or ``(N,)`` class indices for multiclass.
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        label_names: Names for the warnings (default ``output 0``, ``output 1``, ...).

    Returns:
        ``C`` temperatures.
    """
    check_task(task)
    z = as_2d_float(logits, "logits", task)
    if not np.isfinite(z).all():
        raise ValueError(f"logits contain {int((~np.isfinite(z)).sum())} NaN/inf value(s)")
    n, c = z.shape
    names = list(label_names) if label_names is not None else [f"output {j}" for j in range(c)]
    y = as_numpy(targets)
    if task == "multiclass":
        y = y.reshape(-1).astype(np.int64)
        if y.shape != (n,) or y.min() < 0 or y.max() >= c:
            raise ValueError(f"multiclass targets must be {n} class indices in [0, {c - 1}]")
        if len(np.unique(y)) < 2 or np.ptp(z, axis=0).max() == 0:
            warnings.warn("one class only or constant logits: temperature 1 kept", stacklevel=2)
            return [1.0] * c
        return [_fit_one(lambda t: temperature_nll(z, y, t, task=task), "softmax")] * c
    y = y.reshape(n, -1) if y.ndim > 1 or task == "binary" else y
    if y.shape != (n, c):
        raise ValueError(f"{task} targets must have shape ({n}, {c}) like the logits, got {list(y.shape)}")
    temperatures = []
    for j in range(c):
        column, target = z[:, j], y[:, j].astype(np.float64)
        if target.min() == target.max() or column.min() == column.max():
            why = "validation targets hold one class" if target.min() == target.max() else "constant logits"
            warnings.warn(f"{names[j]}: {why}; temperature 1 kept", stacklevel=2)
            temperatures.append(1.0)
            continue
        temperatures.append(_fit_one(lambda t, z=column, y=target: temperature_nll(z, y, t, task=task), names[j]))
    return temperatures
