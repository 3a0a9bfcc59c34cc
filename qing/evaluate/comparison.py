"""Paired comparison of two models on the same images: DeLong's test, a paired bootstrap, McNemar's test.

Two models scored on the **same** images are correlated: an easy image is easy for both. Tests that
treat the two AUROCs as independent are too conservative; these three account for the pairing:

- **DeLong's test** (DeLong, DeLong & Clarke-Pearson, 1988) of ``AUROC_A - AUROC_B``: the variance of
  the difference from the two models' structural components (per positive, the fraction of negatives
  it outscores; per negative, the fraction of positives outscoring it), computed with the fast
  midrank algorithm of Sun & Xu (2014) in ``O(N log N)``. Gives a 95% interval and a two-sided p-value
  from the normal approximation.
- **Paired bootstrap**: both models' AUROC on the same resamples of the images (the resamples of
  :func:`qing.evaluate.auroc_bootstrap`), the percentile interval of the difference. A second opinion
  that needs no normal approximation.
- **McNemar's test** at each model's decision threshold: among the images exactly one model gets
  right, is it ``A`` as often as ``B``? The exact two-sided binomial test on the discordant pairs
  ``b`` (only A right) and ``c`` (only B right): ``p = min(1, 2 * P(X <= min(b, c)))``,
  ``X ~ Binomial(b + c, 1/2)``.

Example::

    from qing.evaluate import compare

    result = compare(targets, probs_a, probs_b, task="binary", label_names=["PNEUMONIA"],
                     thresholds_a=[0.42], thresholds_b=[0.37], names=("hybrid", "densenet121"))
    result.per_label[0]["delong"]["p_value"]
    result.write_report("compare-hybrid-densenet121")
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from scipy.stats import binom, norm, rankdata

from qing._format import format_value
from qing._io import write_text_atomic
from qing.evaluate._inputs import as_numpy, check_inputs, jsonable
from qing.evaluate.metrics import _percentile_interval, _resampled_aurocs, _resolve_thresholds
from qing.evaluate.plots import plot_roc_comparison
from qing.evaluate.report import _render_html, _render_markdown
from qing.version import __version__

__all__ = ["Comparison", "compare", "delong_test", "mcnemar_test"]


def _structural_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sun & Xu's midrank computation of DeLong's components for ``K`` score columns.

    Args:
        y: ``(N,)`` 0/1 labels with both classes.
        scores: ``(N, K)`` scores.

    Returns:
        ``(aucs (K,), v10 (K, m), v01 (K, n))`` for the ``m`` positives and ``n`` negatives: ``v10[k, i]``
        is the fraction of negatives positive ``i`` outscores (ties count one half), ``v01[k, j]`` the
        fraction of positives outscoring negative ``j``.
    """
    pos, neg = scores[y == 1], scores[y == 0]
    m, n = len(pos), len(neg)
    tz = rankdata(np.concatenate([pos, neg]), axis=0)  # midranks among all N
    tx = rankdata(pos, axis=0)  # among the positives
    ty = rankdata(neg, axis=0)  # among the negatives
    v10 = ((tz[:m] - tx) / n).T  # negatives below positive i (+ half the ties)
    v01 = (1.0 - (tz[m:] - ty) / m).T  # positives above negative j (+ half the ties)
    aucs = v10.mean(axis=1)
    return aucs, v10, v01


