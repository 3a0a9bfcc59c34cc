"""Calibration (ECE, Brier, temperature scaling), Wilson intervals on the rates, the PR-AUC bootstrap, and the
calibrated evaluation the trainer and ``qing eval`` share: values against hand-computed cases and references."""

import json
import math
import re

import numpy as np
import pytest
import torch
from scipy.special import expit
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, brier_score_loss

import qing
from qing.evaluate import (
    apply_temperatures,
    auroc_bootstrap,
    calibration_bins,
    calibration_scores,
    compute_metrics,
    evaluate_logits,
    expected_calibration_error,
    fit_temperatures,
    model_probabilities,
    probabilities,
    wilson_interval,
)
from qing.evaluate.calibration import TEMPERATURE_BOUNDS, temperature_nll
from qing.evaluate.metrics import _percentile_interval, _resampled_aurocs
from qing.meta import ModelMeta, set_meta

# ---- ECE and Brier -------------------------------------------------------------------------------------


def test_ece_and_brier_hand_computed():
    y = np.array([0, 1, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.5, 0.6, 0.9, 0.8])
    # 3 equal-width bins: {.1,.2} mean .15, half positive -> gap .35; {.5,.6} -> |.5 - .55| = .05;
    # {.9,.8} mean .85, all positive -> .15. Two images each: ECE = (.35 + .05 + .15) / 3.
    assert expected_calibration_error(y, p, n_bins=3) == pytest.approx(0.55 / 3, abs=1e-12)
    # equal-mass edges at the 1/3 and 2/3 quantiles (.4, .6667) give the same three pairs
    assert expected_calibration_error(y, p, n_bins=3, strategy="quantile") == pytest.approx(0.55 / 3, abs=1e-12)
    table = calibration_bins(y, p, n_bins=3)
    assert table["count"] == [2, 2, 2]
    assert table["mean_prob"] == pytest.approx([0.15, 0.55, 0.85])
    assert table["frac_pos"] == pytest.approx([0.5, 0.5, 1.0])
    scores = calibration_scores(y, p, n_bins=3)
    # Brier: (.01 + .64 + .25 + .16 + .01 + .04) / 6
    assert scores == pytest.approx({"ece": 0.55 / 3, "ece_equal_mass": 0.55 / 3, "brier": 1.11 / 6})
    # a perfectly calibrated bin has no error; all-in-one-bin ECE is |prevalence - mean probability|
    assert expected_calibration_error([0, 1], [0.5, 0.5]) == 0.0
    assert expected_calibration_error([0, 0, 0, 1], [0.9, 0.9, 0.9, 0.9]) == pytest.approx(0.65)


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_bins_are_sklearns_calibration_curve(strategy):
    rng = np.random.default_rng(0)
    p = np.round(rng.beta(0.7, 0.9, 500), 2)  # ties, and values exactly on equal-width edges (0.2, 0.4, ...)
    p[:5] = [0.0, 1.0, 0.2, 0.4, 1 / 3]
    y = (rng.random(500) < p).astype(int)
    table = calibration_bins(y, p, n_bins=15, strategy=strategy)
    frac, mean = calibration_curve(y, p, n_bins=15, strategy=strategy)
    assert table["frac_pos"] == pytest.approx(frac.tolist(), abs=1e-12)
    assert table["mean_prob"] == pytest.approx(mean.tolist(), abs=1e-12)
    count = np.array(table["count"])
    assert count.sum() == 500
    ece = (count * np.abs(frac - mean)).sum() / 500
    assert expected_calibration_error(y, p, strategy=strategy) == pytest.approx(ece, abs=1e-12)
    assert calibration_scores(y, p)["brier"] == pytest.approx(brier_score_loss(y, p))


