"""From logits to an evaluation: calibration (temperatures fitted on validation data or given),
probabilities, thresholds (chosen on validation data, after calibration, or given), metrics, the
summary a model's metadata keeps, and the report.

The trainer's end of run and ``qing eval`` both go through :func:`evaluate_logits`::

    from qing.evaluate import evaluate_logits

    result = evaluate_logits(test_logits, test_targets, task="binary", label_names=["PNEUMONIA"],
                             val_logits=val_logits, val_targets=val_targets, method="youden")
    result.metrics["roc_auc"], result.temperatures, result.thresholds
    result.store(model)   # task, temperatures, thresholds, method and summary in model.qing_meta
    result.write_report("runs/x/report", history=history, model=model, images=images)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from torch import nn

from qing.evaluate._inputs import as_numpy, jsonable
from qing.evaluate.calibration import CALIBRATION_BINS, calibration_scores, fit_temperatures
from qing.evaluate.metrics import compute_metrics, probabilities
from qing.evaluate.report import write_report
from qing.evaluate.thresholds import choose_thresholds, threshold_method_name
from qing.meta import set_meta

__all__ = ["SUMMARY_METRICS", "SUMMARY_PER_LABEL", "Evaluation", "evaluate_logits"]

#: The scores of :attr:`Evaluation.summary` (as ``test_<name>``, with ``test_<name>_ci`` where there is an
#: interval), when defined.
SUMMARY_METRICS = (
    "roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "ece", "ece_equal_mass", "brier",
)  # fmt: skip

#: The per-label entries :attr:`Evaluation.summary` keeps (with their ``_ci`` where there is one).
SUMMARY_PER_LABEL = (
    "label", "n_positive", "n_negative", "threshold", "temperature", "roc_auc", "pr_auc", "sensitivity",
    "specificity", "ppv", "npv", "ece", "brier",
)  # fmt: skip


@dataclass
class Evaluation:
    """The evaluation of a model's logits on labelled data.

    Attributes:
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        label_names: One name per output column.
        targets: ``(N, C)`` 0/1 int64 (binary, multilabel) or ``(N,)`` class indices (multiclass).
        probs: ``(N, C)`` probabilities (:func:`~qing.evaluate.probabilities` of the logits, divided by
            ``temperatures`` when there are some).
        thresholds: The decision thresholds used: chosen on validation data or given; ``[]`` for
            multiclass when chosen; ``None`` when neither (then ``metrics`` used 0.5 or the argmax).
        threshold_method: How ``thresholds`` were chosen (e.g. ``"youden"``, ``"sensitivity@0.90"``);
            ``None`` without thresholds.
        metrics: :func:`~qing.evaluate.compute_metrics` of ``targets`` and ``probs`` with ``thresholds``,
            plus ``metrics["calibration"]``: the temperatures, where they came from, and the ECE and
            Brier score of the probabilities before temperature scaling.
        temperatures: The temperatures the logits were divided by (fitted on validation data or
            given), ``None`` for none.
        uncalibrated_probs: ``(N, C)`` probabilities before temperature scaling (``None`` without it).
    """

    task: str
    label_names: list[str]
    targets: np.ndarray
    probs: np.ndarray
    thresholds: Optional[list[float]]
    threshold_method: Optional[str]
    metrics: dict[str, Any]
    temperatures: Optional[list[float]] = None
    uncalibrated_probs: Optional[np.ndarray] = None

    @property
    def summary(self) -> dict[str, Any]:
        """The headline test numbers a model's metadata keeps (``qing_meta.metrics``, the model card).

        ``test_<name>`` for each defined score of :data:`SUMMARY_METRICS` and ``test_<name>_ci`` for
        its interval, ``test_ece_uncalibrated`` (the ECE before temperature scaling, when scaled),
        ``n_test``, the ``confidence`` of the intervals, and ``per_label``: the :data:`SUMMARY_PER_LABEL`
        entries of each output.
        """
        metrics = self.metrics
        out: dict[str, Any] = {}
        for key in SUMMARY_METRICS:
            if isinstance(metrics.get(key), (int, float)):
                out[f"test_{key}"] = metrics[key]
                if metrics.get(f"{key}_ci"):
                    out[f"test_{key}_ci"] = metrics[f"{key}_ci"]
        before = (metrics.get("calibration") or {}).get("uncalibrated")
        if before:
            out["test_ece_uncalibrated"] = before["ece"]
        out["n_test"] = metrics["n_samples"]
        out["confidence"] = (metrics.get("roc_auc_bootstrap") or {}).get("confidence", 0.95)
        keep = [*SUMMARY_PER_LABEL, *(f"{k}_ci" for k in SUMMARY_PER_LABEL)]
        out["per_label"] = [{k: row[k] for k in keep if row.get(k) is not None} for row in metrics["per_label"]]
        return out

    def store(self, model: nn.Module) -> None:
        """Record the task, temperatures, thresholds, their method and :attr:`summary` in ``model.qing_meta``."""
        set_meta(
            model,
            task=self.task,
            temperatures=self.temperatures,
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
        names = ("metrics", "targets", "probs", "label_names", "task", "uncalibrated_probs")
        return write_report(folder, **{name: getattr(self, name) for name in names}, **kwargs)


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
    temperatures: Optional[Sequence[float]] = None,
    temperature_source: str = "given",
    calibrate: bool = True,
    n_bootstrap: int = 1000,
    seed: int = 0,
    negative_label: Optional[str] = None,
    n_bins: int = CALIBRATION_BINS,
) -> Evaluation:
    """Evaluate logits against targets: calibrate, choose thresholds on validation data (or take given ones), score.

    With ``val_logits``/``val_targets``: unless ``temperatures`` are given (or ``calibrate=False``), one
    temperature per output is fitted on them (:func:`~qing.evaluate.fit_temperatures`); then the
    thresholds are chosen on the **calibrated** validation probabilities by
    :func:`~qing.evaluate.choose_thresholds` (``method``, ``target_sensitivity``), and both are applied
    unchanged to ``logits``. With ``thresholds`` those are applied (to the calibrated probabilities when
    there are temperatures); with neither, 0.5 (argmax for multiclass).

    Args:
        logits: ``(N, C)`` logits (tensor or array).
        targets: ``(N, C)`` 0/1 (binary, multilabel; ``(N,)`` accepted for binary) or ``(N,)`` class
            indices (multiclass), as :func:`qing.data.encode_targets` makes them.
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        label_names: ``C`` names (binary: the positive class).
        val_logits: ``(M, C)`` validation logits to calibrate and choose the thresholds on.
        val_targets: Their ``M`` targets.
        method: Threshold rule on validation data: ``"youden"`` or ``"sensitivity"``.
        target_sensitivity: For ``method="sensitivity"``, in ``(0, 1]``.
        thresholds: Given per-output thresholds (instead of validation data).
        threshold_method: How the given ``thresholds`` were chosen (recorded).
        temperatures: Given per-output temperatures (e.g. ``model.qing_meta.temperatures``): the logits
            are divided by them; nothing is fitted.
        temperature_source: Where the given ``temperatures`` come from (recorded, e.g. "stored with the model").
        calibrate: Fit temperatures on the validation data (when given and ``temperatures`` is not).
        n_bootstrap: Bootstrap resamples of the AUROC and PR-AUC intervals (0: none).
        seed: Seed of the bootstrap.
        negative_label: Binary: the name of the negative class.
        n_bins: Bins of the calibration errors.

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
    source = temperature_source if temperatures is not None else None
    if temperatures is not None:
        temperatures = [float(t) for t in temperatures]
    elif val_logits is not None and calibrate:
        val_y = _int_targets(val_targets, "val_targets")
        temperatures = fit_temperatures(val_logits, val_y, task=task, label_names=names)
        source = f"fitted on validation data ({len(val_y)} images)"
    if val_logits is not None:
        thresholds = choose_thresholds(
            _int_targets(val_targets, "val_targets"),
            probabilities(val_logits, task, temperatures),
            task=task,
            method=method,
            target_sensitivity=target_sensitivity,
            label_names=names,
        )
        threshold_method = threshold_method_name(method, target_sensitivity)
    elif thresholds is not None:
        thresholds = [float(t) for t in thresholds]
    y = _int_targets(targets, "targets")
    probs = probabilities(logits, task, temperatures)
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
        n_bins=n_bins,
    )
    raw = probabilities(logits, task) if temperatures is not None else None
    metrics["calibration"] = _calibration_record(y, raw, metrics, temperatures, source, task=task, n_bins=n_bins)
    if len(y) < 10 * n_bins:
        metrics["notes"].append(
            f"Calibration errors from {len(y)} images in {n_bins} bins ({len(y) / n_bins:.1f} per bin) are noisy and "
            "biased upward, the equal-mass ECE most; compare ECEs on the same images only."
        )
    if temperatures is not None:
        for row, temperature in zip(metrics["per_label"], temperatures):
            row["temperature"] = temperature
    return Evaluation(task, names, y, probs, thresholds, recorded, metrics, temperatures, raw)


def _calibration_record(
    y: np.ndarray,
    raw: Optional[np.ndarray],
    metrics: dict[str, Any],
    temperatures: Optional[list[float]],
    source: Optional[str],
    *,
    task: str,
    n_bins: int,
) -> dict[str, Any]:
    """``metrics["calibration"]``: the temperatures, their source, and the scores before scaling."""
    record: dict[str, Any] = {
        "method": "temperature scaling" if temperatures is not None else None,
        "temperatures": temperatures,
        "source": source,
        "n_bins": n_bins,
        "uncalibrated": None,
    }
    if raw is not None:
        indicator = np.eye(raw.shape[1], dtype=np.int64)[y] if task == "multiclass" else y.reshape(raw.shape)
        rows = [
            {"label": row["label"], **calibration_scores(indicator[:, j], raw[:, j], n_bins=n_bins)}
            for j, row in enumerate(metrics["per_label"])
        ]
        record["uncalibrated"] = {
            key: float(np.mean([r[key] for r in rows])) for key in ("ece", "ece_equal_mass", "brier")
        } | {"per_label": rows}
    return jsonable(record)
