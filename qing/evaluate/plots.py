"""PNG figures of a run: training curves, confusion matrix, ROC, precision-recall and reliability curves.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state, no GUI
backend; PNGs are rendered by Agg), so these functions are safe in scripts, workers and
notebooks alike. Curves are drawn with scikit-learn's ``RocCurveDisplay`` /
``PrecisionRecallDisplay`` / ``ConfusionMatrixDisplay``. Multi-label and multi-class
results get one panel per label (one-vs-rest) in a grid of at most four columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay, roc_curve

from qing._io import save_figure
from qing.evaluate._inputs import as_numpy, check_inputs
from qing.evaluate.calibration import CALIBRATION_BINS, calibration_bins, expected_calibration_error

__all__ = [
    "curve_groups",
    "plot_confusion_matrix",
    "plot_pr_curves",
    "plot_reliability_diagrams",
    "plot_roc_comparison",
    "plot_roc_curves",
    "plot_training_curves",
]

PathLike = Union[str, Path]
_DPI = 100


def _grid(
    n_panels: int,
    *,
    panel_size: float = 3.2,
    max_cols: int = 4,
    left: float = 0.7,
    bottom: float = 0.55,
    gap_w: float = 0.8,
    gap_h: float = 0.85,
) -> tuple[Figure, list[Axes]]:
    """A figure with ``n_panels`` axes in rows of ``max_cols``; unused cells are hidden.

    Margins and gaps are fixed in inches (room for tick labels, axis labels and panel
    titles) instead of constrained layout, which costs seconds on 14-panel grids.
    """
    cols = min(max_cols, n_panels)
    rows = math.ceil(n_panels / cols)
    width, height = panel_size * cols, panel_size * rows + 0.4
    axis_w = (width - left - 0.15 - gap_w * (cols - 1)) / cols
    axis_h = (height - bottom - 0.45 - gap_h * (rows - 1)) / rows
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(
        left=left / width,
        right=1 - 0.15 / width,
        bottom=bottom / height,
        top=1 - 0.45 / height,
        wspace=gap_w / axis_w,
        hspace=gap_h / axis_h,
    )
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def curve_groups(history: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Which history keys ``plot_training_curves`` draws in which panel.

    ``*loss`` keys share the "loss" panel; ``lr``, ``lr_*`` and ``*_lr`` keys the log-scale
    "learning rate" panel; numeric keys whose values all lie in ``[0, 1]`` (AUROC, accuracy...)
    the "metrics" panel. Other numbers (epoch time, images/s) are left out: they would flatten
    the metric curves.
    """
    keys = [k for k in dict.fromkeys(k for row in history for k in row) if k != "epoch"]
    values = {k: [row.get(k) for row in history if isinstance(row.get(k), (int, float))] for k in keys}
    numeric = [k for k in keys if values[k]]
    is_lr = [k for k in numeric if k == "lr" or k.startswith("lr_") or k.endswith("_lr")]
    groups = {
        "loss": [k for k in numeric if k.endswith("loss")],
        "metrics": [
            k for k in numeric if not k.endswith("loss") and k not in is_lr and all(0 <= v <= 1 for v in values[k])
        ],
        "learning rate": is_lr,
    }
    return {title: ks for title, ks in groups.items() if ks}


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: PathLike) -> Path:
    """Per-epoch curves from a training history: loss, metrics and learning-rate panels.

    See [curve_groups][qing.evaluate.curve_groups] for which key goes where.

    Args:
        history: One dict per epoch, e.g. ``{"epoch": 1, "train_loss": .6, "val_loss": .5,
            "val_auroc": .8, "lr": 1e-4}``; missing or ``None`` values are gaps.
        path: PNG file to write.

    Returns:
        ``path``.
    """
    if not history:
        raise ValueError("history is empty: no epochs to plot")
    groups = curve_groups(history)
    if not groups:
        keys = sorted({k for row in history for k in row})
        raise ValueError(f"history has no numeric values to plot (keys: {keys})")
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    fig = Figure(figsize=(4.2 * len(groups), 3.4), layout="constrained")
    for ax, (title, ks) in zip(np.atleast_1d(fig.subplots(1, len(groups))), groups.items()):
        for k in ks:
            values = [row.get(k) for row in history]
            ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", markersize=3, label=k)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers: no 1.5 ticks
        if title == "learning rate" and all(v > 0 for k in ks for v in (row.get(k) for row in history) if v):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return save_figure(fig, path, dpi=_DPI)