def test_calibration_input_errors():
    with pytest.raises(ValueError, match="strategy='equal' is not one of"):
        calibration_bins([0, 1], [0.2, 0.8], strategy="equal")
    with pytest.raises(ValueError, match=re.escape("targets and probs differ in length: 2 vs 3")):
        expected_calibration_error([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="probs must be finite probabilities in"):
        expected_calibration_error([0, 1], [0.1, 1.2])


# ---- temperature scaling --------------------------------------------------------------------------------


def _grid_best(nll, grid):
    values = np.array([nll(t) for t in grid])
    return grid[int(np.argmin(values))], float(values.min())


def test_fitted_temperatures_match_a_brute_force_grid():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 3, (400, 3))
    true_t = np.array([2.5, 0.6, 1.0])  # over-confident, timid, calibrated
    y = (rng.random((400, 3)) < expit(z / true_t)).astype(int)
    fitted = fit_temperatures(z, y, task="multilabel")
    grid = np.exp(np.linspace(np.log(0.1), np.log(10), 4001))  # steps of 0.12% in T
    for j in range(3):

        def nll(t, j=j):
            return temperature_nll(z[:, j], y[:, j], t, task="multilabel")

        best_t, best_nll = _grid_best(nll, grid)
        assert abs(math.log(fitted[j] / best_t)) < 0.0012
        assert nll(fitted[j]) <= best_nll + 1e-9
    assert fitted == pytest.approx(true_t, rel=0.25)  # and near the truth, 400 samples

    # multiclass: one shared temperature minimizing the softmax cross-entropy
    logits = rng.normal(0, 2, (300, 4))
    labels = np.array([rng.choice(4, p=np.exp(r / 0.5) / np.exp(r / 0.5).sum()) for r in logits])  # T = 0.5
    shared = fit_temperatures(logits, labels, task="multiclass")
    assert len(set(shared)) == 1 and len(shared) == 4
    best_t, best_nll = _grid_best(lambda t: temperature_nll(logits, labels, t, task="multiclass"), grid)
    assert abs(math.log(shared[0] / best_t)) < 0.0012
    assert shared[0] == pytest.approx(0.5, rel=0.2)


def test_temperature_nll_hand_computed_and_scaling():
    # BCE of sigmoid(z / T): z = 2, T = 2 -> p = sigmoid(1); label 1 -> -log sigmoid(1) = log(1 + e^-1)
    assert temperature_nll([2.0], [1], 2.0, task="binary") == pytest.approx(math.log(1 + math.exp(-1)))
    assert temperature_nll([[0.0, math.log(3)]], [1], 1.0, task="multiclass") == pytest.approx(-math.log(0.75))
    scaled = apply_temperatures(np.array([[2.0, -3.0]]), [2.0, 0.5], task="multilabel")
    assert scaled.tolist() == [[1.0, -6.0]]
    assert probabilities([[2.0]], "binary", [2.0])[0, 0] == pytest.approx(expit(1.0))
    with pytest.raises(ValueError, match=re.escape("1 temperatures for 2 output column(s)")):
        apply_temperatures(np.zeros((1, 2)), [1.0], task="multilabel")
    with pytest.raises(ValueError, match="temperatures must be finite and > 0"):
        apply_temperatures(np.zeros((1, 1)), [0.0], task="binary")


def test_temperature_fallbacks_warn():
    z = np.array([[1.0, 0.5], [2.0, -1.0], [3.0, 0.2], [1.5, 0.4]])
    y = np.array([[1, 1], [1, 0], [1, 0], [1, 1]])  # output 0: one class only
    with pytest.warns(UserWarning, match="Edema: validation targets hold one class; temperature 1 kept"):
        fitted = fit_temperatures(z, y, task="multilabel", label_names=["Edema", "Mass"])
    assert fitted[0] == 1.0
    separable = np.array([-3.0, -2.0, 2.0, 3.0])
    with pytest.warns(UserWarning, match=re.escape(f"is at the bound of {TEMPERATURE_BOUNDS}")):
        (t,) = fit_temperatures(separable, [0, 0, 1, 1], task="binary")
    assert t == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-3)


# ---- metadata ------------------------------------------------------------------------------------------