def delong_test(targets: Any, scores_a: Any, scores_b: Any, *, confidence: float = 0.95) -> dict[str, Any]:
    """DeLong's test of the difference between two correlated AUROCs (fast algorithm of Sun & Xu, 2014).

    Args:
        targets: ``(N,)`` 0/1 labels (both classes present).
        scores_a: ``(N,)`` scores of model A.
        scores_b: ``(N,)`` scores of model B on the same images.
        confidence: Interval coverage.

    Returns:
        ``{"auroc_a", "auroc_b", "difference" (A - B), "se", "ci" [low, high], "z", "p_value",
        "covariance" (2 x 2 of the two AUROCs), "confidence"}``; ``z`` and ``p_value`` are ``None`` when
        the difference has zero variance (identical rankings), with ``p_value`` then 1 if the difference is 0.
    """
    y = as_numpy(targets).reshape(-1).astype(np.int64)
    scores = np.stack([as_numpy(scores_a).reshape(-1), as_numpy(scores_b).reshape(-1)], axis=1).astype(np.float64)
    if len(scores) != len(y):
        raise ValueError(f"targets and scores differ in length: {len(y)} vs {len(scores)}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("targets must be 0/1")
    m, n = int(y.sum()), int((1 - y).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least 2 positives and 2 negatives, got {m} and {n}")
    aucs, v10, v01 = _structural_components(y, scores)
    cov = np.cov(v10) / m + np.cov(v01) / n
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    z_crit = float(norm.ppf(0.5 + confidence / 2))
    if se > 1e-12:
        z: Optional[float] = diff / se
        p_value: Optional[float] = float(2 * norm.sf(abs(z)))
    else:
        z, p_value = None, 1.0 if abs(diff) < 1e-12 else None
    return {
        "auroc_a": float(aucs[0]),
        "auroc_b": float(aucs[1]),
        "difference": diff,
        "se": se,
        "ci": [diff - z_crit * se, diff + z_crit * se],
        "z": z,
        "p_value": p_value,
        "covariance": cov.tolist(),
        "confidence": confidence,
    }


def mcnemar_test(correct_a: Any, correct_b: Any) -> dict[str, Any]:
    """McNemar's exact test of paired 0/1 outcomes (each model right or wrong on the same images).

    Args:
        correct_a: ``(N,)`` booleans, model A right on image ``i``.
        correct_b: ``(N,)`` booleans, model B right on image ``i``.

    Returns:
        ``{"both_right", "only_a_right" (b), "only_b_right" (c), "both_wrong", "accuracy_a",
        "accuracy_b", "p_value", "method": "exact binomial"}``; ``p_value = min(1, 2 * P(X <= min(b, c)))``
        with ``X ~ Binomial(b + c, 1/2)`` (1 when ``b + c == 0``).
    """
    a = as_numpy(correct_a).reshape(-1).astype(bool)
    b_ = as_numpy(correct_b).reshape(-1).astype(bool)
    if a.shape != b_.shape:
        raise ValueError(f"correct_a and correct_b differ in length: {len(a)} vs {len(b_)}")
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    p_value = 1.0 if b + c == 0 else min(1.0, float(2 * binom.cdf(min(b, c), b + c, 0.5)))
    return {
        "both_right": int((a & b_).sum()),
        "only_a_right": b,
        "only_b_right": c,
        "both_wrong": int((~a & ~b_).sum()),
        "accuracy_a": float(a.mean()) if len(a) else None,
        "accuracy_b": float(b_.mean()) if len(a) else None,
        "p_value": p_value,
        "method": "exact binomial",
    }


@dataclass
class Comparison:
    """Two models compared on the same images (see :func:`compare`).

    Attributes:
        names: The two models' names, ``(A, B)``.
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        label_names: One name per output.
        n_samples: Images compared.
        per_label: Per output (one-vs-rest for multiclass): ``label, n_positive, n_negative, auroc_a,
            auroc_b, difference, delong, bootstrap`` and, for sigmoid tasks, ``mcnemar`` (with the
            ``threshold_a``/``threshold_b`` used); ``delong``/``bootstrap`` are ``None`` for a label with
            too few positives or negatives, explained in ``note``.
        mcnemar: Multiclass: McNemar's test of the two argmax predictions; ``None`` otherwise.
        settings: Confidence, bootstrap resamples and seed, and how the decisions were made.
        notes: Anything the reader should know (labels skipped, default thresholds).
        targets: ``(N, C)`` 0/1 (one-hot for multiclass).
        probs_a: ``(N, C)`` probabilities of A.
        probs_b: ``(N, C)`` probabilities of B.
    """

    names: tuple[str, str]
    task: str
    label_names: list[str]
    n_samples: int
    per_label: list[dict[str, Any]]
    mcnemar: Optional[dict[str, Any]]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    targets: Optional[np.ndarray] = None
    probs_a: Optional[np.ndarray] = None
    probs_b: Optional[np.ndarray] = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able results (``comparison.json``), without the arrays."""
        return jsonable(
            {
                "model_a": self.names[0],
                "model_b": self.names[1],
                "task": self.task,
                "label_names": self.label_names,
                "n_samples": self.n_samples,
                "settings": self.settings,
                "per_label": self.per_label,
                "mcnemar": self.mcnemar,
                "notes": self.notes,
            }
        )

    def write_report(self, folder: Union[str, Path], *, title: str = "") -> Path:
        """Write ``comparison.json``, ``roc_comparison.png`` and ``report.html`` / ``report.md`` into ``folder``.

        Returns:
            The path of ``report.html``.
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "comparison.json", json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        figure = plot_roc_comparison(
            self.targets, {self.names[0]: self.probs_a, self.names[1]: self.probs_b}, out / "roc_comparison.png",
            label_names=self.label_names,
        )  # fmt: skip
        sections = _comparison_sections(self, figure.name)
        title = title or f"{self.names[0]} vs {self.names[1]}"
        write_text_atomic(out / "report.md", _render_markdown(title, sections))
        return write_text_atomic(out / "report.html", _render_html(title, sections))


def compare(
    targets: Any,
    probs_a: Any,
    probs_b: Any,
    *,
    task: str,
    label_names: Sequence[str],
    thresholds_a: Optional[Sequence[float]] = None,
    thresholds_b: Optional[Sequence[float]] = None,
    decisions_a: Any = None,
    decisions_b: Any = None,
    names: tuple[str, str] = ("A", "B"),
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Compare two models' probabilities on the same images, per label (see the module docstring).

    Args:
        targets: ``(N, C)`` 0/1 (binary, multilabel; ``(N,)`` for binary) or ``(N,)`` class indices.
        probs_a: ``(N, C)`` probabilities of model A (row ``i`` = image ``i`` for both models).
        probs_b: ``(N, C)`` probabilities of model B.
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"``.
        label_names: ``C`` names.
        thresholds_a: A's per-output thresholds for McNemar's test (sigmoid tasks; default 0.5, noted).
        thresholds_b: B's.
        decisions_a: ``(N, C)`` 0/1 decisions of A instead of thresholds (e.g. read from a predictions CSV).
        decisions_b: B's.
        names: The two models' names for the report.
        n_bootstrap: Paired bootstrap resamples (0: none).
        confidence: Coverage of the intervals.
        seed: Seed of the bootstrap (resample ``b`` is that of :func:`qing.evaluate.auroc_bootstrap`).

    Returns:
        A :class:`Comparison`.
    """
    y, pa = check_inputs(targets, probs_a, task=task, label_names=label_names)
    _, pb = check_inputs(targets, probs_b, task=task, label_names=label_names)
    n, c = pa.shape
    names = (str(names[0]), str(names[1]))
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    decided = {}
    if task != "multiclass":
        for side, thresholds, decisions in (("a", thresholds_a, decisions_a), ("b", thresholds_b, decisions_b)):
            probs = pa if side == "a" else pb
            if decisions is not None:
                d = as_numpy(decisions).reshape(n, -1).astype(np.int64)
                if d.shape != (n, c):
                    raise ValueError(f"decisions_{side} must have shape ({n}, {c}), got {list(d.shape)}")
                decided[side] = (d, None, "given decisions")
            else:
                used = _resolve_thresholds(thresholds, task=task, num_outputs=c)
                how = "given thresholds" if thresholds is not None else "0.5 (no thresholds given)"
                if thresholds is None:
                    notes.append(f"{names[0 if side == 'a' else 1]}: no thresholds given; McNemar's test used 0.5.")
                decided[side] = ((probs >= np.asarray(used)[None, :]).astype(np.int64), used, how)

    boot_a = boot_b = None
    testable = [j for j in range(c) if min(int(y[:, j].sum()), int(n - y[:, j].sum())) >= 2]
    if n_bootstrap and testable:
        both = np.concatenate([pa[:, testable], pb[:, testable]], axis=1)
        aucs = _resampled_aurocs(np.concatenate([y[:, testable]] * 2, axis=1), both, n_bootstrap=n_bootstrap, seed=seed)
        boot_a, boot_b = aucs[:, : len(testable)], aucs[:, len(testable) :]

    for j, name in enumerate(label_names):
        n_pos = int(y[:, j].sum())
        row: dict[str, Any] = {"label": str(name), "n_positive": n_pos, "n_negative": n - n_pos}
        if j in testable:
            test = delong_test(y[:, j], pa[:, j], pb[:, j], confidence=confidence)
            row.update(auroc_a=test["auroc_a"], auroc_b=test["auroc_b"], difference=test["difference"])
            row["delong"] = {k: test[k] for k in ("ci", "se", "z", "p_value")}
            if boot_a is not None:
                k = testable.index(j)
                diffs = boot_a[:, k] - boot_b[:, k]
                row["bootstrap"] = {
                    "ci": _percentile_interval(diffs, confidence),
                    "n_resamples": n_bootstrap,
                    "n_skipped": int((~np.isfinite(diffs)).sum()),
                }
            else:
                row["bootstrap"] = None
            row["note"] = None
        else:
            row.update(auroc_a=None, auroc_b=None, difference=None, delong=None, bootstrap=None)
            row["note"] = f"{n_pos} positive(s) and {n - n_pos} negative(s): too few for the AUROC tests"
        if task != "multiclass":
            (da, ta, _), (db, tb, _) = decided["a"], decided["b"]
            truth = y[:, j]
            row["mcnemar"] = {
                "threshold_a": ta[j] if ta is not None else None,
                "threshold_b": tb[j] if tb is not None else None,
                **mcnemar_test(da[:, j] == truth, db[:, j] == truth),
            }
        rows.append(row)
    overall = None
    if task == "multiclass":
        truth = y.argmax(axis=1)
        overall = mcnemar_test(pa.argmax(axis=1) == truth, pb.argmax(axis=1) == truth)
    skipped = [r["label"] for r in rows if r["delong"] is None]
    if skipped:
        notes.append(f"No AUROC test for {', '.join(skipped)}: fewer than 2 positives or negatives.")
    settings = {
        "confidence": confidence,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "delong": "fast midrank algorithm (Sun & Xu, 2014), normal approximation, two-sided",
        "bootstrap": "paired percentile bootstrap of AUROC_A - AUROC_B, shared resamples",
        "mcnemar": "exact binomial, two-sided" + ("" if task != "multiclass" else ", argmax predictions"),
        "decisions_a": decided["a"][2] if decided else "argmax",
        "decisions_b": decided["b"][2] if decided else "argmax",
    }
    labels = [str(x) for x in label_names]
    return Comparison(names, task, labels, n, jsonable(rows), overall, settings, notes, y, pa, pb)


def _p_text(p: Optional[float]) -> str:
    if p is None:
        return format_value(None)
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _interval(ci: Optional[Sequence[float]]) -> str:
    return format_value(None) if not ci else f"{ci[0]:+.3f} to {ci[1]:+.3f}"


def _comparison_sections(result: Comparison, figure: str) -> list[tuple[str, list[tuple]]]:
    a, b = result.names
    level = round(100 * result.settings["confidence"])
    auroc_rows = []
    for row in result.per_label:
        delong, boot = row["delong"] or {}, row["bootstrap"] or {}
        auroc_rows.append([
            row["label"], str(row["n_positive"]), str(row["n_negative"]), format_value(row["auroc_a"]),
            format_value(row["auroc_b"]),
            "undefined" if row["difference"] is None else f"{row['difference']:+.3f}",
            _interval(delong.get("ci")), _p_text(delong.get("p_value")), _interval(boot.get("ci")),
            row["note"] or "",
        ])  # fmt: skip
    auroc_headers = [
        "label", "positives", "negatives", f"AUROC {a}", f"AUROC {b}", "difference", f"DeLong {level}% CI",
        "DeLong p", f"bootstrap {level}% CI", "note",
    ]  # fmt: skip
    sections: list[tuple[str, list[tuple]]] = [
        (
            "AUROC difference (A - B)",
            [
                ("text", f"A = {a}, B = {b}, on the same {result.n_samples} images. A positive difference favours A."),
                ("table", auroc_headers, auroc_rows),
            ],
        )
    ]
    if result.task != "multiclass":
        rows = []
        for row in result.per_label:
            m = row["mcnemar"]
            rows.append([
                row["label"], format_value(m["threshold_a"], 4), format_value(m["threshold_b"], 4),
                format_value(m["accuracy_a"]), format_value(m["accuracy_b"]), str(m["only_a_right"]),
                str(m["only_b_right"]), _p_text(m["p_value"]),
            ])  # fmt: skip
        text = (
            f"Each model at its own decision threshold ({result.settings['decisions_a']} for {a}, "
            f"{result.settings['decisions_b']} for {b}). Only the images exactly one model gets right count."
        )
        headers = ["label", f"threshold {a}", f"threshold {b}", f"accuracy {a}", f"accuracy {b}",
                   f"only {a} right", f"only {b} right", "McNemar p"]  # fmt: skip
        sections.append(("McNemar's test at the thresholds", [("text", text), ("table", headers, rows)]))
    else:
        m = result.mcnemar
        text = (
            f"Argmax predictions: accuracy {format_value(m['accuracy_a'])} ({a}) vs {format_value(m['accuracy_b'])} "
            f"({b}); only {a} right on {m['only_a_right']} images, only {b} on {m['only_b_right']}; "
            f"McNemar p = {_p_text(m['p_value'])}."
        )
        sections.append(("McNemar's test", [("text", text)]))
    sections.append(("ROC curves", [("image", figure, "ROC curves of both models")]))
    method = [
        f"DeLong: {result.settings['delong']}.",
        f"Bootstrap: {result.settings['bootstrap']}, {result.settings['n_bootstrap']} resamples, seed "
        f"{result.settings['seed']}.",
        f"McNemar: {result.settings['mcnemar']}.",
        "Several labels mean several tests: a p-value below 0.05 on one of 14 labels is expected by chance "
        "(correct for multiplicity, e.g. Holm or Bonferroni, before claiming a difference).",
    ]
    sections.append(("Methods", [("list", method)]))
    if result.notes:
        sections.append(("Notes", [("list", list(result.notes))]))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    about = f"Written by qing {__version__} on {stamp}. Full numbers: comparison.json."
    sections.append(("About", [("text", about)]))
    return sections
