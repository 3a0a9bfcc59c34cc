"""The installed ``qing`` command, run as a real subprocess: demo, train -> eval -> predict on real X-rays, errors.

Every run goes through the console script next to the test interpreter (``pip install -e .`` puts it
there), with one torch thread so that its arithmetic matches the in-process checks.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

import qing
from qing.data import build_transforms, load_image
from qing.train import load_training_state
from tests.conftest import PNEUMONIA_200
from tests.make_fake_data import write_dicom, write_truncated_png
from tests.train_helpers import one_thread


def qing_command() -> str:
    """The ``qing`` console script of this environment."""
    beside = Path(sys.executable).with_name("qing")
    found = str(beside) if beside.is_file() else shutil.which("qing")
    if found is None:
        pytest.fail("the qing command is not installed next to this Python; run pip install -e '.[test]'")
    return found


def qing_env(**overrides: str) -> dict[str, str]:
    """The test environment (offline Hub, Agg backend) plus one torch thread and a wide terminal."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="200", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env.pop("QING_TRUST_PICKLE", None)
    env.update(overrides)
    return env


def run_qing(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``qing ARGS...`` in ``cwd`` and return the finished process (stdout, stderr as text)."""
    return subprocess.run(
        [qing_command(), *args],
        cwd=cwd,
        env=env or qing_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def model_probabilities(model_dir: Path, paths: list[Path]) -> list[float]:
    """The calibrated probability (sigmoid(logit / T)) of a binary model folder on each image, one at a time."""
    model = qing.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    transform = build_transforms(model, train=False)
    with one_thread(), torch.no_grad():
        logits = torch.cat([model(transform(load_image(p, channels=3))[None]) for p in paths])
    return [float(p) for p in qing.evaluate.model_probabilities(model, logits.numpy())[:, 0]]


# ---- qing demo -------------------------------------------------------------------------------------


def test_demo_end_to_end_and_it_visibly_learns(tmp_path):
    """The standard demo, as a user runs it, on a seed other than the default (the recipe is not tuned to one)."""
    result = run_qing("demo", "--output", "demo", "--device", "cpu", "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    demo = tmp_path / "demo"
    data = demo / "synthetic_cxr"
    assert (data / "README.txt").read_text().startswith("SYNTHETIC DATA - NOT REAL CHEST X-RAYS")
    counts = {
        f"{s}/{c}": len(list((data / s / c).glob("synthetic_p*.png")))
        for s in ("train", "test")
        for c in ("normal", "opacity")
    }
    assert counts == {"train/normal": 64, "train/opacity": 64, "test/normal": 20, "test/opacity": 20}

    best = demo / "run" / "checkpoints" / "best"
    config = json.loads((best / "config.json").read_text())
    assert config["architecture"] == "qing_test_r1" and config["label_names"] == ["opacity"]
    assert config["qing"]["task"] == "binary" and config["qing"]["datasets"] == ["synthetic_cxr"]
    assert len(config["qing"]["thresholds"]) == 1
    report = demo / "run" / "report"
    for name in ("report.html", "report.md", "metrics.json", "curves.png", "roc.png", "pr.png",
                 "confusion_matrix.png", "attention.png", "feature_maps.png"):  # fmt: skip
        assert (report / name).stat().st_size > 0, name
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n_samples"] == 40 and metrics["label_names"] == ["opacity"]
    assert (demo / "run" / "tensorboard").is_dir() and (demo / "run" / "config.yaml").is_file()

    # it learns where the user can see it: the last epoch's training loss and validation accuracy
    history = load_training_state(demo / "run" / "checkpoints" / "last")["history"]
    first, last = history[0], history[-1]
    assert len(history) == 6 and last["train_loss"] < 0.3 and last["val_accuracy"] >= 0.9, history
    assert first["train_loss"] > 0.5  # from scratch: it starts at chance
    out = result.stdout
    assert (
        f"  learned: training loss {first['train_loss']:.3f} -> {last['train_loss']:.3f}, "
        f"validation accuracy {first['val_accuracy']:.3f} -> {last['val_accuracy']:.3f} (epoch 1 -> 6)\n"
    ) in out
    assert "SYNTHETIC" in out.splitlines()[0]
    assert f"test:    AUROC {metrics['roc_auc']:.3f}" in out
    assert "report:  demo/run/report/report.html\n" in out
    commands = [line.strip() for line in out.splitlines() if line.startswith("  qing ")]
    assert commands[0] == (
        "qing predict demo/run/checkpoints/best demo/synthetic_cxr/test --output predictions.csv --heatmaps heatmaps/"
    )
    assert commands[1].startswith("qing explain demo/run/checkpoints/best demo/synthetic_cxr/test/opacity/")
    assert any(c.startswith("qing train path/to/") for c in commands) and commands[-1] == "qing models"
    assert out.rstrip().endswith("qing models")


# ---- train -> eval -> predict on the real pneumonia images ---------------------------------------


def test_train_then_eval_then_predict_on_real_xrays(tmp_path, pneumonia_200):
    """One test, so that xdist workers do not train the run twice."""
    result = run_qing(
        "train", str(pneumonia_200 / "manifest.csv"), "--label-column", "label", "--patient-column", "patient",
        "--model", "qing_test_tr1", "--img-size", "64", "--epochs", "1", "--batch-size", "16", "--lr", "0.001",
        "--device", "cpu", "--no-progress", "--n-bootstrap", "50", "--log-images", "2", "--cache-images",
        "--output-dir", "run",
        cwd=tmp_path,
    )  # fmt: skip
    _check_train(tmp_path, result)
    _check_eval(tmp_path)
    _check_predict(tmp_path)


def _check_train(work: Path, result: subprocess.CompletedProcess) -> None:
    """``qing train`` wrote the run folder with the flags' config and said where."""
    assert result.returncode == 0, result.stderr
    run = work / "run"
    lines = result.stdout.splitlines()
    assert lines[0] == "run folder: run"
    assert re.fullmatch(r"best checkpoint: run/checkpoints/best \(epoch 1, val_loss=[0-9.]+\)", lines[1])
    assert "report: run/report/report.html" in lines
    for name in ("config.yaml", "train.log", "checkpoints/best/model.safetensors",
                 "checkpoints/last/training_state.json", "report/report.html", "report/metrics.json"):  # fmt: skip
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["model"], config["img_size"], config["epochs"], config["lr"]) == ("qing_test_tr1", 64, 1, 0.001)
    assert (config["progress"], config["n_bootstrap"], config["log_images"]) == (False, 50, 2)
    data = config["data"]
    assert data["labels_csv"] == str(PNEUMONIA_200 / "manifest.csv") and data["root"] is None
    assert (data["label_column"], data["patient_column"], data["cache_images"]) == ("label", "patient", True)
    best = json.loads((run / "checkpoints" / "best" / "config.json").read_text())
    assert best["label_names"] == ["PNEUMONIA"] and best["pretrained_cfg"]["input_size"] == [3, 64, 64]


