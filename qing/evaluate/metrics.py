"""Classification metrics with scikit-learn: scores with intervals, calibration, per-label tables.

Every rate at the decision threshold (sensitivity, specificity, PPV, NPV, accuracy) has a Wilson
score interval; AUROC and PR-AUC have percentile-bootstrap intervals from the same resamples; each
output has its calibration (ECE, equal-mass ECE, Brier score; see :mod:`qing.evaluate.calibration`).

Conventions (shared by all of ``qing.evaluate``): ``probs`` is ``(N, C)`` probabilities;
``targets`` is ``(N, C)`` 0/1 for ``"binary"`` (``C == 1``) and ``"multilabel"``, ``(N,)``
class indices for ``"multiclass"``. A sample counts as positive for output ``j`` when
``probs[:, j] >= thresholds[j]``; multiclass predictions are the argmax.

Undefined values (AUROC of a label whose targets hold one class only, precision with no
predicted positives, ...) are ``None`` in the returned dict and explained in its ``notes``;
nothing is silently replaced by 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from scipy.special import expit, softmax
from scipy.stats import norm
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    confusion_matrix,
    hamming_loss,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from qing.evaluate._inputs import as_numpy, check_inputs, jsonable
from qing.evaluate.calibration import CALIBRATION_BINS, apply_temperatures, calibration_scores
from qing.meta import get_meta

__all__ = ["auroc_bootstrap", "compute_metrics", "model_probabilities", "probabilities", "wilson_interval"]

# Bootstrap resamples are processed in chunks of about this many (resample, sample) cells.
_CHUNK_CELLS = 2_000_000


def probabilities(logits: Any, task: str, temperatures: Optional[Sequence[float]] = None) -> np.ndarray:
    """Turn model logits into probabilities, calibrated by temperature scaling when given.

    Args:
        logits: ``(N, C)`` logits (numpy array or torch tensor, any float dtype or device);
            ``(N,)`` is accepted for ``"binary"``.
        task: ``"binary"`` or ``"multilabel"`` (sigmoid per output) or ``"multiclass"`` (softmax over ``C``).
        temperatures: ``C`` temperatures (e.g. ``model.qing_meta.temperatures``): the logits are divided
            by them first; ``None`` for none.

    Returns:
        float64 array ``(N, C)``; multiclass rows sum to 1.
    """
    z = apply_temperatures(logits, temperatures, task=task)
    if not np.isfinite(z).all():
        raise ValueError(f"logits contain {int((~np.isfinite(z)).sum())} NaN/inf value(s)")
    return softmax(z, axis=1) if task == "multiclass" else expit(z)


def model_probabilities(model: Any, logits: Any) -> np.ndarray:
    """The probabilities a model's logits stand for, calibrated as the model was.

    :func:`probabilities` with the model's task and temperatures from ``model.qing_meta`` (a model
    without a task is binary with one output, multi-label with more), so the result is on the scale of
    ``model.qing_meta.thresholds``. A model loaded with ``qing.from_pretrained(..., calibration=False)``
    has no temperatures: plain sigmoid / softmax.

    Args:
        model: A qing or timm model (its ``qing_meta`` and ``num_classes`` are read).
        logits: ``(N, C)`` logits of ``model``.

    Returns:
        float64 ``(N, C)``.
    """
    meta = get_meta(model)
    num_outputs = int(getattr(model, "num_classes", 0) or np.shape(as_numpy(logits))[-1])
    task = meta.task or ("binary" if num_outputs == 1 else "multilabel")
    return probabilities(logits, task, meta.temperatures)


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> Optional[list[float]]:
    """Wilson score interval of a proportion ``successes / total``.

    ``(k + z^2/2) / (n + z^2)  +/-  z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4)`` with ``z`` the
    normal quantile of ``(1 + confidence) / 2``. Unlike the normal approximation it stays inside
    ``[0, 1]`` and is not empty at 0 or ``n`` successes (Wilson, 1927; Brown, Cai & DasGupta, 2001).

    Args:
        successes: ``k``, e.g. true positives for sensitivity.
        total: ``n``, e.g. all positives for sensitivity.
        confidence: Interval coverage.

    Returns:
        ``[low, high]``, or ``None`` when ``total == 0`` (the rate is undefined).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    k, n = int(successes), int(total)
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= successes <= total, got {k} of {n}")
    if n == 0:
        return None
    z = float(norm.ppf(0.5 + confidence / 2))
    center = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * np.sqrt(k * (n - k) / n + z * z / 4)
    return [max(0.0, float(center - half)), min(1.0, float(center + half))]


