"""Evaluation: logits over a loader (optionally with test-time augmentation), calibration, probabilities,
thresholds chosen on validation data, metrics with intervals, paired model comparison, plots and reports.

In one call, from a model and loaders (what the trainer and ``qing eval`` do)::

    from qing.evaluate import collect_logits, evaluate_logits

    val, test = collect_logits(model, val_loader), collect_logits(model, test_loader)
    result = evaluate_logits(test.logits, test_targets[test.indices], task=task, label_names=names,
                             val_logits=val.logits, val_targets=val_targets[val.indices])
    result.write_report(run_dir / "report", history=history, model=model, images=some_images)

Step by step::

    from qing.evaluate import probabilities, choose_thresholds, compute_metrics, write_report

    val_probs = probabilities(val_logits, task)
    thresholds = choose_thresholds(val_targets, val_probs, task=task, method="youden")
    test_probs = probabilities(test_logits, task)
    metrics = compute_metrics(test_targets, test_probs, task=task, label_names=names,
                              thresholds=thresholds, threshold_method="youden")
    write_report(run_dir / "report", metrics=metrics, targets=test_targets, probs=test_probs,
                 label_names=names, task=task, history=history, model=model, images=some_images)
"""

from qing.evaluate.calibration import (
    CALIBRATION_BINS,
    apply_temperatures,
    calibration_bins,
    calibration_scores,
    expected_calibration_error,
    fit_temperatures,
)
from qing.evaluate.comparison import Comparison, compare, delong_test, mcnemar_test
from qing.evaluate.evaluation import SUMMARY_METRICS, SUMMARY_PER_LABEL, Evaluation, evaluate_logits
from qing.evaluate.inference import (
    Batch,
    CUDAUnavailableError,
    LoaderLogits,
    Runner,
    TorchRunner,
    autocast,
    collect_logits,
    iter_logits,
    resolve_device,
)
from qing.evaluate.metrics import (
    auroc_bootstrap,
    compute_metrics,
    model_probabilities,
    probabilities,
    wilson_interval,
)
from qing.evaluate.plots import (
    curve_groups,
    plot_confusion_matrix,
    plot_pr_curves,
    plot_reliability_diagrams,
    plot_roc_comparison,
    plot_roc_curves,
    plot_training_curves,
)
from qing.evaluate.report import DISCLAIMER, write_report
from qing.evaluate.thresholds import THRESHOLD_METHODS, choose_thresholds, threshold_method_name
from qing.evaluate.tta import DEFAULT_TTA_VIEWS, TTAModel, View, augment, tta_views

__all__ = [
    "CALIBRATION_BINS",
    "DEFAULT_TTA_VIEWS",
    "DISCLAIMER",
    "SUMMARY_METRICS",
    "SUMMARY_PER_LABEL",
    "THRESHOLD_METHODS",
    "Batch",
    "CUDAUnavailableError",
    "Comparison",
    "Evaluation",
    "LoaderLogits",
    "Runner",
    "TTAModel",
    "TorchRunner",
    "View",
    "apply_temperatures",
    "augment",
    "auroc_bootstrap",
    "autocast",
    "calibration_bins",
    "calibration_scores",
    "choose_thresholds",
    "collect_logits",
    "compare",
    "compute_metrics",
    "curve_groups",
    "delong_test",
    "evaluate_logits",
    "expected_calibration_error",
    "fit_temperatures",
    "iter_logits",
    "mcnemar_test",
    "model_probabilities",
    "plot_confusion_matrix",
    "plot_pr_curves",
    "plot_reliability_diagrams",
    "plot_roc_comparison",
    "plot_roc_curves",
    "plot_training_curves",
    "probabilities",
    "resolve_device",
    "threshold_method_name",
    "tta_views",
    "wilson_interval",
    "write_report",
]
