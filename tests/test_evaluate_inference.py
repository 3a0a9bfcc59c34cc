"""qing.evaluate's one evaluation path: devices, logits over a loader (exactly a plain model loop, bad
items skipped), and evaluate_logits (exactly choose_thresholds + compute_metrics, stored and reported)."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import qing
from qing.data import BadImage, ImageFiles, build_transforms, collate_skip_bad
from qing.evaluate import (
    SUMMARY_METRICS,
    CUDAUnavailableError,
    choose_thresholds,
    collect_logits,
    compute_metrics,
    evaluate_logits,
    fit_temperatures,
    iter_logits,
    probabilities,
    resolve_device,
    threshold_method_name,
)
from qing.train import Trainer
from tests.make_fake_data import write_png, write_truncated_png
from tests.model_helpers import randomize_batchnorm
from tests.train_helpers import tiny_config

# ---- devices ------------------------------------------------------------------------------------


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device() == torch.device("cpu")
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    with pytest.raises(CUDAUnavailableError, match=r"^'cuda' asks for CUDA, which is not available here; use 'cpu'$"):
        resolve_device("cuda")
    with pytest.raises(CUDAUnavailableError, match=r"^'cuda:1' asks for CUDA"):
        resolve_device("cuda:1", local_rank=0)
    with pytest.raises(ValueError, match=r"^'gpu0' is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'$"):
        resolve_device("gpu0")
    # each caller words the same failure for its users
    with pytest.raises(RuntimeError, match=r"^device='cuda' but CUDA is not available; use device='cpu'$"):
        Trainer(tiny_config("no-data", "no-run", device="cuda"))


def test_resolve_device_picks_the_local_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", local_rank=2) == torch.device("cuda", 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:3", local_rank=1) == torch.device("cuda", 3)  # an explicit index wins
    assert resolve_device("cuda") == torch.device("cuda")  # no rank: the current GPU, as torch.device("cuda")


# ---- logits over a loader -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_batchnorm(qing.create_model("qing_test_tr1", num_classes=3, img_size=64))


@pytest.fixture()
def files(tmp_path):
    """Seven image files; 2 and 3 (a whole batch of 2) and 5 are unreadable."""
    paths = [write_png(tmp_path / f"{i}.png", size=64, seed=i) for i in range(7)]
    paths[2].write_bytes(b"")
    write_truncated_png(paths[3], size=64)
    paths[5].write_bytes(b"not a png")
    return paths


def test_collect_logits_equals_a_plain_model_loop_and_skips_bad_items(model, files):
    loader = DataLoader(
        ImageFiles(files, build_transforms(model, train=False)), batch_size=2, collate_fn=collate_skip_bad
    )
    model.train()  # iter_logits runs in eval mode and gives the mode back
    batches = list(iter_logits(model, loader))
    assert model.training
    assert [b.indices for b in batches] == [[0, 1], [], [4], [6]]
    assert [[bad.index for bad in b.bad] for b in batches] == [[], [2, 3], [5], []]
    assert batches[1].logits.numel() == 0 and batches[1].images.numel() == 0

    out = collect_logits(model, loader)
    assert out.indices.tolist() == [0, 1, 4, 6] and out.indices.dtype == torch.long
    assert [(b.index, b.path) for b in out.bad] == [(i, str(files[i])) for i in (2, 3, 5)]
    assert all(isinstance(b, BadImage) and b.reason for b in out.bad)

    model.eval()
    with torch.no_grad():
        expected = torch.cat([model(b["image"]) for b in loader if b["image"] is not None])
    assert out.logits.dtype == torch.float32 and out.logits.shape == (4, 3)
    assert torch.equal(out.logits, expected)
    assert torch.equal(torch.cat([b.logits for b in batches if b.indices]), expected)


def test_iter_logits_autocast_and_channels_last(model, files):
    readable = [files[i] for i in (0, 1, 4, 6)]
    loader = DataLoader(
        ImageFiles(readable, build_transforms(model, train=False)), batch_size=4, collate_fn=collate_skip_bad
    )
    (batch,) = iter_logits(model, loader, amp_dtype=torch.bfloat16, channels_last=True)
    conv = next(p for p in model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # the runner converted the weights
    model.eval()
    images = next(iter(loader))["image"]
    assert torch.equal(batch.images, images)  # the batch as loaded; the runner converts its own copy
    images = images.to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(images).float()
    assert torch.equal(batch.logits, expected)
    with torch.no_grad():
        assert not torch.equal(batch.logits, model(images))  # bf16 really ran

    empty = collect_logits(model, [{"image": None, "index": None, "bad": [BadImage(0, "x.png", "gone")]}])
    assert empty.indices.shape == (0,) and empty.logits.shape == (0, 0) and empty.bad[0].path == "x.png"


# ---- evaluate_logits ----------------------------------------------------------------------------


def _data(task, n, c, seed):
    rng = np.random.default_rng(seed)
    if task == "multiclass":
        targets = rng.integers(0, c, n)
        logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[targets]
        return torch.tensor(logits, dtype=torch.float32), torch.tensor(targets)
    targets = (rng.random((n, c)) < 0.4).astype(np.float32)
    logits = rng.normal(size=(n, c)) + 1.5 * targets
    return torch.tensor(logits, dtype=torch.float32), torch.tensor(targets)


@pytest.mark.parametrize(
    ("task", "names", "method", "target_sensitivity"),
    [
        ("binary", ["PNEUMONIA"], "youden", None),
        ("multilabel", ["Mass", "Nodule", "Effusion"], "sensitivity", 0.9),
        ("multiclass", ["a", "b", "c"], "youden", None),
    ],
)
def test_evaluate_logits_equals_choose_thresholds_and_compute_metrics(task, names, method, target_sensitivity):
    c = len(names)
    val_logits, val_targets = _data(task, 60, c, seed=1)
    logits, targets = _data(task, 80, c, seed=2)
    negative = "normal" if task == "binary" else None
    result = evaluate_logits(
        logits,
        targets,
        task=task,
        label_names=names,
        val_logits=val_logits,
        val_targets=val_targets,
        method=method,
        target_sensitivity=target_sensitivity,
        n_bootstrap=50,
        seed=3,
        negative_label=negative,
    )
    val_y = val_targets.numpy().astype(np.int64)
    # calibrated on validation first, then the thresholds chosen on the calibrated probabilities
    temperatures = fit_temperatures(val_logits.numpy(), val_y, task=task, label_names=names)
    expected_thresholds = choose_thresholds(
        val_y, probabilities(val_logits.numpy(), task, temperatures), task=task, method=method,
        target_sensitivity=target_sensitivity, label_names=names,
    )  # fmt: skip
    y, probs = targets.numpy().astype(np.int64), probabilities(logits.numpy(), task, temperatures)
    name = threshold_method_name(method, target_sensitivity) if expected_thresholds else None
    expected = compute_metrics(
        y, probs, task=task, label_names=names, thresholds=expected_thresholds or None, threshold_method=name,
        n_bootstrap=50, seed=3, negative_label=negative,
    )  # fmt: skip
    assert result.temperatures == temperatures
    assert result.thresholds == expected_thresholds and result.threshold_method == name
    for row, temperature in zip(expected["per_label"], temperatures):
        row["temperature"] = temperature
    small = "Calibration errors from 80 images in 15 bins (5.3 per bin) are noisy and biased upward"
    assert result.metrics["notes"][:-1] == expected["notes"] and result.metrics["notes"][-1].startswith(small)
    assert {k: v for k, v in result.metrics.items() if k not in ("calibration", "notes")} == {
        k: v for k, v in expected.items() if k != "notes"
    }
    assert result.metrics["calibration"]["temperatures"] == temperatures
    before = compute_metrics(y, probabilities(logits.numpy(), task), task=task, label_names=names, n_bootstrap=0)
    assert result.metrics["calibration"]["uncalibrated"]["ece"] == pytest.approx(before["ece"])
    np.testing.assert_array_equal(result.uncalibrated_probs, probabilities(logits.numpy(), task))
    assert np.array_equal(result.targets, y) and result.targets.dtype == np.int64
    np.testing.assert_array_equal(result.probs, probs)
    assert (result.task, result.label_names) == (task, names)
    if task == "multiclass":
        assert result.thresholds == [] and result.threshold_method is None and expected["threshold_method"] == "argmax"
    else:
        assert len(result.thresholds) == c and expected["threshold_method"] == name

    summary = result.summary
    for key in SUMMARY_METRICS:
        if isinstance(expected.get(key), float):
            assert summary[f"test_{key}"] == expected[key]
            assert summary.get(f"test_{key}_ci") == (expected.get(f"{key}_ci") or None)
        else:
            assert f"test_{key}" not in summary
    assert summary["test_ece_uncalibrated"] == pytest.approx(before["ece"])
    assert (summary["n_test"], summary["confidence"]) == (80, 0.95)
    assert [row["label"] for row in summary["per_label"]] == names
    assert summary["per_label"][0]["roc_auc_ci"] == expected["per_label"][0]["roc_auc_ci"]


def test_given_thresholds_default_thresholds_store_report_and_errors(tmp_path):
    logits, targets = _data("binary", 40, 1, seed=4)
    given = evaluate_logits(
        logits, targets, task="binary", label_names=["x"], thresholds=[0.7], threshold_method="mine"
    )
    assert given.thresholds == [0.7] and given.threshold_method == "mine"
    assert given.metrics["thresholds"] == [0.7] and given.metrics["threshold_method"] == "mine"
    default = evaluate_logits(logits, targets, task="binary", label_names=["x"], n_bootstrap=0)
    assert default.thresholds is None and default.threshold_method is None
    assert default.metrics["thresholds"] == [0.5] and default.metrics["threshold_method"] == "default 0.5"
    assert "test_roc_auc_ci" not in default.summary

    model = qing.create_model("qing_test_tr1", num_classes=1, img_size=64)
    given.store(model)
    meta = model.qing_meta
    assert (meta.task, meta.thresholds, meta.threshold_method, meta.metrics) == ("binary", [0.7], "mine", given.summary)
    default.store(model)
    assert (model.qing_meta.thresholds, model.qing_meta.threshold_method) == (None, None)

    report = given.write_report(tmp_path / "report", title="given")
    assert report == tmp_path / "report" / "report.html" and report.is_file()
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["roc_auc"] == given.metrics["roc_auc"]

    with pytest.raises(ValueError, match="give thresholds or validation data to choose them on, not both"):
        evaluate_logits(logits, targets, task="binary", label_names=["x"], val_logits=logits, val_targets=targets,
                        thresholds=[0.5])  # fmt: skip
    with pytest.raises(ValueError, match=r"give val_logits and val_targets together \(or neither\)"):
        evaluate_logits(logits, targets, task="binary", label_names=["x"], val_logits=logits)
    with pytest.raises(ValueError, match="targets must be 0/1 labels or class indices, found non-integer values"):
        evaluate_logits(logits, targets * 0.5, task="binary", label_names=["x"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean call warns about nothing
        evaluate_logits(logits, targets, task="binary", label_names=["x"], n_bootstrap=0)
