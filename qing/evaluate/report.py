"""The results folder of a run: ``metrics.json``, PNG figures and a one-page report (HTML and Markdown).

Everything lands in one folder and the reports link the figures by bare file name, so the
folder can be moved, zipped or published as it is.
"""

from __future__ import annotations

import datetime
import html
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from qing._format import MISSING, format_value
from qing._io import write_text_atomic
from qing.evaluate.plots import (
    plot_confusion_matrix,
    plot_pr_curves,
    plot_reliability_diagrams,
    plot_roc_curves,
    plot_training_curves,
)
from qing.explain import gradcam_layer, save_attention_overlays, save_feature_maps_figure, save_gradcam_overlays
from qing.version import __version__

__all__ = ["DISCLAIMER", "MAX_REPORT_IMAGES", "write_report"]

#: Shown at the top of every report.
DISCLAIMER = (
    "Research use only. qing is not a medical device: these numbers and pictures describe a model on "
    "one dataset and are not clinical evidence, nor a substitute for a radiologist's reading."
)

#: At most this many input images are shown in the attention and feature-map figures.
MAX_REPORT_IMAGES = 8

_log = logging.getLogger(__name__)

PathLike = Union[str, Path]
BadFile = Union[str, Path, tuple[Any, Any], Mapping[str, Any]]

# A report is a list of sections (heading, blocks); a block is one of
# ("text", str), ("list", [str]), ("table", headers, rows), ("image", file name, alt text).
Block = tuple


def _ci(interval: Optional[Sequence[float]]) -> str:
    return MISSING if not interval else f"{interval[0]:.3f} – {interval[1]:.3f}"


def _with_ci(value: Any, interval: Optional[Sequence[float]]) -> str:
    """``0.912 (0.850 – 0.960)``; the value alone when there is no interval."""
    text = format_value(value)
    return f"{text} ({_ci(interval)})" if interval and text != MISSING else text


def _confidence(metrics: Mapping[str, Any]) -> int:
    boot = metrics.get("roc_auc_bootstrap") or {}
    return round(100 * boot.get("confidence", 0.95))


def _bad_file_line(item: BadFile) -> str:
    if isinstance(item, Mapping):
        path, reason = item.get("path"), item.get("reason")
    elif isinstance(item, tuple):
        path, reason = item
    else:
        path, reason = item, None
    return f"{path}: {reason}" if reason else str(path)


def _summary_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    task = metrics["task"]
    mean = "" if task == "binary" else " (mean over labels)" if task == "multilabel" else " (macro, one-vs-rest)"
    average = "" if task == "binary" else " (macro)"
    boot = metrics.get("roc_auc_bootstrap") or {}
    bins = metrics.get("calibration_bins", 15)

    def row(name: str, key: str) -> list[str]:
        return [name, format_value(metrics.get(key)), _ci(metrics.get(f"{key}_ci")) if f"{key}_ci" in metrics else ""]

    rows = [
        ["samples", format_value(metrics["n_samples"]), ""],
        row("accuracy" + (" (label-wise)" if task == "multilabel" else ""), "accuracy"),
    ]
    if task == "multilabel":
        rows.append(row("subset accuracy (exact match)", "subset_accuracy"))
    rows += [
        row("sensitivity (recall)" + average, "sensitivity"),
        row("specificity" + ("" if task == "binary" else " (mean)"), "specificity"),
        row("PPV (precision)" + average, "ppv" if task == "binary" else "precision"),
    ]
    if task == "binary":
        rows.append(row("NPV", "npv"))
    rows += [
        row("F1" + average, "f1"),
        row("AUROC" + mean, "roc_auc"),
        row("PR-AUC (average precision)" + mean, "pr_auc"),
        row(f"ECE, {bins} equal-width bins" + mean, "ece"),
        row(f"ECE, {bins} equal-mass bins" + mean, "ece_equal_mass"),
        row("Brier score" + mean, "brier"),
    ]
    if boot:
        rows.append(
            [
                "bootstrap (AUROC, PR-AUC)",
                f"{boot['method']}, {boot['n_resamples']} resamples, seed {boot['seed']}, {boot['n_skipped']} skipped",
                "",
            ]
        )
    return rows