def test_model_meta_temperatures_round_trip_and_uncalibrated_decisions():
    meta = ModelMeta(task="multilabel", thresholds=[0.3, 0.9, 0.0], temperatures=[2.0, 0.5, 1.5])
    assert ModelMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    assert ModelMeta.from_dict({"task": "binary", "thresholds": [0.4]}).temperatures is None  # an old config
    plain = meta.uncalibrated()
    assert plain.temperatures is None and meta.temperatures == [2.0, 0.5, 1.5]  # a copy
    # sigmoid(T * logit(t)): logit(.3) = -0.8473 -> sigmoid(-1.6946) = 0.1552; threshold 0 stays 0
    assert plain.thresholds == pytest.approx([expit(2 * math.log(0.3 / 0.7)), expit(0.5 * math.log(9)), 0.0])
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, (2000, 3))
    calibrated = probabilities(z, "multilabel", meta.temperatures) >= np.array(meta.thresholds)
    uncalibrated = probabilities(z, "multilabel") >= np.array(plain.thresholds)
    assert np.array_equal(calibrated, uncalibrated)  # every decision unchanged
    with pytest.raises(ValueError, match="temperatures are finite numbers > 0"):
        ModelMeta(temperatures=[1.0, -1.0])
    with pytest.raises(ValueError, match=re.escape("3 temperatures for 2 thresholds")):
        ModelMeta(thresholds=[0.5, 0.5], temperatures=[1, 1, 1])
    model = qing.create_model("qing_test_tr1", num_classes=2)
    with pytest.raises(ValueError, match=re.escape("1 temperatures for a model with 2 outputs")):
        set_meta(model, temperatures=[1.0])
    set_meta(model, task="multilabel", temperatures=[2.0, 1.0])
    logits = torch.tensor([[2.0, 2.0]])
    assert model_probabilities(model, logits)[0] == pytest.approx([expit(1.0), expit(2.0)])


# ---- Wilson intervals and the PR-AUC bootstrap -----------------------------------------------------------


def test_wilson_interval_hand_computed():
    # z = 1.959964: 8/10 -> center (8 + z^2/2) / (10 + z^2) = .716740, half z/(10 + z^2) sqrt(1.6 + z^2/4) = .226578
    assert wilson_interval(8, 10) == pytest.approx([0.490162, 0.943318], abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.277533], abs=1e-6)  # not empty at 0 successes
    assert wilson_interval(10, 10) == pytest.approx([0.722467, 1.0], abs=1e-6)
    # 50% coverage, z = 0.6745: 1/2 -> .5 +/- .6745 / 2.455 * sqrt(.5 + .1137)
    assert wilson_interval(1, 2, confidence=0.5) == pytest.approx([0.284759, 0.715241], abs=1e-6)
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match=re.escape("need 0 <= successes <= total, got 3 of 2")):
        wilson_interval(3, 2)


def test_rates_and_their_intervals_in_the_metrics():
    # threshold .5: TP = 3 (.6 .7 .9), FN = 1 (.4), TN = 4 (.1 .2 .3 .45), FP = 2 (.55 .8)
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.6, 0.7, 0.9, 0.4, 0.1, 0.2, 0.3, 0.45, 0.55, 0.8])
    m = compute_metrics(y, p, task="binary", label_names=["x"], thresholds=[0.5], n_bootstrap=0)
    row = m["per_label"][0]
    assert (row["tp"], row["fn"], row["tn"], row["fp"]) == (3, 1, 4, 2)
    expected = {"sensitivity": (3, 4), "specificity": (4, 6), "ppv": (3, 5), "npv": (4, 5), "accuracy": (7, 10)}
    for name, (k, n) in expected.items():
        assert row[name] == pytest.approx(k / n) and m[name] == pytest.approx(k / n)
        assert row[f"{name}_ci"] == pytest.approx(wilson_interval(k, n)) and m[f"{name}_ci"] == row[f"{name}_ci"]
    assert row["precision"] == row["ppv"]
    multiclass = compute_metrics([0, 1, 2, 2], np.eye(3)[[0, 1, 1, 2]], task="multiclass", label_names=list("abc"))
    assert multiclass["accuracy_ci"] == pytest.approx(wilson_interval(3, 4))