def plot_confusion_matrix(matrix: Any, path: PathLike, *, labels: Sequence[str], title: str = "") -> Path:
    """Confusion matrix with counts, rows = truth, columns = prediction.

    Args:
        matrix: ``(K, K)`` counts (binary, multiclass) with ``labels`` naming the ``K``
            classes, or ``(C, 2, 2)`` multilabel counts ``[[TN, FP], [FN, TP]]`` with
            ``labels`` naming the ``C`` labels (one panel each).
        path: PNG file to write.
        labels: Class names (``K``) or label names (``C``).
        title: Figure title.

    Returns:
        ``path``.
    """
    cm = as_numpy(matrix)
    if cm.ndim == 2 and cm.shape == (len(labels), len(labels)):
        side = max(4.0, 0.6 * len(labels) + 2.5)
        fig = Figure(figsize=(side + 1.0, side), layout="constrained")
        ax = fig.subplots()
        ConfusionMatrixDisplay(cm, display_labels=list(labels)).plot(
            ax=ax, cmap="Blues", values_format="d", xticks_rotation=45 if len(labels) > 3 else "horizontal"
        )
    elif cm.ndim == 3 and cm.shape == (len(labels), 2, 2):
        fig, axes = _grid(len(labels), panel_size=2.6, left=1.0, gap_w=1.05, gap_h=0.8)
        for ax, label, counts in zip(axes, labels, cm):
            ConfusionMatrixDisplay(counts, display_labels=["absent", "present"]).plot(
                ax=ax, cmap="Blues", values_format="d", colorbar=False
            )
            ax.set_title(label, fontsize="medium")
    else:
        raise ValueError(
            f"confusion matrix of shape {list(cm.shape)} does not match {len(labels)} labels; "
            "expected (K, K) or (C, 2, 2)"
        )
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=_DPI)


def _curve_panels(
    targets: Any, probs: Any, *, task: str, label_names: Sequence[str]
) -> tuple[Figure, list[tuple[Axes, str, np.ndarray, np.ndarray]]]:
    """Axes and one-vs-rest ``(label, y, p)`` for each output; one large panel for binary."""
    y, p = check_inputs(targets, probs, task=task, label_names=label_names)
    if p.shape[1] == 1:
        fig = Figure(figsize=(5.0, 5.0), layout="constrained")
        axes = [fig.subplots()]
    else:
        fig, axes = _grid(p.shape[1])
    return fig, [(ax, str(name), y[:, j], p[:, j]) for j, (ax, name) in enumerate(zip(axes, label_names))]


def _undefined(ax: Axes, label: str, y: np.ndarray) -> None:
    only = "negatives" if y.sum() == 0 else "positives"
    ax.text(0.5, 0.5, f"undefined:\nonly {only}", ha="center", va="center", transform=ax.transAxes)
    ax.set(title=label, xticks=[], yticks=[])


def _plot_curves(
    targets: Any,
    probs: Any,
    path: PathLike,
    *,
    task: str,
    label_names: Sequence[str],
    display: Any,
    xlabel: str,
    ylabel: str,
    decorate: Optional[Callable[[Axes, int, np.ndarray, np.ndarray], None]] = None,
) -> Path:
    """One scikit-learn curve ``display`` per output panel; ``decorate(ax, j, y, p)`` adds to panel ``j``."""
    fig, panels = _curve_panels(targets, probs, task=task, label_names=label_names)
    for j, (ax, label, y, p) in enumerate(panels):
        if y.min() == y.max():
            _undefined(ax, label, y)
            continue
        display.from_predictions(y, p, ax=ax, name=label, plot_chance_level=True)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        if decorate is not None:
            decorate(ax, j, y, p)
        ax.set_title(label, fontsize="medium")
        for text in ax.get_legend().get_texts():
            text.set_fontsize("small")
    return save_figure(fig, path, dpi=_DPI)


def plot_roc_curves(
    targets: Any,
    probs: Any,
    path: PathLike,
    *,
    task: str,
    label_names: Sequence[str],
    thresholds: Optional[Sequence[float]] = None,
) -> Path:
    """ROC curve per output (one-vs-rest for multiclass), AUROC in the legend.

    Args:
        targets: As for :func:`qing.evaluate.compute_metrics`.
        probs: ``(N, C)`` probabilities.
        path: PNG file to write.
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        label_names: ``C`` names.
        thresholds: If given, each panel marks the operating point of its threshold.

    Returns:
        ``path``.
    """

    def mark_threshold(ax: Axes, j: int, y: np.ndarray, p: np.ndarray) -> None:
        fpr, tpr, cut = roc_curve(y, p, drop_intermediate=False)
        i = int(np.flatnonzero(cut >= thresholds[j])[-1])
        ax.plot(fpr[i], tpr[i], "o", color="crimson", label=f"threshold {thresholds[j]:.3g}")
        ax.legend(loc="lower right", fontsize="small")

    return _plot_curves(
        targets, probs, path, task=task, label_names=label_names, display=RocCurveDisplay,
        xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", decorate=mark_threshold if thresholds else None,
    )  # fmt: skip


