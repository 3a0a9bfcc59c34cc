"""End to end on the real chest X-rays in ../shared/data (skipped where absent): short CPU runs
that write every artifact, and a best checkpoint that predicts like the trained model."""

import csv
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qing
from qing.train import Trainer
from tests.train_helpers import tiny_config


def test_pneumonia_binary_run_writes_every_artifact(tmp_path, pneumonia_200):
    cfg = tiny_config(
        pneumonia_200,
        tmp_path / "run",
        epochs=1,
        batch_size=16,
        report=True,
        n_bootstrap=100,
        ema=True,
        data={"patient_regex": qing.data.PATIENT_REGEX_KERMANY, "cache_images": True},
    )
    trainer = Trainer(cfg)
    result = trainer.fit()
    run = cfg.run_dir
    for name in ("config.yaml", "train.log", "checkpoints/best/model.safetensors", "checkpoints/best/config.json",
                 "checkpoints/best/README.md", "checkpoints/last/model.safetensors",
                 "checkpoints/last/training_state.safetensors", "checkpoints/last/training_state.json",
                 "report/report.html", "report/report.md", "report/metrics.json", "report/curves.png",
                 "report/roc.png", "report/pr.png", "report/confusion_matrix.png", "report/attention.png",
                 "report/feature_maps.png"):  # fmt: skip
        assert (run / name).stat().st_size > 0, name
    events = EventAccumulator(str(cfg.tensorboard_path), size_guidance={"images": 0})
    events.Reload()
    assert {"images/input", "images/attention", "images/feature_maps"} <= set(events.Tags()["images"])

    # 200 images split by patient: test_fraction 0.2, then val_fraction 0.25; the test metrics are on the 40
    assert (len(trainer.splits.train), len(trainer.splits.val), len(trainer.splits.test)) == (120, 40, 40)
    assert json.loads((run / "report" / "metrics.json").read_text())["n_samples"] == 40
    assert result.test_metrics["label_names"] == ["PNEUMONIA"]

    # the best checkpoint (EMA weights) loads as a qing model and predicts what the trainer's model predicts
    model = qing.create_model(f"local-dir:{result.best_checkpoint}", pretrained=True).eval()
    logits, _ = trainer.predict("test")
    images = torch.stack([trainer.datasets["test"][i]["image"] for i in range(8)])
    with torch.no_grad():
        torch.testing.assert_close(model(images), logits[:8], rtol=1e-5, atol=1e-5)
    assert model.qing_meta.thresholds == result.thresholds


def test_nih_multilabel_run_from_a_label_csv(tmp_path, nih_64):
    with open(nih_64 / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    keep = []
    for split, n in (("train", 48), ("valid", 20), ("test", 20)):
        for label in ("NORMAL", "ABNORMAL"):
            keep += [r for r in rows if (r["repo_split"], r["repo_label"]) == (split, label)][:n]
    subset = tmp_path / "labels.csv"
    with open(subset, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)
    data = {
        "root": None,
        "labels_csv": str(subset),
        "image_dir": str(nih_64),
        "split_column": "repo_split",
        "patient_column": "patient",
        "patient_regex": None,
    }
    cfg = tiny_config(nih_64, tmp_path / "run", epochs=1, batch_size=16, report=True, log_images=2, data=data)
    labels = list(qing.weights.CXR14_LABELS)
    absent = [name for name in labels if not any(r[name] == "1" for r in keep if r["repo_split"] == "valid")]
    assert "Hernia" in absent and len(absent) < 14
    with pytest.warns(UserWarning, match="validation targets are all negative; no threshold can be chosen") as caught:
        result = Trainer(cfg).fit()
    # a label without positives in validation gets 0.5 and a warning naming it; the others get a chosen threshold
    assert sorted(str(w.message).split(":")[0] for w in caught if "all negative" in str(w.message)) == sorted(absent)
    assert [result.thresholds[labels.index(name)] for name in absent] == [0.5] * len(absent)
    assert result.test_metrics["task"] == "multilabel" and len(result.thresholds) == 14
    assert [row["label"] for row in result.test_metrics["per_label"]][:2] == ["Atelectasis", "Cardiomegaly"]
    model = qing.create_model(f"local-dir:{result.best_checkpoint}", pretrained=True)
    assert model.num_classes == 14 and model.qing_meta.task == "multilabel"
    assert len(model.qing_meta.thresholds) == 14