def test_pr_auc_bootstrap_reuses_the_auroc_resamples_and_matches_sklearn():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, (40, 2))
    y[:2] = [[1, 1], [0, 0]]
    p = np.round(np.clip(0.35 * y + rng.random((40, 2)) * 0.7, 0, 1), 1)  # many ties
    aucs, aps = _resampled_aurocs(y, p, n_bootstrap=60, seed=11, average_precision=True)
    assert np.array_equal(aucs, _resampled_aurocs(y, p, n_bootstrap=60, seed=11))  # the same resamples
    idx = np.random.default_rng(11).integers(0, 40, size=(60, 40))
    for b in range(60):
        for j in range(2):
            yb, pb = y[idx[b], j], p[idx[b], j]
            if yb.min() == yb.max():
                assert np.isnan(aps[b, j])
            else:
                assert aps[b, j] == pytest.approx(average_precision_score(yb, pb), abs=1e-12)
    m = compute_metrics(y, p, task="multilabel", label_names=["a", "b"], n_bootstrap=60, seed=11)
    for j in range(2):
        assert m["per_label"][j]["pr_auc_ci"] == pytest.approx(_percentile_interval(aps[:, j], 0.95))
        assert m["per_label"][j]["roc_auc_ci"] == pytest.approx(_percentile_interval(aucs[:, j], 0.95))
    complete = np.isfinite(aucs).all(axis=1)
    assert m["pr_auc_ci"] == pytest.approx(_percentile_interval(np.where(complete, aps.mean(1), np.nan), 0.95))
    single = auroc_bootstrap(y[:, 0], p[:, 0], n_bootstrap=60, seed=11)
    assert single["ci"] == pytest.approx(_percentile_interval(aucs[:, 0], 0.95))


# ---- the calibrated evaluation ----------------------------------------------------------------------------


def test_evaluate_logits_calibrates_on_validation_then_chooses_thresholds():
    rng = np.random.default_rng(1)
    z_val, z_test = rng.normal(0, 4, (1000, 2)), rng.normal(0, 4, (1000, 2))
    y_val = (rng.random((1000, 2)) < expit(z_val / 3)).astype(int)  # logits 3x over-confident
    y_test = (rng.random((1000, 2)) < expit(z_test / 3)).astype(int)
    names = ["Effusion", "Edema"]
    result = evaluate_logits(
        z_test, y_test, task="multilabel", label_names=names, val_logits=z_val, val_targets=y_val, n_bootstrap=0
    )
    fitted = fit_temperatures(z_val, y_val, task="multilabel")
    assert result.temperatures == fitted and fitted == pytest.approx([3, 3], rel=0.3)
    # thresholds chosen on the calibrated validation probabilities (Youden's J)
    plain = evaluate_logits(
        z_test, y_test, task="multilabel", label_names=names, val_logits=z_val, val_targets=y_val,
        calibrate=False, n_bootstrap=0,
    )  # fmt: skip
    assert plain.temperatures is None and result.uncalibrated_probs is not None and plain.uncalibrated_probs is None
    assert result.thresholds == pytest.approx(
        [expit(math.log(t / (1 - t)) / temp) for t, temp in zip(plain.thresholds, fitted)]
    )
    # the same ranking and decisions; calibrated probabilities, lower ECE
    assert result.metrics["roc_auc"] == pytest.approx(plain.metrics["roc_auc"])
    assert result.metrics["sensitivity"] == plain.metrics["sensitivity"]
    assert result.probs == pytest.approx(probabilities(z_test, "multilabel", fitted))
    calibration = result.metrics["calibration"]
    assert calibration["temperatures"] == pytest.approx(fitted)
    assert calibration["source"] == "fitted on validation data (1000 images)"
    assert calibration["uncalibrated"]["ece"] == pytest.approx(plain.metrics["ece"])
    assert result.metrics["ece"] < 0.6 * plain.metrics["ece"]
    assert [row["temperature"] for row in result.metrics["per_label"]] == pytest.approx(fitted)
    assert plain.metrics["calibration"] == {
        "method": None, "temperatures": None, "source": None, "n_bins": 15, "uncalibrated": None,
    }  # fmt: skip
    summary = result.summary
    assert summary["test_ece"] == result.metrics["ece"] and summary["test_ece_uncalibrated"] == plain.metrics["ece"]
    assert summary["per_label"][1]["temperature"] == pytest.approx(fitted[1])
    model = qing.create_model("qing_test_tr1", num_classes=2)
    result.store(model)
    assert model.qing_meta.temperatures == result.temperatures and model.qing_meta.thresholds == result.thresholds

    # given (stored) temperatures are applied, nothing is fitted
    again = evaluate_logits(
        z_test, y_test, task="multilabel", label_names=names, thresholds=result.thresholds,
        temperatures=fitted, temperature_source="stored with the model", n_bootstrap=0,
    )  # fmt: skip
    assert again.metrics["sensitivity"] == result.metrics["sensitivity"]
    assert again.metrics["calibration"]["source"] == "stored with the model"
