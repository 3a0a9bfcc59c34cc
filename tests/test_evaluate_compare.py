"""Paired comparison: DeLong's test (against a hand-computed case and the direct O(n^2) definition), the paired
bootstrap (against an explicit loop), McNemar's exact test, and the report; test-time augmentation."""

import json
import math
import re

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

import qing
from qing.evaluate import (
    DEFAULT_TTA_VIEWS,
    TTAModel,
    View,
    augment,
    compare,
    delong_test,
    mcnemar_test,
    probabilities,
    tta_views,
)


def _delong_direct(y, a, b):
    """DeLong et al. (1988) as written: psi over every (positive, negative) pair, O(m n)."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)

    def psi(u, v):
        return (u > v) + 0.5 * (u == v)

    v10 = np.array([[psi(s[i], s[neg]).mean() for i in pos] for s in (a, b)])
    v01 = np.array([[psi(s[pos], s[j]).mean() for j in neg] for s in (a, b)])
    cov = np.cov(v10) / len(pos) + np.cov(v01) / len(neg)
    return v10.mean(axis=1), cov


def test_delong_hand_computed():
    # A: positives .9, .6; negatives .7, .1 -> V10 = [1, .5], V01 = [.5, 1], AUROC .75
    # B separates perfectly: V10 = V01 = [1, 1], AUROC 1, no variance
    # var(A) = S10/2 + S01/2 = .125/2 + .125/2 = .125; var(A - B) = .125, se = .35355
    y = np.array([1, 1, 0, 0])
    result = delong_test(y, [0.9, 0.6, 0.7, 0.1], [0.8, 0.7, 0.4, 0.5])
    assert (result["auroc_a"], result["auroc_b"], result["difference"]) == (0.75, 1.0, -0.25)
    assert np.asarray(result["covariance"]) == pytest.approx(np.array([[0.125, 0.0], [0.0, 0.0]]))
    assert result["se"] == pytest.approx(math.sqrt(0.125))
    assert result["z"] == pytest.approx(-0.25 / math.sqrt(0.125))
    assert result["p_value"] == pytest.approx(2 * norm.sf(0.25 / math.sqrt(0.125)))  # 0.4795
    assert result["p_value"] == pytest.approx(0.4795, abs=1e-4)
    assert result["ci"] == pytest.approx([-0.25 - 1.959964 * 0.353553, -0.25 + 1.959964 * 0.353553], abs=1e-6)
    same = delong_test(y, [0.9, 0.6, 0.7, 0.1], [0.9, 0.6, 0.7, 0.1])
    assert same["difference"] == 0.0 and same["p_value"] == 1.0 and same["z"] is None
    with pytest.raises(ValueError, match="at least 2 positives and 2 negatives, got 1 and 3"):
        delong_test([1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_delong_equals_the_direct_definition_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 80
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    a = np.round(y * 0.8 + rng.normal(0, 1, n), 1)  # rounding makes ties within and across classes
    b = np.round(0.5 * a + y * 0.3 + rng.normal(0, 1, n), 1)
    result = delong_test(y, a, b)
    aucs, cov = _delong_direct(y, a, b)
    assert [result["auroc_a"], result["auroc_b"]] == pytest.approx([roc_auc_score(y, a), roc_auc_score(y, b)])
    assert [result["auroc_a"], result["auroc_b"]] == pytest.approx(aucs.tolist())
    assert np.asarray(result["covariance"]) == pytest.approx(cov, abs=1e-14)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    assert result["p_value"] == pytest.approx(2 * norm.sf(abs(aucs[0] - aucs[1]) / math.sqrt(var)))


def test_mcnemar_hand_computed():
    # b = 1 (only A right), c = 5: p = 2 P(X <= 1), X ~ Bin(6, 1/2) = 2 (1 + 6) / 64
    a = [1, 0, 0, 0, 0, 0, 1, 1, 0]
    b = [0, 1, 1, 1, 1, 1, 1, 1, 0]
    result = mcnemar_test(a, b)
    assert result == {
        "both_right": 2, "only_a_right": 1, "only_b_right": 5, "both_wrong": 1, "accuracy_a": 3 / 9,
        "accuracy_b": 7 / 9, "p_value": 14 / 64, "method": "exact binomial",
    }  # fmt: skip
    assert mcnemar_test([1, 0, 1], [1, 0, 1])["p_value"] == 1.0  # no discordant pair
    assert mcnemar_test([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1])["p_value"] == 1.0  # 3 vs 3: capped at 1
    assert mcnemar_test([1] * 10, [0] * 10)["p_value"] == pytest.approx(2 / 1024)


def test_compare_binary_paired_bootstrap_and_mcnemar(tmp_path):
    rng = np.random.default_rng(4)
    n = 60
    y = rng.integers(0, 2, n)
    pa = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)
    pb = np.clip(0.15 * y + rng.random(n) * 0.85, 0, 1)
    result = compare(
        y, pa, pb, task="binary", label_names=["PNEUMONIA"], thresholds_a=[0.5], thresholds_b=[0.45],
        names=("hybrid", "densenet121"), n_bootstrap=200, seed=3,
    )  # fmt: skip
    (row,) = result.per_label
    direct = delong_test(y, pa, pb)
    assert row["difference"] == pytest.approx(direct["difference"])
    assert row["delong"]["p_value"] == pytest.approx(direct["p_value"])
    # the paired bootstrap: both AUROCs on the same resamples (those of auroc_bootstrap), percentile of the difference
    idx = np.random.default_rng(3).integers(0, n, size=(200, n))
    diffs = [roc_auc_score(y[i], pa[i]) - roc_auc_score(y[i], pb[i]) for i in idx if 0 < y[i].sum() < n]
    assert row["bootstrap"]["ci"] == pytest.approx(np.percentile(diffs, [2.5, 97.5]).tolist())
    assert row["bootstrap"]["n_skipped"] == 200 - len(diffs)
    m = row["mcnemar"]
    assert (m["threshold_a"], m["threshold_b"]) == (0.5, 0.45)
    assert m == {"threshold_a": 0.5, "threshold_b": 0.45, **mcnemar_test((pa >= 0.5) == y, (pb >= 0.45) == y)}

    report = result.write_report(tmp_path / "cmp")
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        "comparison.json", "report.html", "report.md", "roc_comparison.png",
    ]  # fmt: skip
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert (saved["model_a"], saved["model_b"], saved["n_samples"]) == ("hybrid", "densenet121", 60)
    assert saved["per_label"][0]["delong"]["p_value"] == pytest.approx(direct["p_value"])
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert f"| PNEUMONIA | {int(y.sum())} | {n - int(y.sum())} |" in md and "McNemar" in md
    assert report.name == "report.html"


def test_compare_multilabel_skips_labels_too_rare_and_multiclass_mcnemar():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (30, 3))
    y[:, 2] = 0
    y[0, 2] = 1  # one positive: no AUROC test
    pa, pb = rng.random((30, 3)), rng.random((30, 3))
    result = compare(y, pa, pb, task="multilabel", label_names=["a", "b", "c"], n_bootstrap=50)
    assert result.per_label[2]["delong"] is None and result.per_label[2]["bootstrap"] is None
    assert result.per_label[2]["note"] == "1 positive(s) and 29 negative(s): too few for the AUROC tests"
    assert result.per_label[2]["mcnemar"]["threshold_a"] == 0.5  # McNemar still runs at the thresholds
    assert "No AUROC test for c: fewer than 2 positives or negatives." in result.notes
    assert any("no thresholds given; McNemar's test used 0.5" in n for n in result.notes)

    classes = rng.integers(0, 3, 40)
    qa = probabilities(rng.normal(0, 1, (40, 3)) + 2 * np.eye(3)[classes], "multiclass")
    qb = probabilities(rng.normal(0, 1, (40, 3)), "multiclass")
    multi = compare(classes, qa, qb, task="multiclass", label_names=["x", "y", "z"], n_bootstrap=0)
    assert multi.mcnemar == mcnemar_test(qa.argmax(1) == classes, qb.argmax(1) == classes)
    assert all("mcnemar" not in row for row in multi.per_label)
    assert multi.per_label[0]["auroc_a"] == pytest.approx(roc_auc_score(classes == 0, qa[:, 0]))
    with pytest.raises(ValueError, match=re.escape("decisions_a must have shape (30, 3), got [30, 2]")):
        compare(y, pa, pb, task="multilabel", label_names=list("abc"), decisions_a=np.zeros((30, 2)))


# ---- test-time augmentation ----------------------------------------------------------------------------


def test_tta_views_are_exact_shifts_and_zooms_without_a_flip():
    assert [v.name for v in DEFAULT_TTA_VIEWS] == [
        "identity", "shift right 4%", "shift left 4%", "shift down 4%", "shift up 4%", "zoom 0.95", "zoom 1.05",
    ]  # fmt: skip
    assert not any(v.hflip for v in DEFAULT_TTA_VIEWS)  # laterality: no mirror by default
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    assert augment(x, View("identity")) is x
    right = augment(x, View("r", (0.125, 0.0)))  # one pixel to the right; the first column repeats the border
    assert torch.equal(right[..., 1:], x[..., :-1]) and torch.equal(right[..., 0], x[..., 0])
    down = augment(x, View("d", (0.0, 0.25)))  # two pixels down
    assert torch.equal(down[..., 2:, :], x[..., :-2, :])
    assert torch.equal(augment(x, View("flip", hflip=True)), torch.flip(x, dims=[-1]))
    zoom = augment(x, View("z", scale=2.0))  # the center magnified: output pixel 4 reads input 4 - 0.25... bilinear
    assert zoom.shape == x.shape and zoom[0, 0, 3:5, 3:5].mean() == pytest.approx(x[0, 0, 3:5, 3:5].mean())
    assert [v.name for v in tta_views(shift=0.0, scales=(), hflip=True)] == ["identity", "horizontal flip"]


def test_tta_model_averages_the_probabilities():
    torch.manual_seed(0)
    model = qing.create_model("qing_test_tr1", num_classes=2).eval()
    x = torch.randn(3, 3, 64, 64)
    views = tta_views(scales=(0.9,))
    with torch.no_grad():
        expected = torch.stack([model(augment(x, v)).double().sigmoid() for v in views]).mean(0)
        got = TTAModel(model, task="multilabel", views=views)(x)
        single = TTAModel(model, task="multilabel", views=[View("identity")])(x)
        multiclass = TTAModel(model, task="multiclass", views=views)(x)
    assert torch.sigmoid(got.double()) == pytest.approx(expected.numpy(), abs=1e-6)
    assert single == pytest.approx(model(x).detach().numpy(), abs=1e-5)  # one view: the model's own logits
    mean_softmax = torch.stack([model(augment(x, v)).double().softmax(-1) for v in views]).mean(0)
    assert multiclass.double().softmax(-1) == pytest.approx(mean_softmax.detach().numpy(), abs=1e-6)
    wrapped = TTAModel(model, task="binary")
    assert wrapped.num_classes == 2 and wrapped.pretrained_cfg is model.pretrained_cfg
