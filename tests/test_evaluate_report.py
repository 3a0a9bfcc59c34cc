"""qing.evaluate plots and the one-page report: real PNGs, parsed HTML, Markdown."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

import qing
from qing.data import BadFileLog
from qing.evaluate import (
    DISCLAIMER,
    compute_metrics,
    plot_confusion_matrix,
    plot_pr_curves,
    plot_roc_curves,
    plot_training_curves,
    write_report,
)
from qing.evaluate.plots import curve_groups
from qing.weights import CXR14_LABELS

HISTORY = [
    {"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_auroc": 0.5 + 0.05 * e, "lr": 1e-4 * 0.5**e}
    for e in range(1, 5)
]


def _png(path, size=None):
    """Open a PNG, check its size and that it holds a real picture; return RGB pixels."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        if size is not None:
            assert im.size == size
        pixels = np.asarray(im.convert("RGB"))
    assert (pixels.min(axis=2) < 250).mean() > 0.02  # not blank
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn content, not a flat fill
    return pixels


class _Page(HTMLParser):
    """Tables (as lists of rows of cell text), image sources, headings and all text of an HTML page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.headings, self.text = [], [], [], []
        self._cell = self._heading = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs))
        elif tag == "h2":
            self._heading = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None
        elif tag == "h2":
            self.headings.append(self._heading)
            self._heading = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell += data
        if self._heading is not None:
            self._heading += data


def _parse(path):
    page = _Page()
    page.feed(path.read_text())
    page.close()
    return page


def test_plots_are_real_pngs(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = np.clip(0.4 * y + 0.6 * rng.random(80), 0, 1)
    _png(plot_roc_curves(y, p, tmp_path / "roc.png", task="binary", label_names=["x"], thresholds=[0.5]), (500, 500))
    _png(plot_pr_curves(y, p, tmp_path / "pr.png", task="binary", label_names=["x"]), (500, 500))
    _png(plot_training_curves(HISTORY, tmp_path / "curves.png"), (1260, 340))  # loss, metrics, lr panels
    _png(plot_confusion_matrix([[30, 5], [7, 38]], tmp_path / "cm.png", labels=["NORMAL", "PNEUMONIA"]), (500, 400))
    # multiclass: 3 one-vs-rest panels in a row of 3.2 in each
    t = rng.integers(0, 3, 60)
    probs = rng.dirichlet(np.ones(3), 60)
    _png(plot_roc_curves(t, probs, tmp_path / "roc3.png", task="multiclass", label_names=list("abc")), (960, 360))
    with pytest.raises(ValueError, match=re.escape("history is empty: no epochs to plot")):
        plot_training_curves([], tmp_path / "none.png")
    with pytest.raises(ValueError, match=re.escape("confusion matrix of shape [2, 2] does not match 3 labels")):
        plot_confusion_matrix([[1, 2], [3, 4]], tmp_path / "bad.png", labels=list("abc"))


def test_multilabel_report_with_attention_and_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    names = list(CXR14_LABELS)
    y = rng.integers(0, 2, (120, 14))
    y[:, 13] = 0  # Hernia: no positives in this test set
    p = np.clip(0.3 * y + 0.7 * rng.random((120, 14)), 0, 1)
    thresholds = [0.5] * 13 + [0.9]
    metrics = compute_metrics(
        y, p, task="multilabel", label_names=names, thresholds=thresholds, threshold_method="youden", n_bootstrap=100
    )
    model = qing.create_model("qing_test_tr1", num_classes=14)
    images = torch.randn(3, 3, 64, 64)
    bad = BadFileLog()
    bad.add("data/train/NORMAL/broken.png", "truncated file")
    bad.add("data/train/NORMAL/empty.png", "zero bytes")

    html_path = write_report(
        tmp_path / "report", metrics=metrics, targets=y, probs=p, label_names=names, task="multilabel",
        history=HISTORY, model=model, images=images, bad_files=bad, title="NIH <test> run",
    )  # fmt: skip
    out = tmp_path / "report"
    assert html_path == out / "report.html"
    assert json.loads((out / "metrics.json").read_text()) == metrics

    page = _parse(html_path)
    sources = [img["src"] for img in page.images]
    expected = [
        "confusion_matrix.png", "curves.png", "roc.png", "pr.png", "reliability.png", "gradcam.png", "attention.png",
        "feature_maps.png",
    ]  # fmt: skip
    assert sources == expected
    assert all(img["alt"] for img in page.images)
    # 14 labels in a 4 x 4 grid of 3.2 in panels (+0.4 in for titles), 100 dpi
    _png(out / "roc.png", (1280, 1320))
    _png(out / "pr.png", (1280, 1320))
    _png(out / "reliability.png", (1280, 1320))
    for name in ("confusion_matrix.png", "curves.png", "gradcam.png", "attention.png", "feature_maps.png"):
        _png(out / name)

    assert page.headings[:3] == ["Summary", "Decision threshold", "Per-label AUROC"]
    assert "Skipped files (2)" in page.headings
    summary, per_label = page.tables[0], page.tables[1]
    assert summary[0] == ["metric", "value", "95% CI"]
    values = {row[0]: row[1:] for row in summary[1:]}
    ci = metrics["roc_auc_ci"]
    assert values["AUROC (mean over labels)"] == [f"{metrics['roc_auc']:.3f}", f"{ci[0]:.3f} – {ci[1]:.3f}"]
    pr_ci = metrics["pr_auc_ci"]
    assert values["PR-AUC (average precision) (mean over labels)"][1] == f"{pr_ci[0]:.3f} – {pr_ci[1]:.3f}"
    assert values["ECE, 15 equal-width bins (mean over labels)"] == [f"{metrics['ece']:.3f}", ""]
    assert values["Brier score (mean over labels)"][0] == f"{metrics['brier']:.3f}"
    assert per_label[0] == [
        "label", "positives", "negatives", "threshold", "AUROC", "PR-AUC", "sensitivity", "specificity", "PPV", "NPV",
        "note",
    ]  # fmt: skip
    assert [row[0] for row in per_label[1:]] == names
    first = metrics["per_label"][0]
    low, high = first["roc_auc_ci"]
    assert per_label[1][4] == f"{first['roc_auc']:.3f} ({low:.3f} – {high:.3f})"
    low, high = first["sensitivity_ci"]
    assert per_label[1][6] == f"{first['sensitivity']:.3f} ({low:.3f} – {high:.3f})"
    hernia = per_label[14]
    assert hernia[1:5] == ["0", "120", "0.9", "undefined"]
    assert hernia[6] == "undefined"  # no positives: no sensitivity, no interval
    assert hernia[10] == "only negative targets (120 samples): AUROC and PR-AUC undefined"
    calibration = page.tables[2]  # no temperatures: ECE, equal-mass ECE and Brier per label
    assert calibration[0] == ["label", "ECE", "ECE (equal-mass)", "Brier"]
    assert calibration[1] == [names[0], *(f"{first[k]:.3f}" for k in ("ece", "ece_equal_mass", "brier"))]
    text = "".join(page.text)
    assert "Decision thresholds per label (see the table): chosen on validation data by Youden's J" in text
    assert "data/train/NORMAL/broken.png: truncated file" in text
    assert DISCLAIMER in text
    assert "<title>NIH &lt;test&gt; run</title>" in html_path.read_text()  # escaped

    md = (out / "report.md").read_text()
    assert md.startswith("# NIH <test> run\n")
    assert all(f"]({name})" in md for name in expected)
    assert f"| Hernia | 0 | 120 | 0.9 | undefined | undefined | undefined | {hernia[7]} |" in md
    assert "- data/train/NORMAL/empty.png: zero bytes" in md
    assert DISCLAIMER in md


def test_binary_report_without_model_or_history(tmp_path):
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.3, 0.35, 0.6, 0.4, 0.7, 0.8, 0.9])[:, None]
    metrics = compute_metrics(
        y, p, task="binary", label_names=["PNEUMONIA"], thresholds=[0.4],
        threshold_method="sensitivity@0.90", negative_label="NORMAL", n_bootstrap=50,
    )  # fmt: skip
    path = write_report(tmp_path, metrics=metrics, targets=y, probs=p, label_names=["PNEUMONIA"], task="binary")
    page = _parse(path)
    assert [img["src"] for img in page.images] == ["confusion_matrix.png", "roc.png", "pr.png", "reliability.png"]
    assert not (tmp_path / "attention.png").exists() and not (tmp_path / "curves.png").exists()
    # at t=0.4: TN=3 FP=1 FN=0 TP=4
    assert page.tables[2] == [
        ["", "predicted NORMAL", "predicted PNEUMONIA"],
        ["true NORMAL", "3", "1"],
        ["true PNEUMONIA", "0", "4"],
    ]
    summary = {row[0]: row[1:] for row in page.tables[0][1:]}
    assert summary["AUROC"][0] == "0.938"
    # TP 4 of 4 positives, TN 3 of 4 negatives, PPV 4 of 5, NPV 3 of 3: Wilson intervals
    assert summary["sensitivity (recall)"] == ["1.000", "0.510 – 1.000"]
    assert summary["specificity"] == ["0.750", "0.301 – 0.954"]
    assert summary["PPV (precision)"] == ["0.800", "0.376 – 0.964"]
    assert summary["NPV"] == ["1.000", "0.439 – 1.000"]
    assert summary["accuracy"] == ["0.875", "0.529 – 0.978"]
    text = "".join(page.text)
    assert (
        "Decision threshold 0.4: chosen on validation data as the highest threshold reaching sensitivity 0.90" in text
    )
    assert "No training history given." in text and "No input file was skipped." in text
    with pytest.raises(ValueError, match=re.escape("model and images go together")):
        write_report(tmp_path, metrics=metrics, targets=y, probs=p, label_names=["PNEUMONIA"], task="binary",
                     images=torch.zeros(1, 3, 64, 64))  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("metrics are for task='binary' with labels ['PNEUMONIA']")):
        write_report(tmp_path, metrics=metrics, targets=y, probs=p, label_names=["x"], task="binary")


def test_curve_groups_keep_metric_panel_readable():
    history = [
        {"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_auroc": 0.7, "lr": 1e-4, "backbone_lr": 1e-5,
         "epoch_time_s": 31.5, "train_images_per_s": 150.0},
        {"epoch": 2, "train_loss": 0.5, "val_loss": 0.5, "val_auroc": 0.8, "lr": 5e-5, "backbone_lr": 5e-6,
         "epoch_time_s": 30.1, "train_images_per_s": 155.0},
    ]  # fmt: skip
    assert curve_groups(history) == {
        "loss": ["train_loss", "val_loss"],
        "metrics": ["val_auroc"],
        "learning rate": ["lr", "backbone_lr"],
    }
