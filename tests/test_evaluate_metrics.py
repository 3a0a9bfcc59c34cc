"""qing.evaluate metrics and thresholds: hand-computed cases, sklearn agreement, bootstrap, errors."""

import json
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    hamming_loss,
    multilabel_confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
)

from qing.evaluate import auroc_bootstrap, choose_thresholds, compute_metrics, probabilities, threshold_method_name

# 8 samples, 4 negatives then 4 positives.
Y8 = np.array([0, 0, 0, 0, 1, 1, 1, 1])
P8 = np.array([0.1, 0.3, 0.35, 0.6, 0.4, 0.7, 0.8, 0.9])
# AUROC by hand: of the 16 (positive, negative) pairs only (0.4, 0.6) is ordered wrongly -> 15/16 = 0.9375.
# Candidate thresholds (prob >= t is positive), sensitivity / specificity / Youden J:
#   t=0.9: 1/4, 4/4, 0.25   t=0.8: 2/4, 4/4, 0.5   t=0.7: 3/4, 4/4, 0.75   t=0.6: 3/4, 3/4, 0.5
#   t=0.4: 4/4, 3/4, 0.75   t=0.35: 4/4, 2/4, 0.5  ...
# J ties at 0.7 and 0.4; the rule takes the highest -> 0.7.
# Sensitivity >= 0.9 first reached (from the top) at t=0.4; >= 0.75 at t=0.7.
# At t=0.7: predictions 0,0,0,0,0,1,1,1 -> TN=4 FP=0 FN=1 TP=3: accuracy 7/8, sensitivity 3/4,
# specificity 1, precision 1, F1 = 2*1*0.75/1.75 = 6/7.
# Average precision: ranked 0.9+ 0.8+ 0.7+ 0.6- 0.4+ -> precisions at the positives 1, 1, 1, 4/5 -> 3.8/4 = 0.95.


def test_binary_hand_computed():
    assert choose_thresholds(Y8, P8[:, None], task="binary") == [0.7]
    assert choose_thresholds(Y8, P8, task="binary", method="sensitivity", target_sensitivity=0.9) == [0.4]
    assert choose_thresholds(Y8, P8, task="binary", method="sensitivity", target_sensitivity=0.75) == [0.7]
    assert choose_thresholds(Y8, P8, task="binary", method="sensitivity", target_sensitivity=1.0) == [0.4]

    m = compute_metrics(
        Y8[:, None], P8[:, None], task="binary", label_names=["PNEUMONIA"], thresholds=[0.7],
        threshold_method="youden", n_bootstrap=0, negative_label="NORMAL",
    )  # fmt: skip
    assert m["roc_auc"] == 0.9375
    assert m["accuracy"] == 0.875
    assert m["sensitivity"] == m["recall"] == 0.75
    assert m["specificity"] == 1.0
    assert m["precision"] == 1.0
    assert m["f1"] == pytest.approx(6 / 7, abs=1e-15)
    assert m["pr_auc"] == pytest.approx(0.95, abs=1e-15)
    assert m["confusion_matrix"] == [[4, 0], [1, 3]]
    assert m["confusion_matrix_labels"] == ["NORMAL", "PNEUMONIA"]
    assert m["thresholds"] == [0.7] and m["threshold_method"] == "youden"
    assert m["n_samples"] == 8 and m["notes"] == []
    assert m["roc_auc_ci"] is None and m["roc_auc_bootstrap"] is None  # n_bootstrap=0
    assert m["classification_report"]["NORMAL"]["recall"] == 1.0
    assert m["classification_report"]["PNEUMONIA"]["support"] == 4
    row = m["per_label"][0]
    assert (row["label"], row["n_positive"], row["n_negative"], row["threshold"]) == ("PNEUMONIA", 4, 4, 0.7)
    assert (row["roc_auc"], row["sensitivity"], row["specificity"], row["note"]) == (0.9375, 0.75, 1.0, None)


def test_default_threshold_is_half_and_noted():
    # t=0.5: predictions 0,0,0,1,0,1,1,1 -> TN=3 FP=1 FN=1 TP=3, every rate 3/4.
    m = compute_metrics(Y8, P8, task="binary", label_names=["PNEUMONIA"], n_bootstrap=0)
    assert m["thresholds"] == [0.5] and m["threshold_method"] == "default 0.5"
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert m["confusion_matrix_labels"] == ["not PNEUMONIA", "PNEUMONIA"]
    assert (m["accuracy"], m["sensitivity"], m["specificity"], m["precision"], m["f1"]) == (0.75,) * 5
    assert m["notes"] == ["No thresholds given: 0.5 used for every output (not tuned on validation data)."]