def _check_eval(work: Path) -> None:
    """``qing eval`` on the class folders: the report's numbers come from the model's own probabilities."""
    result = run_qing("eval", "run", str(PNEUMONIA_200), "--n-bootstrap", "50", "-o", "ev", "--device", "cpu", cwd=work)
    assert result.returncode == 0, result.stderr
    ev = work / "ev"
    metrics = json.loads((ev / "metrics.json").read_text())
    best = work / "run" / "checkpoints" / "best"
    stored = json.loads((best / "config.json").read_text())["qing"]
    assert metrics["n_samples"] == 200 and metrics["label_names"] == ["PNEUMONIA"]
    assert metrics["thresholds"] == stored["thresholds"] and metrics["threshold_method"] == "youden"
    for name in ("report.html", "report.md", "roc.png", "pr.png", "confusion_matrix.png", "attention.png"):
        assert (ev / name).stat().st_size > 0, name

    rows = read_csv(ev / "predictions.csv")
    assert len(rows) == 200 and list(rows[0]) == ["path", "target_PNEUMONIA", "prob_PNEUMONIA", "positive_PNEUMONIA"]
    targets = [int(r["target_PNEUMONIA"]) for r in rows]
    assert targets == [int(Path(r["path"]).parent.name == "PNEUMONIA") for r in rows]
    probs = [float(r["prob_PNEUMONIA"]) for r in rows]
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(targets, probs), abs=1e-12)
    picked = [0, 99, 100, 199]
    expected = model_probabilities(best, [Path(rows[i]["path"]) for i in picked])
    assert [probs[i] for i in picked] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert f"AUROC {metrics['roc_auc']:.3f}" in result.stdout
    assert result.stdout.rstrip().endswith("report: ev/report.html")