def _threshold_text(metrics: Mapping[str, Any]) -> str:
    method = metrics.get("threshold_method")
    if metrics["task"] == "multiclass":
        return "Multi-class: the predicted class is the argmax of the probabilities (no threshold)."
    rule = {
        "youden": "chosen on validation data by Youden's J (max sensitivity + specificity - 1)",
        "default 0.5": "not tuned: the default 0.5",
    }.get(method)
    if rule is None and method and method.startswith("sensitivity@"):
        rule = f"chosen on validation data as the highest threshold reaching sensitivity {method.split('@')[1]}"
    rule = rule or f"method: {method}"
    if metrics["task"] == "binary":
        what = f"Decision threshold {metrics['thresholds'][0]:.4g}"
    else:
        what = "Decision thresholds per label (see the table)"
    calibrated = (metrics.get("calibration") or {}).get("temperatures") is not None
    scale = "calibrated probability (after temperature scaling)" if calibrated else "probability"
    return f"{what}: {rule}. A sample is positive when its {scale} >= threshold."


def _per_label_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    return [
        [
            row["label"],
            format_value(row["n_positive"]),
            format_value(row["n_negative"]),
            "argmax" if row["threshold"] is None else f"{row['threshold']:.4g}",
            *(_with_ci(row[key], row.get(f"{key}_ci")) for key in _PER_LABEL_RATES),
            row["note"] or "",
        ]
        for row in metrics["per_label"]
    ]


def _calibration_blocks(metrics: Mapping[str, Any], figure: str) -> list[Block]:
    record = metrics.get("calibration") or {}
    temperatures = record.get("temperatures")
    before = record.get("uncalibrated")
    bins = metrics.get("calibration_bins", 15)
    if temperatures is None:
        intro = (
            "Probabilities as the model gives them (no temperature scaling). A calibrated model's images with "
            f"probability p are positive a fraction p of the time. ECE: the mean gap between the two over {bins} "
            f"bins (equal-width, or equal-mass with about N/{bins} images each); Brier score: mean (p - y)^2."
        )
    else:
        intro = (
            f"Probabilities after temperature scaling (logits divided by T, {record.get('source') or 'given'}); "
            f"the numbers before scaling are beside them. ECE: the mean gap between predicted probability and "
            f"observed frequency over {bins} bins; Brier score: mean (p - y)^2. Scaling keeps the ranking, so "
            "AUROC and PR-AUC are unchanged."
        )
    headers = ["label", "ECE", "ECE (equal-mass)", "Brier"]
    if temperatures is not None:
        headers = ["label", "temperature", *headers[1:], "ECE before", "Brier before"]
    rows = []
    for j, row in enumerate(metrics["per_label"]):
        cells = [row["label"], *(format_value(row[k]) for k in ("ece", "ece_equal_mass", "brier"))]
        if temperatures is not None:
            raw = before["per_label"][j] if before else {}
            cells = [cells[0], f"{temperatures[j]:.3g}", *cells[1:],
                     format_value(raw.get("ece")), format_value(raw.get("brier"))]  # fmt: skip
        rows.append(cells)
    return [("text", intro), ("table", headers, rows), ("image", figure, "reliability diagrams")]


def _confusion_block(metrics: Mapping[str, Any]) -> Optional[Block]:
    if metrics["task"] == "multilabel":
        return None  # one 2x2 per label: the figure shows them
    labels = metrics["confusion_matrix_labels"]
    rows = [[f"true {label}"] + [str(v) for v in counts] for label, counts in zip(labels, metrics["confusion_matrix"])]
    return ("table", ["", *(f"predicted {label}" for label in labels)], rows)


_PER_LABEL_RATES = ("roc_auc", "pr_auc", "sensitivity", "specificity", "ppv", "npv")
_PER_LABEL_HEADERS = [
    "label", "positives", "negatives", "threshold", "AUROC", "PR-AUC", "sensitivity", "specificity", "PPV", "NPV",
    "note",
]  # fmt: skip
_PER_LABEL_HEADINGS = {"binary": "Per label", "multilabel": "Per-label AUROC", "multiclass": "Per class (one-vs-rest)"}


