"""From logits to an evaluation: probabilities, thresholds (chosen on validation data or given),
metrics, the summary a model's metadata keeps, and the report.

The trainer's end of run and ``qing eval`` both go through :func:`evaluate_logits`::

    from qing.evaluate import evaluate_logits

    result = evaluate_logits(test_logits, test_targets, task="binary", label_names=["PNEUMONIA"],
                             val_logits=val_logits, val_targets=val_targets, method="youden")
    result.metrics["roc_auc"], result.thresholds
    result.store(model)                       # task, thresholds, method and summary in model.qing_meta
    result.write_report("runs/x/report", history=history, model=model, images=images)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from torch import nn

from qing.evaluate._inputs import as_numpy
from qing.evaluate.metrics import compute_metrics, probabilities
from qing.evaluate.report import write_report
from qing.evaluate.thresholds import choose_thresholds, threshold_method_name
from qing.meta import set_meta

__all__ = ["SUMMARY_METRICS", "Evaluation", "evaluate_logits"]

#: The scores of :attr:`Evaluation.summary` (as ``test_<name>``), when defined.
SUMMARY_METRICS = ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "f1")


@dataclass
class Evaluation:
    """The evaluation of a model's logits on labelled data.

    Attributes:
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        label_names: One name per output column.
        targets: ``(N, C)`` 0/1 int64 (binary, multilabel) or ``(N,)`` class indices (multiclass).
        probs: ``(N, C)`` probabilities (:func:`~qing.evaluate.probabilities` of the logits).
        thresholds: The decision thresholds used: chosen on validation data or given; ``[]`` for
            multiclass when chosen; ``None`` when neither (then ``metrics`` used 0.5 or the argmax).
        threshold_method: How ``thresholds`` were chosen (e.g. ``"youden"``, ``"sensitivity@0.90"``);
            ``None`` without thresholds.
        metrics: :func:`~qing.evaluate.compute_metrics` of ``targets`` and ``probs`` with ``thresholds``.
    """

    task: str
    label_names: list[str]
    targets: np.ndarray
    probs: np.ndarray
    thresholds: Optional[list[float]]
    threshold_method: Optional[str]
    metrics: dict[str, Any]

    @property
    def summary(self) -> dict[str, Any]:
        """The headline test numbers a model's metadata keeps (``qing_meta.metrics``, the model card).

        ``test_<name>`` for each defined score of :data:`SUMMARY_METRICS`, ``test_roc_auc_ci`` when
        there is an interval, and ``n_test``.
        """
        metrics = self.metrics
        out = {f"test_{k}": metrics[k] for k in SUMMARY_METRICS if isinstance(metrics.get(k), (int, float))}
        if metrics.get("roc_auc_ci"):
            out["test_roc_auc_ci"] = metrics["roc_auc_ci"]
        out["n_test"] = metrics["n_samples"]
        return out

    def store(self, model: nn.Module) -> None:
        """Record the task, thresholds, their method and :attr:`summary` in ``model.qing_meta``."""
        set_meta(
            model,
            task=self.task,
            thresholds=self.thresholds or None,
            threshold_method=self.threshold_method,
            metrics=self.summary,
        )

    def write_report(self, folder: Union[str, Path], **kwargs: Any) -> Path:
        """Write the report of this evaluation with :func:`~qing.evaluate.write_report`.

        Args:
            folder: The report folder.
            **kwargs: The other arguments of :func:`~qing.evaluate.write_report` (``history``, ``model``,
                ``images``, ``mean``, ``std``, ``bad_files``, ``title``).

        Returns:
            The path of ``report.html``.
        """
        data = {name: getattr(self, name) for name in ("metrics", "targets", "probs", "label_names", "task")}
        return write_report(folder, **data, **kwargs)


def _int_targets(targets: Any, name: str) -> np.ndarray:
    """Dataset targets (float 0/1 or long class indices, tensor or array) as int64."""
    t = as_numpy(targets)
    if t.dtype.kind == "f" and not np.array_equal(t, np.round(t)):
        raise ValueError(f"{name} must be 0/1 labels or class indices, found non-integer values")
    return t.astype(np.int64)


def evaluate_logits(
    logits: Any,
    targets: Any,
    *,
    task: str,
    label_names: Sequence[str],
    val_logits: Any = None,
    val_targets: Any = None,
    method: str = "youden",
    target_sensitivity: Optional[float] = None,
    thresholds: Optional[Sequence[float]] = None,
    threshold_method: Optional[str] = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    negative_label: Optional[str] = None,
) -> Evaluation:
    """Evaluate logits against targets, with thresholds chosen on validation data or given.

    With ``val_logits``/``val_targets`` the thresholds are chosen on them by
    :func:`~qing.evaluate.choose_thresholds` (``method``, ``target_sensitivity``) and applied unchanged
    to ``logits``; with ``thresholds`` those are applied; with neither, 0.5 (argmax for multiclass).

    Args:
        logits: ``(N, C)`` logits (tensor or array).
        targets: ``(N, C)`` 0/1 (binary, multilabel; ``(N,)`` accepted for binary) or ``(N,)`` class
            indices (multiclass), as :func:`qing.data.encode_targets` makes them.
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        label_names: ``C`` names (binary: the positive class).
        val_logits: ``(M, C)`` validation logits to choose the thresholds on.
        val_targets: Their ``M`` targets.
        method: Threshold rule on validation data: ``"youden"`` or ``"sensitivity"``.
        target_sensitivity: For ``method="sensitivity"``, in ``(0, 1]``.
        thresholds: Given per-output thresholds (instead of validation data).
        threshold_method: How the given ``thresholds`` were chosen (recorded).
        n_bootstrap: Bootstrap resamples of the AUROC interval (0: none).
        seed: Seed of the bootstrap.
        negative_label: Binary: the name of the negative class.

    Returns:
        An :class:`Evaluation`.

    Raises:
        ValueError: Both validation data and ``thresholds``, validation logits without targets (or the
            reverse), or inputs :func:`~qing.evaluate.compute_metrics` rejects.
    """
    if (val_logits is None) != (val_targets is None):
        raise ValueError("give val_logits and val_targets together (or neither)")
    if val_logits is not None and thresholds is not None:
        raise ValueError("give thresholds or validation data to choose them on, not both")
    names = [str(name) for name in label_names]
    if val_logits is not None:
        thresholds = choose_thresholds(
            _int_targets(val_targets, "val_targets"),
            probabilities(val_logits, task),
            task=task,
            method=method,
            target_sensitivity=target_sensitivity,
            label_names=names,
        )
        threshold_method = threshold_method_name(method, target_sensitivity)
    elif thresholds is not None:
        thresholds = [float(t) for t in thresholds]
    y = _int_targets(targets, "targets")
    probs = probabilities(logits, task)
    recorded = threshold_method if thresholds else None
    metrics = compute_metrics(
        y,
        probs,
        task=task,
        label_names=names,
        thresholds=thresholds or None,
        threshold_method=recorded,
        n_bootstrap=n_bootstrap,
        seed=seed,
        negative_label=negative_label,
    )
    return Evaluation(task, names, y, probs, thresholds, recorded, metrics)