def test_threshold_rule_names():
    assert threshold_method_name("youden") == "youden"
    assert threshold_method_name("sensitivity", 0.9) == "sensitivity@0.90"
    with pytest.raises(ValueError, match=re.escape("method='sensitivity' needs target_sensitivity")):
        choose_thresholds(Y8, P8, task="binary", method="sensitivity")
    with pytest.raises(ValueError, match=re.escape("method='roc' is not one of ('youden', 'sensitivity')")):
        choose_thresholds(Y8, P8, task="binary", method="roc")
    with pytest.raises(ValueError, match=re.escape("target_sensitivity must be in (0, 1], got 1.5")):
        choose_thresholds(Y8, P8, task="binary", method="sensitivity", target_sensitivity=1.5)


def test_thresholds_are_validation_scores_and_reach_the_target():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (300, 4))
    p = np.clip(0.35 * y + 0.65 * rng.random((300, 4)), 0, 1)
    youden = choose_thresholds(y, p, task="multilabel")
    sens = choose_thresholds(y, p, task="multilabel", method="sensitivity", target_sensitivity=0.9)
    for j in range(4):
        assert youden[j] in p[:, j] and sens[j] in p[:, j]
        # Youden: no validation score as threshold gives a higher J
        j_of = [((p[:, j] >= t) & (y[:, j] == 1)).sum() / y[:, j].sum()
                - ((p[:, j] >= t) & (y[:, j] == 0)).sum() / (1 - y[:, j]).sum() for t in p[:, j]]  # fmt: skip
        chosen = ((p[:, j] >= youden[j]) & (y[:, j] == 1)).sum() / y[:, j].sum() - (
            (p[:, j] >= youden[j]) & (y[:, j] == 0)
        ).sum() / (1 - y[:, j]).sum()
        assert chosen == pytest.approx(max(j_of), abs=1e-12)
        # sensitivity rule: reaches 0.9, and the next higher score would not
        reached = ((p[:, j] >= sens[j]) & (y[:, j] == 1)).sum() / y[:, j].sum()
        higher = p[:, j][p[:, j] > sens[j]].min()
        assert reached >= 0.9 > ((p[:, j] >= higher) & (y[:, j] == 1)).sum() / y[:, j].sum()
    assert choose_thresholds(rng.integers(0, 3, 300), np.full((300, 3), 1 / 3), task="multiclass") == []


def test_multiclass_hand_computed():
    targets = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([
        [0.7, 0.2, 0.1], [0.3, 0.6, 0.1],  # class 0: right, wrong (-> 1)
        [0.2, 0.5, 0.3], [0.1, 0.8, 0.1],  # class 1: right, right
        [0.1, 0.2, 0.7], [0.5, 0.1, 0.4],  # class 2: right, wrong (-> 0)
    ])  # fmt: skip
    m = compute_metrics(targets, probs, task="multiclass", label_names=["a", "b", "c"], n_bootstrap=0)
    # argmax predictions 0,1,1,1,2,0
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-15)
    # recall per class 1/2, 2/2, 1/2; precision 1/2, 2/3, 1/1; specificity 3/4, 3/4, 4/4
    assert m["recall"] == pytest.approx(2 / 3, abs=1e-15)
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3, abs=1e-15)
    assert [row["specificity"] for row in m["per_label"]] == [0.75, 0.75, 1.0]
    assert m["specificity"] == pytest.approx(5 / 6, abs=1e-15)
    assert m["thresholds"] == [] and m["threshold_method"] == "argmax"
    assert m["roc_auc"] == pytest.approx(roc_auc_score(targets, probs, multi_class="ovr"), abs=1e-15)
    with pytest.raises(ValueError, match=re.escape("multiclass predictions are the argmax")):
        compute_metrics(targets, probs, task="multiclass", label_names=["a", "b", "c"], thresholds=[0.5] * 3)