def plot_pr_curves(
    targets: Any,
    probs: Any,
    path: PathLike,
    *,
    task: str,
    label_names: Sequence[str],
) -> Path:
    """Precision-recall curve per output (one-vs-rest for multiclass), average precision in the legend.

    The dashed chance line is the label's prevalence. Arguments and result as for
    :func:`plot_roc_curves` (which also marks thresholds).
    """
    return _plot_curves(
        targets, probs, path, task=task, label_names=label_names, display=PrecisionRecallDisplay,
        xlabel="recall (sensitivity)", ylabel="precision",
    )  # fmt: skip


def plot_reliability_diagrams(
    targets: Any,
    probs: Any,
    path: PathLike,
    *,
    task: str,
    label_names: Sequence[str],
    uncalibrated_probs: Any = None,
    n_bins: int = CALIBRATION_BINS,
) -> Path:
    """Reliability diagram per output (one-vs-rest for multiclass): observed frequency against probability.

    Each non-empty equal-width bin is a point at (mean probability, fraction positive), the points of
    :func:`~qing.evaluate.calibration_bins` (the same as ``sklearn.calibration.CalibrationDisplay``);
    a calibrated model lies on the diagonal. The legend gives each curve's ECE. A bar strip along
    the bottom shows how many images fall in each bin.

    Args:
        targets: As for :func:`qing.evaluate.compute_metrics`.
        probs: ``(N, C)`` probabilities (calibrated, when ``uncalibrated_probs`` is given).
        path: PNG file to write.
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        label_names: ``C`` names.
        uncalibrated_probs: ``(N, C)`` probabilities before temperature scaling, drawn dashed in the
            same panels.
        n_bins: Equal-width bins.

    Returns:
        ``path``.
    """
    fig, panels = _curve_panels(targets, probs, task=task, label_names=label_names)
    raw = None if uncalibrated_probs is None else check_inputs(targets, uncalibrated_probs, task=task)[1]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for j, (ax, label, y, p) in enumerate(panels):
        ax.plot([0, 1], [0, 1], ":", color="gray", label="perfectly calibrated")
        curves = [("calibrated" if raw is not None else "model", p, "-", "tab:blue")]
        if raw is not None:
            curves.append(("before scaling", raw[:, j], "--", "tab:orange"))
        for name, values, style, color in curves:
            table = calibration_bins(y, values, n_bins=n_bins)
            ece = expected_calibration_error(y, values, n_bins=n_bins)
            ax.plot(table["mean_prob"], table["frac_pos"], style, marker="o", markersize=3, color=color,
                    label=f"{name} (ECE {ece:.3f})")  # fmt: skip
        counts = np.histogram(p, bins=edges)[0]
        ax.bar(edges[:-1], 0.15 * counts / max(1, counts.max()), width=1.0 / n_bins, align="edge",
               color="lightgray", zorder=0)  # fmt: skip
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="fraction positive")
        ax.set_title(label, fontsize="medium")
        ax.legend(loc="upper left", fontsize="x-small")
    return save_figure(fig, path, dpi=_DPI)


def plot_roc_comparison(
    targets: Any, probs_by_model: Mapping[str, Any], path: PathLike, *, label_names: Sequence[str]
) -> Path:
    """Overlaid ROC curves of several models on the same images, one panel per output.

    Args:
        targets: ``(N, C)`` 0/1 (one-hot for multiclass).
        probs_by_model: Model name -> its ``(N, C)`` probabilities on the same images.
        path: PNG file to write.
        label_names: ``C`` names.

    Returns:
        ``path``.
    """
    y = as_numpy(targets).astype(np.int64)
    y = y[:, None] if y.ndim == 1 else y
    fig, panels = _curve_panels(y, np.zeros(y.shape), task="multilabel", label_names=label_names)
    for j, (ax, label, truth, _) in enumerate(panels):
        if truth.min() == truth.max():
            _undefined(ax, label, truth)
            continue
        for k, (name, probs) in enumerate(probs_by_model.items()):
            p = np.asarray(probs, dtype=np.float64).reshape(len(y), -1)[:, j]
            RocCurveDisplay.from_predictions(truth, p, ax=ax, name=name, plot_chance_level=k == 0)
        ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)")
        ax.set_title(label, fontsize="medium")
        for text in ax.get_legend().get_texts():
            text.set_fontsize("small")
    return save_figure(fig, path, dpi=_DPI)