def _check_predict(work: Path) -> None:
    """``qing predict`` on files, a glob, a folder with a DICOM and a broken PNG, and a missing file."""
    normal = sorted((PNEUMONIA_200 / "NORMAL").glob("*.jpeg"))[:2]
    pneumonia = sorted((PNEUMONIA_200 / "PNEUMONIA").glob("person1*_*.jpeg"))
    inputs = work / "inputs"
    pixels = np.asarray(load_image(normal[0], channels=1), dtype=np.uint16) * 16  # 12 bits stored
    dicom = write_dicom(inputs / "scan.dcm", pixels)
    write_truncated_png(inputs / "broken.png")
    result = run_qing(
        "predict", "run", *map(str, normal), str(PNEUMONIA_200 / "PNEUMONIA" / "person1*_*.jpeg"), "inputs",
        "missing.png", "--heatmaps", "hm", "-o", "preds.csv", "--batch-size", "4", "--device", "cpu",
        cwd=work,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    rows = read_csv(work / "preds.csv")
    assert list(rows[0]) == ["path", "prob_PNEUMONIA", "positive_PNEUMONIA", "heatmap", "error"]
    by_path = {r["path"]: r for r in rows}
    assert (
        by_path["missing.png"]["error"] == "no such file or folder" and by_path["missing.png"]["prob_PNEUMONIA"] == ""
    )
    assert by_path["inputs/broken.png"]["error"].startswith("OSError: ")
    good = [*normal, *pneumonia, dicom]
    assert [r["path"] for r in rows if not r["error"]] == [*map(str, normal + pneumonia), "inputs/scan.dcm"]

    best = work / "run" / "checkpoints" / "best"
    threshold = json.loads((best / "config.json").read_text())["qing"]["thresholds"][0]
    expected = model_probabilities(best, good)
    predicted = [float(r["prob_PNEUMONIA"]) for r in rows if not r["error"]]
    assert predicted == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert [int(r["positive_PNEUMONIA"]) for r in rows if not r["error"]] == [int(p >= threshold) for p in predicted]

    heatmaps = [work / r["heatmap"] for r in rows if not r["error"]]
    assert [h.name for h in heatmaps[:2]] == [f"{p.name.split('.')[0]}.png" for p in normal]
    assert heatmaps[-1] == work / "hm" / "scan.png"
    for source, heatmap in zip(good, heatmaps):  # at the input image's size, not the model's 64 x 64
        with Image.open(heatmap) as image:
            assert (image.mode, image.size) == ("RGB", load_image(source).size)
    assert sorted(p.name for p in (work / "hm").iterdir()) == sorted(h.name for h in heatmaps)

    assert "qing: skipped missing.png: no such file or folder" in result.stderr
    assert "qing: skipped inputs/broken.png: OSError: " in result.stderr
    n = len(good) + 2
    assert result.stderr.rstrip().endswith(f"qing: error: 2 of {n} input(s) could not be read (listed above)")
    assert "Traceback" not in result.stderr


# ---- errors through the real entry point ------------------------------------------------------------


def test_usage_error_exits_2(tmp_path):
    result = run_qing("predict", "--format", "xml", "model", "x.png", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0].startswith("usage: qing predict [-h]")
    assert result.stderr.splitlines()[-1].startswith("qing predict: error: argument --format: invalid choice: 'xml'")
    assert result.stdout == ""


def test_user_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    result = run_qing("predict", "no/such/run", "x.png", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "qing: error: model folder or checkpoint not found: no/such/run\n"