def test_multilabel_matches_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 5))
    p = np.clip(0.3 * y + 0.7 * rng.random((200, 5)), 0, 1)
    thresholds = [0.3, 0.4, 0.5, 0.6, 0.7]
    names = list("abcde")
    m = compute_metrics(y, p, task="multilabel", label_names=names, thresholds=thresholds, n_bootstrap=0)
    pred = (p >= np.array(thresholds)).astype(int)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p, average="macro"), abs=1e-12)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p, average="macro"), abs=1e-12)
    assert m["accuracy"] == pytest.approx(1 - hamming_loss(y, pred), abs=1e-12)
    assert m["subset_accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    assert m["precision"] == pytest.approx(precision_score(y, pred, average="macro"), abs=1e-12)
    assert m["recall"] == pytest.approx(recall_score(y, pred, average="macro"), abs=1e-12)
    assert m["confusion_matrix"] == multilabel_confusion_matrix(y, pred).tolist()
    for j, row in enumerate(m["per_label"]):
        assert row["label"] == names[j] and row["threshold"] == thresholds[j]
        assert row["roc_auc"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]), abs=1e-12)
        assert row["specificity"] == pytest.approx(recall_score(y[:, j], pred[:, j], pos_label=0), abs=1e-12)
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_binary_and_multiclass_match_sklearn_on_random_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150)
    p = rng.random(150)
    m = compute_metrics(y, p, task="binary", label_names=["x"], thresholds=[0.42], n_bootstrap=0)
    pred = (p >= 0.42).astype(int)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    for key, fn in [("accuracy", accuracy_score), ("precision", precision_score), ("f1", f1_score)]:
        assert m[key] == pytest.approx(fn(y, pred), abs=1e-12), key
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()

    t = rng.integers(0, 4, 120)
    probs = probabilities(rng.normal(size=(120, 4)), "multiclass")
    m = compute_metrics(t, probs, task="multiclass", label_names=list("abcd"), n_bootstrap=0)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(t, probs, multi_class="ovr"), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(t, probs.argmax(1), average="macro"), abs=1e-12)
    assert m["confusion_matrix"] == confusion_matrix(t, probs.argmax(1)).tolist()


def test_label_with_one_class_is_undefined_not_a_crash():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (60, 3))
    y[:, 1] = 0  # no positives
    y[:, 2] = 1  # no negatives
    p = rng.random((60, 3))
    with pytest.warns(UserWarning) as caught:
        thresholds = choose_thresholds(y, p, task="multilabel", label_names=["Mass", "Hernia", "Effusion"])
    assert thresholds[1:] == [0.5, 0.5]
    messages = [str(w.message) for w in caught]
    assert "Hernia: validation targets are all negative; no threshold can be chosen, using 0.5" in messages
    assert "Effusion: validation targets are all positive; no threshold can be chosen, using 0.5" in messages

    m = compute_metrics(y, p, task="multilabel", label_names=["Mass", "Hernia", "Effusion"], n_bootstrap=50)
    hernia, effusion = m["per_label"][1], m["per_label"][2]
    assert hernia["roc_auc"] is None and hernia["roc_auc_ci"] is None and hernia["pr_auc"] is None
    assert hernia["sensitivity"] is None  # no positives
    assert hernia["note"] == "only negative targets (60 samples): AUROC and PR-AUC undefined"
    assert effusion["note"] == "only positive targets (60 samples): AUROC and PR-AUC undefined"
    assert effusion["specificity"] is None
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y[:, 0], p[:, 0]), abs=1e-15)
    assert "roc_auc and pr_auc are means over 1 of 3 outputs; undefined for Hernia, Effusion: " in m["notes"][1]
    json.dumps(m, allow_nan=False)

    none = compute_metrics(np.zeros(5, int), np.linspace(0, 1, 5), task="binary", label_names=["x"], n_bootstrap=10)
    assert none["roc_auc"] is None and none["roc_auc_ci"] is None and none["roc_auc_bootstrap"] is None
    assert none["notes"][-1] == "AUROC undefined for x: only one class in the targets."


def _reference_bootstrap(y, p, n_bootstrap, seed):
    """Independent loop with sklearn: per resample AUROC of each column (NaN when a class is missing)."""
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_bootstrap, len(y)))
    out = np.full((n_bootstrap, y.shape[1]), np.nan)
    for b, rows in enumerate(idx):
        for j in range(y.shape[1]):
            if 0 < y[rows, j].sum() < len(rows):
                out[b, j] = roc_auc_score(y[rows, j], p[rows, j])
    return out