def _weighted_auroc(counts: np.ndarray, order: np.ndarray, starts: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC of one output on each bootstrap resample, given how often each sample was drawn.

    A resample is the original samples weighted by their draw counts, so its AUROC is the
    weighted Mann-Whitney statistic: for every positive, the weight of negatives scored
    below it plus half of those tied with it. Equal to ``sklearn.metrics.roc_auc_score`` on
    the resampled arrays (ties count one half), without re-sorting each resample.

    Args:
        counts: ``(B, N)`` draw counts per resample.
        order: ``(N,)`` sample order by ascending score.
        starts: Start positions of groups of tied scores in that order.
        positive: ``(N,)`` 0/1 float targets in that order.

    Returns:
        ``(B,)`` AUROC, NaN for resamples holding one class only.
    """
    weights = counts[:, order]
    pos = np.add.reduceat(weights * positive, starts, axis=1)  # (B, groups of tied scores)
    neg = np.add.reduceat(weights * (1.0 - positive), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _weighted_average_precision(
    counts: np.ndarray, order: np.ndarray, starts: np.ndarray, positive: np.ndarray
) -> np.ndarray:
    """Average precision of one output on each bootstrap resample (arguments as :func:`_weighted_auroc`).

    ``AP = sum_k (positives at score k / all positives) * precision at threshold k`` over the distinct
    scores ``k`` from the highest down, with the resample's draw counts as weights: equal to
    ``sklearn.metrics.average_precision_score`` on the resampled arrays.

    Returns:
        ``(B,)`` average precision, NaN for resamples holding one class only.
    """
    weights = counts[:, order]
    pos = np.add.reduceat(weights * positive, starts, axis=1)[:, ::-1]  # (B, groups), highest score first
    neg = np.add.reduceat(weights * (1.0 - positive), starts, axis=1)[:, ::-1]
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (pos * precision).sum(axis=1) / tp[:, -1]
    ap[(tp[:, -1] == 0) | (fp[:, -1] == 0)] = np.nan
    return ap


def _resampled_aurocs(
    y: np.ndarray, p: np.ndarray, *, n_bootstrap: int, seed: int, average_precision: bool = False
) -> Any:
    """AUROC of every column on ``n_bootstrap`` resamples, ``(n_bootstrap, C)``, NaN where a class is missing.

    Resample ``b`` is row ``b`` of ``np.random.default_rng(seed).integers(0, N, size=(n_bootstrap, N))``
    (drawn in chunks, which yields the same indices); all columns share the resamples.
    Time and memory grow as ``n_bootstrap x N`` per column (about 1 s for 20,000 samples x
    1000 resamples x 3 columns on one core). With ``average_precision`` returns ``(aurocs, aps)``:
    the average precision of every column on the same resamples.
    """
    n, c = p.shape
    columns = []
    for j in range(c):
        order = np.argsort(p[:, j], kind="stable")
        ranked = p[order, j]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        columns.append((order, starts, y[order, j].astype(np.float64)))
    rng = np.random.default_rng(seed)
    out = np.full((n_bootstrap, c), np.nan)
    aps = np.full((n_bootstrap, c), np.nan)
    rows = max(1, _CHUNK_CELLS // n)
    for start in range(0, n_bootstrap, rows):
        idx = rng.integers(0, n, size=(min(rows, n_bootstrap - start), n))
        b = len(idx)
        counts = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        counts = counts.astype(np.float64)
        for j, column in enumerate(columns):
            out[start : start + b, j] = _weighted_auroc(counts, *column)
            if average_precision:
                aps[start : start + b, j] = _weighted_average_precision(counts, *column)
    return (out, aps) if average_precision else out


def _percentile_interval(values: np.ndarray, confidence: float) -> Optional[list[float]]:
    """``[low, high]`` percentiles of the finite ``values`` (``None`` if there are none)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def auroc_bootstrap(
    targets: Any, scores: Any, *, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Percentile-bootstrap confidence interval of the AUROC of one binary output.

    Samples are drawn with replacement ``n_bootstrap`` times (indices
    ``np.random.default_rng(seed).integers(0, N, size=(n_bootstrap, N))``); a resample that
    holds only one class has no AUROC and is skipped and counted. The interval is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the other resamples.

    Args:
        targets: ``(N,)`` 0/1 labels.
        scores: ``(N,)`` scores or probabilities.
        n_bootstrap: Number of resamples.
        confidence: Interval coverage, e.g. 0.95.
        seed: Seed of the resampling generator.

    Returns:
        ``{"ci": [low, high] or None, "n_resamples", "n_skipped", "confidence", "seed", "method": "percentile"}``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    y, p = as_numpy(targets).reshape(-1, 1), as_numpy(scores).astype(np.float64).reshape(-1, 1)
    if y.shape != p.shape:
        raise ValueError(f"targets and scores differ in length: {len(y)} vs {len(p)}")
    aucs = _resampled_aurocs(y.astype(np.int64), p, n_bootstrap=n_bootstrap, seed=seed)[:, 0]
    return _bootstrap_summary(aucs, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)


def _bootstrap_summary(aucs: np.ndarray, *, n_bootstrap: int, confidence: float, seed: int) -> dict[str, Any]:
    return {
        "ci": _percentile_interval(aucs, confidence),
        "n_resamples": n_bootstrap,
        "n_skipped": int((~np.isfinite(aucs)).sum()),
        "confidence": confidence,
        "seed": seed,
        "method": "percentile",
    }


def _resolve_thresholds(thresholds: Optional[Sequence[float]], *, task: str, num_outputs: int) -> list[float]:
    if task == "multiclass":
        if thresholds is not None and len(thresholds):
            given = [float(t) for t in thresholds]
            raise ValueError(f"multiclass predictions are the argmax; thresholds must be None or [], got {given}")
        return []
    if thresholds is None:
        return [0.5] * num_outputs
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) != num_outputs:
        raise ValueError(f"{len(thresholds)} thresholds for {num_outputs} output column(s)")
    bad = [t for t in thresholds if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"thresholds are probabilities in [0, 1], got {bad}")
    return thresholds


def _rate(successes: int, total: int) -> float:
    return successes / total if total else float("nan")


def _rates(y: np.ndarray, pred: np.ndarray, confidence: float) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV and accuracy of 0/1 predictions, each with its Wilson interval."""
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    out: dict[str, Any] = {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, k, n in (
        ("sensitivity", tp, tp + fn),
        ("specificity", tn, tn + fp),
        ("ppv", tp, tp + fp),
        ("npv", tn, tn + fn),
        ("accuracy", tp + tn, len(y)),
    ):
        out[name] = _rate(k, n)
        out[f"{name}_ci"] = wilson_interval(k, n, confidence)
    return out


def _label_row(
    name: str,
    y: np.ndarray,
    p: np.ndarray,
    pred: np.ndarray,
    threshold: Optional[float],
    *,
    confidence: float,
    n_bins: int,
) -> dict:
    """One row of the per-label table for 0/1 targets ``y``, scores ``p`` and 0/1 predictions ``pred``."""
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    _, _, f1, _ = precision_recall_fscore_support(y, pred, labels=[0, 1], average=None, zero_division=np.nan)
    defined = n_pos > 0 and n_neg > 0
    rates = _rates(y, pred, confidence)
    return {
        "label": name,
        "n_positive": n_pos,
        "n_negative": n_neg,
        "threshold": threshold,
        "roc_auc": float(roc_auc_score(y, p)) if defined else None,
        "roc_auc_ci": None,
        "pr_auc": float(average_precision_score(y, p)) if defined else None,
        "pr_auc_ci": None,
        **rates,
        "precision": rates["ppv"],
        "f1": f1[1],
        **calibration_scores(y, p, n_bins=n_bins),
        "note": None
        if defined
        else f"only {'negative' if n_pos == 0 else 'positive'} targets ({len(y)} samples): AUROC and PR-AUC undefined",
    }


def compute_metrics(
    targets: Any,
    probs: Any,
    *,
    task: str,
    label_names: Sequence[str],
    thresholds: Optional[Sequence[float]] = None,
    threshold_method: Optional[str] = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    negative_label: Optional[str] = None,
    n_bins: int = CALIBRATION_BINS,
) -> dict[str, Any]:
    """Evaluate probabilities against targets; every number a report or model card needs.

    What the top-level scores mean per task:

    - ``binary``: the positive class's precision, recall (= sensitivity), specificity, F1;
      accuracy; AUROC; PR-AUC (average precision).
    - ``multilabel``: ``accuracy`` is label-wise (``1 - hamming_loss``), ``subset_accuracy``
      the exact-match ratio; precision/recall/F1 are sklearn macro averages; specificity the
      mean over labels; ``roc_auc``/``pr_auc`` the mean over labels whose targets hold both
      classes (the CheXNet "mean AUROC").
    - ``multiclass``: argmax predictions; accuracy; macro precision/recall/F1; the mean
      one-vs-rest specificity; macro one-vs-rest AUROC and PR-AUC over classes present
      in the targets (equal to ``roc_auc_score(multi_class="ovr")`` when all are).

    The AUROC and PR-AUC intervals are seeded percentile bootstraps over samples, both from the same
    resamples (see :func:`auroc_bootstrap`); for a mean over labels every resample must contain both
    classes of every defined label, others are skipped and counted in ``roc_auc_bootstrap["n_skipped"]``.
    Rates at the threshold (sensitivity, specificity, PPV, NPV, accuracy) get Wilson intervals
    (:func:`wilson_interval`) per label, and at the top level for binary (and accuracy for multiclass).
    Calibration (ECE with ``n_bins`` equal-width and equal-mass bins, Brier score) is per label, its
    top-level value the mean over all outputs.

    Args:
        targets: ``(N, C)`` 0/1 (binary, multilabel) or ``(N,)`` class indices (multiclass).
        probs: ``(N, C)`` probabilities (see :func:`probabilities`).
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        label_names: ``C`` names (binary: the positive class).
        thresholds: Per-output decision thresholds, e.g. from :func:`choose_thresholds` on
            validation data; ``None`` uses 0.5 (noted). Must be ``None`` or empty for multiclass.
        threshold_method: How ``thresholds`` were chosen (recorded, e.g. ``"youden"``).
        n_bootstrap: Bootstrap resamples for the AUROC interval; 0 disables it.
        confidence: Interval coverage.
        seed: Seed of the bootstrap resampling.
        negative_label: Binary only: name of the negative class (default ``"not <positive>"``).
        n_bins: Bins of the calibration errors.

    Returns:
        JSON-able dict with ``task, n_samples, label_names, thresholds, threshold_method,
        accuracy, precision, recall, sensitivity, specificity, f1, roc_auc, roc_auc_ci,
        roc_auc_bootstrap, pr_auc, pr_auc_ci, ece, ece_equal_mass, brier, calibration_bins,
        confusion_matrix, confusion_matrix_labels, per_label, classification_report, notes``
        (multilabel adds ``subset_accuracy``; binary adds ``ppv, npv`` and ``<rate>_ci`` for
        the five rates; multiclass ``accuracy_ci``). ``confusion_matrix``
        is ``[[TN, FP], [FN, TP]]`` (binary), ``C x C`` rows = truth (multiclass) or ``C`` such
        2 x 2 matrices (multilabel). ``per_label`` has one row per output (one-vs-rest for
        multiclass) with counts, threshold, AUROC and its interval, PR-AUC and the
        thresholded scores with ``tp, fp, tn, fn`` and the five rates with their ``_ci``, and its
    ``ece, ece_equal_mass, brier``; a label with one class has ``roc_auc=None`` and a ``note``.
    """
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if label_names is None or isinstance(label_names, str):
        raise ValueError(f"label_names must be a sequence of {'one name' if task == 'binary' else 'names'}")
    y, p = check_inputs(targets, probs, task=task, label_names=label_names)
    n, c = p.shape
    names = [str(name) for name in label_names]
    used = _resolve_thresholds(thresholds, task=task, num_outputs=c)
    notes: list[str] = []
    if task == "multiclass":
        pred = np.eye(c, dtype=np.int64)[p.argmax(axis=1)]
        method = "argmax"
    else:
        pred = (p >= np.asarray(used)[None, :]).astype(np.int64)
        if thresholds is None:
            method = "default 0.5"
            notes.append("No thresholds given: 0.5 used for every output (not tuned on validation data).")
        else:
            method = threshold_method or "given (method not recorded)"

    per_label = [
        _label_row(
            names[j], y[:, j], p[:, j], pred[:, j], used[j] if used else None, confidence=confidence, n_bins=n_bins
        )
        for j in range(c)
    ]
    defined = [j for j, row in enumerate(per_label) if row["roc_auc"] is not None]
    undefined = [names[j] for j in range(c) if j not in defined]
    boot_summary = None
    roc_auc_ci = pr_auc_ci = None
    if n_bootstrap and defined:
        aucs, aps = _resampled_aurocs(
            y[:, defined], p[:, defined], n_bootstrap=n_bootstrap, seed=seed, average_precision=True
        )
        for k, j in enumerate(defined):
            per_label[j]["roc_auc_ci"] = _percentile_interval(aucs[:, k], confidence)
            per_label[j]["pr_auc_ci"] = _percentile_interval(aps[:, k], confidence)
        complete = np.isfinite(aucs).all(axis=1)
        mean_aucs = np.where(complete, aucs.mean(axis=1), np.nan)
        boot_summary = _bootstrap_summary(mean_aucs, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
        roc_auc_ci = boot_summary.pop("ci")
        pr_auc_ci = _percentile_interval(np.where(complete, aps.mean(axis=1), np.nan), confidence)
        if boot_summary["n_skipped"]:
            notes.append(
                f"{boot_summary['n_skipped']} of {n_bootstrap} bootstrap resamples lacked a class "
                "and were skipped for the AUROC interval."
            )
    roc_auc = float(np.mean([per_label[j]["roc_auc"] for j in defined])) if defined else None
    pr_auc = float(np.mean([per_label[j]["pr_auc"] for j in defined])) if defined else None
    if undefined:
        what = "AUROC" if task == "binary" else f"roc_auc and pr_auc are means over {len(defined)} of {c} outputs;"
        notes.append(f"{what} undefined for {', '.join(undefined)}: only one class in the targets.")

    out: dict[str, Any] = {
        "task": task,
        "n_samples": n,
        "label_names": names,
        "thresholds": used,
        "threshold_method": method,
    }
    if task == "binary":
        row = per_label[0]
        cm_labels = [negative_label or f"not {names[0]}", names[0]]
        out.update(
            accuracy=row["accuracy"],
            accuracy_ci=row["accuracy_ci"],
            precision=row["precision"],
            recall=row["sensitivity"],
            sensitivity=row["sensitivity"],
            sensitivity_ci=row["sensitivity_ci"],
            specificity=row["specificity"],
            specificity_ci=row["specificity_ci"],
            ppv=row["ppv"],
            ppv_ci=row["ppv_ci"],
            npv=row["npv"],
            npv_ci=row["npv_ci"],
            f1=row["f1"],
        )
        cm = confusion_matrix(y[:, 0], pred[:, 0], labels=[0, 1])
        report = classification_report(
            y[:, 0], pred[:, 0], labels=[0, 1], target_names=cm_labels, output_dict=True, zero_division=np.nan
        )
    else:
        if task == "multilabel":
            truth, guess, labels = y, pred, None
            cm = multilabel_confusion_matrix(y, pred)
            out.update(accuracy=1.0 - float(hamming_loss(y, pred)), subset_accuracy=float(accuracy_score(y, pred)))
        else:
            truth, guess, labels = y.argmax(axis=1), pred.argmax(axis=1), list(range(c))
            cm = confusion_matrix(truth, guess, labels=labels)
            correct = int((truth == guess).sum())
            out.update(accuracy=correct / n, accuracy_ci=wilson_interval(correct, n, confidence))
        cm_labels = names
        precision, recall, f1, _ = precision_recall_fscore_support(
            truth, guess, labels=labels, average="macro", zero_division=np.nan
        )
        specificities = [row["specificity"] for row in per_label if np.isfinite(row["specificity"])]
        out.update(
            precision=precision,
            recall=recall,
            sensitivity=recall,
            specificity=float(np.mean(specificities)) if specificities else None,
            f1=f1,
        )
        report = classification_report(
            truth, guess, labels=labels, target_names=names, output_dict=True, zero_division=np.nan
        )
    out.update(
        roc_auc=roc_auc,
        roc_auc_ci=roc_auc_ci,
        roc_auc_bootstrap=boot_summary,
        pr_auc=pr_auc,
        pr_auc_ci=pr_auc_ci,
        ece=float(np.mean([row["ece"] for row in per_label])),
        ece_equal_mass=float(np.mean([row["ece_equal_mass"] for row in per_label])),
        brier=float(np.mean([row["brier"] for row in per_label])),
        calibration_bins=n_bins,
        confusion_matrix=cm,
        confusion_matrix_labels=cm_labels,
        per_label=per_label,
        classification_report=report,
        notes=notes,
    )
    return jsonable(out)