def _sections(
    metrics: Mapping[str, Any],
    *,
    figures: Mapping[str, str],
    n_shown: int,
    bad_files: Iterable[BadFile],
    attention_method: str,
) -> list[tuple[str, list[Block]]]:
    """The report's content, independent of the output format."""
    confusion: list[Block] = [("text", "Rows: truth; columns: prediction.")]
    table = _confusion_block(metrics)
    if table is not None:
        confusion.append(table)
    confusion.append(("image", figures["confusion"], "confusion matrix"))
    ci = f"{_confidence(metrics)}% CI"
    per_label_note = (
        f"Each value with its {ci}: bootstrap for AUROC and PR-AUC, Wilson score for the rates at the threshold "
        "(PPV and NPV at this test set's prevalence)."
    )
    sections: list[tuple[str, list[Block]]] = [
        ("Summary", [("table", ["metric", "value", ci], _summary_rows(metrics))]),
        ("Decision threshold", [("text", _threshold_text(metrics))]),
        (
            _PER_LABEL_HEADINGS[metrics["task"]],
            [("text", per_label_note), ("table", _PER_LABEL_HEADERS, _per_label_rows(metrics))],
        ),
        ("Confusion matrix", confusion),
        (
            "Training curves",
            [("image", figures["curves"], "training curves") if "curves" in figures
             else ("text", "No training history given.")],
        ),
        ("ROC curves", [("image", figures["roc"], "ROC curves")]),
        ("Precision-recall curves", [("image", figures["pr"], "precision-recall curves")]),
        ("Calibration", _calibration_blocks(metrics, figures["reliability"])),
    ]  # fmt: skip
    if "gradcam" in figures:
        gradcam_text = (
            f"Grad-CAM at the backbone's last stage over {n_shown} input image(s), for each image's highest output: "
            "the regions whose features raise that output's logit. Coarse (one cell of the last feature map) and a "
            "heuristic: a check for shortcuts, not a localization of disease."
        )
        sections.append(("Grad-CAM", [("text", gradcam_text), ("image", figures["gradcam"], "Grad-CAM")]))
    if "attention" in figures:
        attention_text = (
            f"Class-token attention ({attention_method}) over {n_shown} input image(s). It shows where the model "
            "read from, not why it decided: attention is not a causal explanation."
        )
        sections.append(("Attention maps", [("text", attention_text), ("image", figures["attention"], "attention")]))
        features_text = "The most active channels of the backbone's last feature map for each image."
        sections.append(("CNN feature maps", [("text", features_text), ("image", figures["features"], "feature maps")]))
    if hasattr(bad_files, "to_list"):  # qing.data.BadFileLog
        bad_files = bad_files.to_list()
    bad = [_bad_file_line(item) for item in bad_files]
    skipped: list[Block] = [("list", bad)] if bad else [("text", "No input file was skipped.")]
    sections.append((f"Skipped files ({len(bad)})", skipped))
    if metrics.get("notes"):
        sections.append(("Notes", [("list", list(metrics["notes"]))]))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections.append(("About", [("text", f"Written by qing {__version__} on {stamp}. Full numbers: metrics.json.")]))
    return sections


def _render_html(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee}"
        ".disclaimer{background:#fff4e5;border-left:4px solid #f0a020;padding:.6em 1em}</style>",
        "</head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="disclaimer"><strong>{esc(DISCLAIMER)}</strong></p>',
    ]
    for heading, blocks in sections:
        out.append(f"<h2>{esc(heading)}</h2>")
        for block in blocks:
            kind = block[0]
            if kind == "text":
                out.append(f"<p>{esc(block[1])}</p>")
            elif kind == "list":
                out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block[2])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "image":
                out.append(f'<p><img src="{esc(block[1])}" alt="{esc(block[2])}"></p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _render_markdown(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    out = [f"# {title}", "", f"> **{DISCLAIMER}**", ""]
    for heading, blocks in sections:
        out += [f"## {heading}", ""]
        for block in blocks:
            kind = block[0]
            if kind == "text":
                out += [block[1], ""]
            elif kind == "list":
                out += [f"- {_md_cell(item)}" for item in block[1]] + [""]
            elif kind == "table":
                out.append("| " + " | ".join(_md_cell(h) for h in block[1]) + " |")
                out.append("|" + "---|" * len(block[1]))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block[2]]
                out.append("")
            elif kind == "image":
                out += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(out)