def test_bootstrap_matches_a_sklearn_loop_with_ties_and_skips():
    rng = np.random.default_rng(4)
    y = np.zeros(12, int)
    y[[2, 7]] = 1  # 2 positives in 12: many resamples have none
    p = np.round(rng.random(12), 1)  # ties
    ref = _reference_bootstrap(y[:, None], p[:, None], 300, seed=7)[:, 0]
    res = auroc_bootstrap(y, p, n_bootstrap=300, seed=7)
    assert res["n_skipped"] == int(np.isnan(ref).sum()) > 0
    assert res["n_resamples"] == 300 and res["method"] == "percentile" and res["confidence"] == 0.95
    expected = np.percentile(ref[~np.isnan(ref)], [2.5, 97.5])
    assert res["ci"] == pytest.approx(expected.tolist(), abs=1e-12)


def test_macro_auroc_interval_skips_resamples_missing_a_class_of_any_label():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, (25, 3))
    y[:, 2] = 0
    y[[3, 11], 2] = 1  # rare label
    p = np.round(rng.random((25, 3)), 2)
    m = compute_metrics(y, p, task="multilabel", label_names=list("abc"), n_bootstrap=200, seed=11, confidence=0.9)
    ref = _reference_bootstrap(y, p, 200, seed=11)
    complete = ~np.isnan(ref).any(axis=1)
    assert m["roc_auc_bootstrap"]["n_skipped"] == int((~complete).sum()) > 0
    assert m["roc_auc_ci"] == pytest.approx(np.percentile(ref[complete].mean(1), [5, 95]).tolist(), abs=1e-12)
    for j in range(3):
        col = ref[:, j][~np.isnan(ref[:, j])]
        assert m["per_label"][j]["roc_auc_ci"] == pytest.approx(np.percentile(col, [5, 95]).tolist(), abs=1e-12)
    assert f"{m['roc_auc_bootstrap']['n_skipped']} of 200 bootstrap resamples lacked a class" in m["notes"][-1]
    again = compute_metrics(y, p, task="multilabel", label_names=list("abc"), n_bootstrap=200, seed=11, confidence=0.9)
    assert again == m  # seeded


def test_probabilities():
    logits = torch.tensor([[-2.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(probabilities(logits, "multilabel"), torch.sigmoid(logits).double(), rtol=1e-6)
    soft = probabilities(logits, "multiclass")
    np.testing.assert_allclose(soft, torch.softmax(logits.double(), 1), rtol=1e-12)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-12)
    assert probabilities(torch.zeros(4, dtype=torch.bfloat16), "binary").tolist() == [[0.5]] * 4
    with pytest.raises(ValueError, match=re.escape("logits contain 1 NaN/inf value(s)")):
        probabilities(np.array([[0.0, np.nan]]), "multilabel")
    with pytest.raises(
        ValueError, match=re.escape("task='softmax' is not one of ('binary', 'multilabel', 'multiclass')")
    ):
        probabilities(logits, "softmax")


_UNIFORM3 = np.full((8, 3), 1 / 3)
BAD_INPUTS = [
    (dict(probs=P8 * 2), "probs must be finite probabilities in [0, 1], found values in [0.2, 1.8]"),
    (
        dict(probs=np.stack([P8, P8], 1)),
        "task='binary' expects probs of shape (N, 1) (one sigmoid output), got [8, 2]",
    ),
    (dict(targets=Y8[:5]), "binary targets must have shape (8, 1) like probs, got [5, 1]"),
    (dict(targets=Y8 * 2), "binary targets must be 0/1, found values [0, 2]"),
    (
        dict(targets=np.full(8, 3), probs=_UNIFORM3, task="multiclass", label_names=list("abc")),
        "multiclass targets must be integers in [0, 2], found values in [3, 3]",
    ),
    (dict(thresholds=[0.5, 0.5]), "2 thresholds for 1 output column(s)"),
    (dict(label_names=["a", "b"]), "2 label_names for 1 output column(s) in probs"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS)
def test_bad_input_messages(kwargs, message):
    kwargs = dict(dict(targets=Y8, probs=P8, task="binary", label_names=["x"]), **kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        compute_metrics(n_bootstrap=0, **kwargs)
