"""Evaluation: probabilities, thresholds chosen on validation data, metrics, plots and reports.

Typical use after training::

    from qing.evaluate import probabilities, choose_thresholds, compute_metrics, write_report

    val_probs = probabilities(val_logits, task)
    thresholds = choose_thresholds(val_targets, val_probs, task=task, method="youden")
    test_probs = probabilities(test_logits, task)
    metrics = compute_metrics(test_targets, test_probs, task=task, label_names=names,
                              thresholds=thresholds, threshold_method="youden")
    write_report(run_dir / "report", metrics=metrics, targets=test_targets, probs=test_probs,
                 label_names=names, task=task, history=history, model=model, images=some_images)
"""

from qing.evaluate.metrics import auroc_bootstrap, compute_metrics, probabilities
from qing.evaluate.plots import (
    curve_groups,
    plot_confusion_matrix,
    plot_pr_curves,
    plot_roc_curves,
    plot_training_curves,
)
from qing.evaluate.report import DISCLAIMER, write_report
from qing.evaluate.thresholds import THRESHOLD_METHODS, choose_thresholds, threshold_method_name

__all__ = [
    "DISCLAIMER",
    "THRESHOLD_METHODS",
    "auroc_bootstrap",
    "choose_thresholds",
    "compute_metrics",
    "curve_groups",
    "plot_confusion_matrix",
    "plot_pr_curves",
    "plot_roc_curves",
    "plot_training_curves",
    "probabilities",
    "threshold_method_name",
    "write_report",
]