def write_report(
    out_dir: PathLike,
    *,
    metrics: Mapping[str, Any],
    targets: Any,
    probs: Any,
    label_names: Sequence[str],
    task: str,
    history: Optional[Sequence[Mapping[str, Any]]] = None,
    model: Any = None,
    images: Any = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    bad_files: Iterable[BadFile] = (),
    title: str = "",
    attention_method: str = "rollout",
    uncalibrated_probs: Any = None,
) -> Path:
    """Write a run's results folder and its one-page report.

    Files written into ``out_dir`` (created if needed; existing files of these names are replaced):

    - ``metrics.json``: ``metrics`` as given.
    - ``curves.png``: training curves, when ``history`` has epochs.
    - ``confusion_matrix.png``, ``roc.png``, ``pr.png``, ``reliability.png``.
    - ``gradcam.png`` (Grad-CAM of each image's highest output), when ``model`` (any model with a CNN
      backbone) and ``images`` are given; for a qing CNN-Transformer also ``attention.png``
      (class-token heatmaps) and ``feature_maps.png`` (most active CNN channels); first
      ``MAX_REPORT_IMAGES`` images.
    - ``report.html`` and ``report.md``: summary metrics with their intervals, the threshold and
      how it was chosen, the per-label table, calibration, the confusion matrix, the figures (linked
      by relative file name), skipped files, notes and a research-use disclaimer.

    Every file is written atomically (a reader never sees half of one).

    Args:
        out_dir: Results folder.
        metrics: Output of :func:`qing.evaluate.compute_metrics` for ``targets``/``probs``.
        targets: Targets the metrics were computed on (for the curves).
        probs: ``(N, C)`` probabilities the metrics were computed on.
        label_names: ``C`` names.
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        history: Per-epoch dicts (``epoch``, ``train_loss``, ``val_loss``, ``val_auroc``, ``lr``, ...).
        model: A model for the Grad-CAM figure (a qing ``CNNTransformer`` also gets the attention and
            feature-map figures).
        images: Normalized input images ``(B, C, H, W)`` for those figures.
        mean: Normalization mean of ``images`` (default ``model.pretrained_cfg["mean"]``).
        std: Normalization std of ``images`` (default ``model.pretrained_cfg["std"]``).
        bad_files: Skipped unreadable inputs: a ``qing.data.BadFileLog``, or paths,
            ``(path, reason)`` pairs or ``{"path", "reason"}`` mappings.
        title: Report title (default "qing evaluation report").
        attention_method: ``"rollout"`` or ``"last"`` for ``attention.png``.
        uncalibrated_probs: ``(N, C)`` probabilities before temperature scaling, drawn beside ``probs``
            in the reliability diagrams.

    Returns:
        Path of ``report.html``.
    """
    if metrics.get("task") != task or list(metrics.get("label_names", [])) != [str(n) for n in label_names]:
        raise ValueError(
            f"metrics are for task={metrics.get('task')!r} with labels {metrics.get('label_names')}, "
            f"but write_report got task={task!r} with labels {list(label_names)}"
        )
    if (model is None) != (images is None):
        raise ValueError("model and images go together: pass both for the attention and feature-map figures")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")

    figures: dict[str, Optional[str]] = {}
    if history:
        figures["curves"] = plot_training_curves(history, out / "curves.png").name
    figures["confusion"] = plot_confusion_matrix(
        metrics["confusion_matrix"], out / "confusion_matrix.png", labels=metrics["confusion_matrix_labels"]
    ).name
    thresholds = metrics.get("thresholds") or None
    figures["roc"] = plot_roc_curves(
        targets, probs, out / "roc.png", task=task, label_names=label_names, thresholds=thresholds
    ).name
    figures["pr"] = plot_pr_curves(targets, probs, out / "pr.png", task=task, label_names=label_names).name
    figures["reliability"] = plot_reliability_diagrams(
        targets, probs, out / "reliability.png", task=task, label_names=label_names,
        uncalibrated_probs=uncalibrated_probs, n_bins=metrics.get("calibration_bins", 15),
    ).name  # fmt: skip
    n_shown = 0
    if model is not None:
        shown = images[:MAX_REPORT_IMAGES]
        n_shown = len(shown)
        if _has_cnn_stage(model):
            figures["gradcam"] = save_gradcam_overlays(model, shown, out / "gradcam.png", mean=mean, std=std).name
        if hasattr(model, "forward_attention"):
            figures["attention"] = save_attention_overlays(
                model, shown, out / "attention.png", mean=mean, std=std, method=attention_method
            ).name
            figures["features"] = save_feature_maps_figure(
                model, shown, out / "feature_maps.png", mean=mean, std=std
            ).name

    sections = _sections(
        metrics, figures=figures, n_shown=n_shown, bad_files=bad_files, attention_method=attention_method
    )
    title = title or "qing evaluation report"
    write_text_atomic(out / "report.md", _render_markdown(title, sections))
    return write_text_atomic(out / "report.html", _render_html(title, sections))


def _has_cnn_stage(model: Any) -> bool:
    try:
        gradcam_layer(model)
    except TypeError as err:
        _log.info("no Grad-CAM figure: %s", err)
        return False
    return True
