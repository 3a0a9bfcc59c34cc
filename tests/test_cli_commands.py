"""``qing.cli.main`` in this process: every flag of ``qing train``, ``qing models``, output formats, and the
error paths with their exact one-line messages and exit codes (the entry point itself is run as a
subprocess in test_cli.py; this is the same function without the interpreter start-up per call)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import qing
from qing.cli import build_parser, main
from qing.data import DataConfig, build_transforms, load_image
from qing.evaluate import DEFAULT_TTA_VIEWS, augment, compare
from qing.meta import set_meta
from qing.train import TrainConfig
from qing.weights import CXR14_LABELS
from tests.make_fake_data import write_class_folders
from tests.test_cli import read_csv
from tests.train_helpers import one_thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A binary qing_test_tr1 folder (64 px, positive class "opacity", stored threshold 0.3) and two images."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(1)
    model = qing.create_model("qing_test_tr1", num_classes=1).eval()
    set_meta(model, task="binary", thresholds=[0.3], threshold_method="youden")
    qing.save_pretrained(model, root / "model", label_names=["opacity"], data_config={"input_size": (3, 64, 64)})
    write_class_folders(root / "images", {"normal": 1, "opacity": 1}, size=64)
    return root


@pytest.fixture
def work(model_dir, monkeypatch):
    monkeypatch.chdir(model_dir)
    monkeypatch.setenv("QING_WEIGHTS_DIR", str(model_dir / "no-weights-here"))
    return model_dir


def _images(root):
    return sorted(str(p.relative_to(root)) for p in (root / "images").rglob("*.png"))


def _error(capsys) -> str:
    return capsys.readouterr().err


# ---- predict / explain / eval: what comes out ---------------------------------------------------------


def test_predict_json_on_stdout_and_the_table(work, capsys):
    images = _images(work)
    assert main(["predict", "model", *images, "--format", "json"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert (document["task"], document["labels"], document["thresholds"]) == ("binary", ["opacity"], [0.3])
    assert document["threshold_source"] == "stored with the model, youden" and document["failed"] == []
    model = qing.create_model("local-dir:model", pretrained=True).eval()
    transform = build_transforms(model, train=False)
    with one_thread(), torch.no_grad():
        expected = [float(torch.sigmoid(model(transform(load_image(p))[None]))[0, 0]) for p in images]
    got = [p["probabilities"]["opacity"] for p in document["predictions"]]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert [p["positive"] for p in document["predictions"]] == [["opacity"] if p >= 0.3 else [] for p in got]
    assert captured.err == (
        "qing: 2 image(s) predicted; calibration: none (the model has no stored temperatures); "
        "thresholds: 0.3 (stored with the model, youden)\n"
    )

    assert main(["predict", "model", images[0], "--threshold", "0"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "opacity", "decision"]
    assert table[2].split() == [images[0], f"{expected[0]:.4f}", "opacity"]  # threshold 0: always positive


def test_explain_writes_one_figure(work, capsys):
    image = _images(work)[1]
    assert main(["explain", "model", image, "-o", "figure.png"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{image}: opacity 0.") and out[1] == "attention figure: figure.png"
    assert (work / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["explain", "model", image, "-o", "figure.png"]) == 1
    assert _error(capsys) == (
        "qing: error: output figure.png already exists; pass --overwrite to replace it or choose another name\n"
    )


def test_models_table_and_local_weights(work, capsys, monkeypatch):
    weights = work / "weights" / "timm" / "test_resnet.r160_in1k" / "model.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.zeros(1)}, str(weights))
    monkeypatch.setenv("QING_WEIGHTS_DIR", str(work / "weights"))
    assert main(["models", "test_tr1", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    params = sum(p.numel() for p in qing.create_model("qing_test_tr1").parameters())
    assert [r["name"] for r in rows] == ["qing_test_tr1", "qing_test_tr1.r160_in1k"]
    assert [r["weights"] for r in rows] == ["-", f"local: {weights}"]
    assert rows[0]["params"] == params and rows[0]["input_size"] == [3, 160, 160] and len(rows[0]["labels"]) == 14

    assert main(["models", "qing_chexnet*"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["name", "params", "input", "labels", "weights", "license"]
    assert table[2].split()[0] == "qing_chexnet_densenet121.chexnet"  # offline (the suite): not downloadable now
    assert table[2].endswith("  missing  no licence stated by the source")
    assert main(["models", "--pretrained", "test_tr1"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]] == ["qing_test_tr1.r160_in1k"]


# ---- qing train: flags -> TrainConfig --------------------------------------------------------------------


def _train_dests() -> set[str]:
    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    return {a.dest for a in train._actions}


def test_every_config_field_is_a_train_flag():
    dests = _train_dests()
    assert {f"cfg.{f.name}" for f in dataclasses.fields(TrainConfig) if f.name != "data"} <= dests
    assert {f"data.{f.name}" for f in dataclasses.fields(DataConfig)} <= dests


def test_train_flags_config_file_preset_and_set(work, capsys):
    argv = [
        "train", "images", "--model", "qing_test_tr1", "--epochs", "3", "--no-tensorboard", "--ema",
        "--scale", "0.8", "1.2", "--label-names", "a", "b", "--model-args", "global_pool=token", "--pos-weight",
        "auto", "--early-stopping-patience", "none", "--img-size", "64", "--set", "data.val_fraction=0.1",
        "--set", "seed=7", "--print-config",
    ]  # fmt: skip
    assert main(argv) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert TrainConfig.from_dict(config).to_dict() == config
    assert (config["model"], config["epochs"], config["tensorboard"], config["ema"]) == (
        "qing_test_tr1",
        3,
        False,
        True,
    )
    assert config["model_args"] == {"global_pool": "token"} and config["pos_weight"] == "auto"
    assert config["early_stopping_patience"] is None and config["img_size"] == 64 and config["seed"] == 7
    assert config["progress"] is False  # not a terminal
    data = config["data"]
    assert (data["root"], data["scale"], data["label_names"], data["val_fraction"]) == (
        "images",
        [0.8, 1.2],
        ["a", "b"],
        0.1,
    )

    (work / "run.yaml").write_text(yaml.safe_dump({"preset": "small_dataset", "epochs": 4, "data": {"root": "x"}}))
    assert main(["train", "--config", "run.yaml", "--lr", "0.001", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert (config["scheduler"], config["epochs"], config["lr"], config["data"]["hflip_prob"]) == (
        "plateau",
        4,
        0.001,
        0.5,
    )
    assert config["data"]["root"] == "x"
    assert main(["train", "--preset", "small_dataset", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"] == "qing_densenet121_tr2.chexnet"


# ---- error paths: one line, exit code 1 ----------------------------------------------------------------

MISSING_WEIGHTS = (
    "qing: error: pretrained weights for qing_chexnet_densenet121.chexnet not found (offline mode is on: "
    "HF_HUB_OFFLINE=1). Looked in:\n"
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "no/such/model", "images"], "model folder or checkpoint not found: no/such/model"),
        (["predict", "owner/repo", "images"],
         "model folder or checkpoint not found: owner/repo; for a Hub repo write hf-hub:owner/repo"),
        (["predict", "images", "images"],
         "images is not a model folder: it has no config.json (expected a folder written by qing train, "
         "qing convert, qing pull or qing.save_pretrained, or a run folder with checkpoints/best)"),
        (["predict", "model", "nothing.png", "*.nothing"],
         "no images to predict (nothing.png: no such file or folder; *.nothing: no image files match this pattern)"),
        (["predict", "model", "images", "--threshold", "0.2,0.4"],
         "--threshold has 2 values for a model with 1 outputs"),
        (["predict", "model", "images", "--threshold", "high"],
         "--threshold expects probabilities like 0.5 or 0.3,0.6, got 'high'"),
        (["predict", "model", "images", "-o", "out.txt"],
         "cannot tell the format of out.txt from its suffix; use .csv or .json, or --format"),
        (["predict", "model", "images", "--device", "cuda:7"],
         "--device cuda:7 but CUDA is not available here; use --device cpu"),
        (["eval", "model", "missing-data"],
         "DATA missing-data does not exist; give a folder of class folders, a labels CSV or a list file"),
        (["explain", "model", "missing.png"], "image file not found: missing.png"),
        (["convert", "missing.pth", "out"], "checkpoint file not found: missing.pth"),
        (["train", "missing-data"],
         "DATA missing-data does not exist; give a folder of class folders, a labels CSV or a list file"),
        (["train", "images", "--set", "lrr=0.1"], "unknown config field(s): 'lrr' (did you mean 'lr'?)"),
        (["train", "images", "--scheduler", "linear"],
         "scheduler must be one of ('cosine', 'plateau', 'none'), got 'linear'"),
        (["train", "--config", "nope.yaml"], "config file not found: nope.yaml"),
        (["demo", "--output", "images"],
         "demo folder images already exists and is not empty; pass --overwrite or choose another folder"),
        (["pull", "qing-tester/x", "images"],
         "DIR images already exists and is not empty; pass --overwrite or choose another folder"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line(work, capsys, argv, message):
    assert main(argv) == 1
    assert _error(capsys) == f"qing: error: {message}\n"


def test_unknown_model_and_missing_weights(work, capsys):
    (work / "x.png").write_bytes((work / _images(work)[0]).read_bytes())
    assert main(["predict", "qing_densenet121_tr3", "x.png"]) == 1
    assert _error(capsys).startswith("qing: error: unknown model 'qing_densenet121_tr3'; did you mean ")
    assert main(["predict", "qing_chexnet_densenet121.chexnet", "x.png"]) == 1
    err = _error(capsys)
    assert err.startswith(MISSING_WEIGHTS) and f"{work / 'no-weights-here'}/chexnet/model.pth.tar" in err


def test_eval_class_count_and_names_must_fit_the_model(work, capsys, tmp_path):
    write_class_folders(tmp_path / "three", {"a": 1, "b": 1, "c": 1}, size=64)
    write_class_folders(tmp_path / "other", {"normal": 1, "nodule": 1}, size=64)
    assert main(["eval", "model", str(tmp_path / "three"), "-o", str(tmp_path / "ev")]) == 1
    assert _error(capsys) == (
        f"qing: error: model is a binary model (opacity or not) but {tmp_path / 'three'} has 3 classes (a, b, c); "
        "give data with two classes\n"
    )
    assert main(["eval", "model", str(tmp_path / "other"), "-o", str(tmp_path / "ev")]) == 1
    assert _error(capsys) == (
        f"qing: error: the positive class of model, 'opacity', is not a class of {tmp_path / 'other'} "
        "(nodule, normal); rename the class folder or column value to 'opacity'\n"
    )
    multilabel = qing.create_model("qing_test_tr1", num_classes=14)
    qing.save_pretrained(multilabel, tmp_path / "cxr14")
    assert main(["eval", str(tmp_path / "cxr14"), "images", "-o", str(tmp_path / "ev")]) == 1
    assert _error(capsys) == (
        f"qing: error: {tmp_path / 'cxr14'} has 14 outputs (multilabel: Atelectasis, Cardiomegaly, Effusion, "
        "Infiltration, ...) but images has 2 classes (normal, opacity); evaluate it on a CSV or list file with one "
        "0/1 column per output\n"
    )
    assert not (tmp_path / "ev").exists()


def test_predict_never_overwrites_and_keeps_going(work, capsys, tmp_path):
    output = tmp_path / "out.csv"
    output.write_text("keep me\n")
    assert main(["predict", "model", "images", "-o", str(output)]) == 1
    assert _error(capsys) == (
        f"qing: error: output {output} already exists; pass --overwrite to replace it or choose another name\n"
    )
    assert output.read_text() == "keep me\n"
    (tmp_path / "empty.png").write_bytes(b"")
    assert main(["predict", "model", "images", str(tmp_path / "empty.png"), "-o", str(output), "--overwrite"]) == 1
    rows = output.read_text().splitlines()
    assert rows[0] == "path,prob_opacity,positive_opacity,error" and len(rows) == 4
    assert rows[-1] == f"{tmp_path / 'empty.png'},,,the file is empty (0 bytes)"
    assert _error(capsys).splitlines() == [
        f"qing: skipped {tmp_path / 'empty.png'}: the file is empty (0 bytes)",
        f"qing: 2 image(s) predicted -> {output}; calibration: none (the model has no stored temperatures); "
        "thresholds: 0.3 (stored with the model, youden)",
        "qing: error: 1 of 3 input(s) could not be read (listed above)",
    ]


def test_convert_refuses_untrusted_pickles_unless_asked(work, capsys, tmp_path):
    torch.manual_seed(2)
    model = qing.create_model("qing_test_tr1")
    path = tmp_path / "trainer.pth"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    assert main(["convert", str(path), str(tmp_path / "out"), "--model", "qing_test_tr1"]) == 1
    assert _error(capsys).startswith(
        f"qing: error: refusing to unpickle {path}: unsafe pickle: it contains argparse.Namespace. qing loads "
        "checkpoints with "
        "torch.load(weights_only=True)"
    )
    assert main(["convert", str(path), str(tmp_path / "out"), "--model", "qing_test_tr1", "--trust-pickle"]) == 0
    assert capsys.readouterr().out.startswith("detected format: qing (")
    converted = qing.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in model.state_dict().items())

    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "odd.safetensors"))
    assert main(["convert", str(tmp_path / "odd.safetensors"), str(tmp_path / "odd")]) == 1
    assert _error(capsys).startswith(
        f"qing: error: {tmp_path / 'odd.safetensors'}: unrecognized checkpoint layout (keys like weight); "
        "known formats:"
    )


def test_failures_that_are_not_user_mistakes_name_the_exception_and_debug(work, capsys, monkeypatch):
    import qing.cli._models as models_command

    def broken(*args, **kwargs):
        raise RuntimeError("registry exploded")

    monkeypatch.setattr(models_command, "collect", broken)
    assert main(["models"]) == 1
    assert _error(capsys) == (
        "qing: error: RuntimeError: registry exploded (run again with --debug for the traceback)\n"
    )
    with pytest.raises(RuntimeError, match="registry exploded"):
        main(["models", "--debug"])  # the console script then prints the traceback and exits 1
    with pytest.raises(ValueError, match="unknown model 'qing_nosuch_tr1'"):
        main(["--debug", "explain", "qing_nosuch_tr1", _images(work)[0], "-o", "new.png"])
    with pytest.raises(SystemExit) as usage:
        main(["predict"])
    assert usage.value.code == 2
    assert "qing predict: error: the following arguments are required: MODEL, INPUT" in _error(capsys)


def test_eval_multilabel_from_csv_columns_and_a_list_file(work, capsys, tmp_path, nih_64):
    labels = ["Effusion", "Atelectasis", "Hernia"]  # three of the CSV's 14 label columns, in another order
    model = qing.create_model("qing_test_tr1", num_classes=3).eval()
    set_meta(model, task="multilabel", thresholds=[0.5, 0.5, 0.25])
    qing.save_pretrained(model, tmp_path / "cxr14", label_names=labels, data_config={"input_size": (3, 64, 64)})
    with open(nih_64 / "labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    subset = rows[:16] + rows[-16:]  # the first 16 are train, the last 16 test
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(subset)
    rows = [r for r in subset if r["repo_split"] == "test"]
    assert len(rows) == 16

    argv = ["eval", str(tmp_path / "cxr14"), str(tmp_path / "labels.csv"), "--image-dir", str(nih_64)]
    assert main([*argv, "--split-column", "repo_split", "-o", str(tmp_path / "ev"), "--n-bootstrap", "10"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["n_samples"] == len(rows)
    assert [r["label"] for r in metrics["per_label"]] == labels and metrics["thresholds"] == [0.5, 0.5, 0.25]
    predicted = read_csv(tmp_path / "ev" / "predictions.csv")
    assert [p["path"] for p in predicted] == [str(nih_64 / r["path"]) for r in rows]
    assert [[int(p[f"target_{n}"]) for n in labels] for p in predicted] == [[int(r[n]) for n in labels] for r in rows]
    assert "thresholds: stored with the model" in capsys.readouterr().out

    listed = tmp_path / "test_list.txt"
    listed.write_text("".join(f"{r['path']} {' '.join(r[n] for n in labels)}\n" for r in rows[:5]))
    argv = ["eval", str(tmp_path / "cxr14"), str(listed), "--image-dir", str(nih_64), "-o", str(tmp_path / "ev2")]
    assert main([*argv, "--n-bootstrap", "10"]) == 0
    assert json.loads((tmp_path / "ev2" / "metrics.json").read_text())["n_samples"] == 5
    first = read_csv(tmp_path / "ev2" / "predictions.csv")[0]
    same_image = [float(predicted[0][f"prob_{n}"]) for n in labels]  # in a batch of 16 there, of 5 here
    assert [float(first[f"prob_{n}"]) for n in labels] == pytest.approx(same_image, rel=1e-5, abs=1e-6)


def test_eval_reads_findings_with_another_separator(work, capsys, tmp_path, nih_64):
    labels = ["Effusion", "Atelectasis", "Hernia"]
    model = qing.create_model("qing_test_tr1", num_classes=3).eval()
    set_meta(model, task="multilabel")
    qing.save_pretrained(model, tmp_path / "cxr14", label_names=labels, data_config={"input_size": (3, 64, 64)})
    with open(nih_64 / "labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    findings = [n for n in CXR14_LABELS if n in reader.fieldnames]
    assert len(findings) == 14
    several = [r for r in rows if sum(r[n] == "1" for n in findings) > 1]
    rows = several[:8] + [r for r in rows if r not in several][:16]
    with open(tmp_path / "findings.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "findings"])
        for r in rows:
            writer.writerow([r["path"], "; ".join(n for n in findings if r[n] == "1") or "No Finding"])
    assert any(";" in line for line in (tmp_path / "findings.csv").read_text().splitlines())

    base = ["eval", str(tmp_path / "cxr14"), str(tmp_path / "findings.csv"), "--image-dir", str(nih_64)]
    argv = [*base, "--label-column", "findings", "-o", str(tmp_path / "ev"), "--n-bootstrap", "10"]
    assert main([*argv, "--label-separator", ";"]) == 0
    predicted = read_csv(tmp_path / "ev" / "predictions.csv")
    assert [[int(p[f"target_{n}"]) for n in labels] for p in predicted] == [[int(r[n]) for n in labels] for r in rows]

    capsys.readouterr()
    assert main([*base, "--label-separator", ";", "-o", str(tmp_path / "ev2")]) == 1
    assert _error(capsys) == (
        "qing: error: --label-separator needs --label-column (the column holding the separated findings)\n"
    )


# ---- calibration, test-time augmentation, Grad-CAM, compare ------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(model_dir):
    """The fixture's model again, saved with temperature 2.5 and threshold 0.45 on the calibrated probability."""
    model = qing.create_model("local-dir:" + str(model_dir / "model"), pretrained=True).eval()
    set_meta(model, temperatures=[2.5], thresholds=[0.45])
    qing.save_pretrained(model, model_dir / "calibrated", data_config={"input_size": (3, 64, 64)})
    return model


def _logits(model, paths):
    transform = build_transforms(model, train=False)
    with one_thread(), torch.no_grad():
        return torch.cat([model(transform(load_image(p))[None]) for p in paths])[:, 0]


def test_predict_and_eval_apply_the_stored_temperature_and_keep_decisions_without_it(work, capsys, calibrated):
    images = _images(work)
    z = _logits(calibrated, images)
    assert main(["predict", "calibrated", *images, "--format", "json"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document["temperatures"] == [2.5] and document["thresholds"] == [0.45]
    got = [p["probabilities"]["opacity"] for p in document["predictions"]]
    assert got == pytest.approx(torch.sigmoid(z / 2.5).tolist(), rel=1e-5)
    assert "calibration: temperature scaling stored with the model (T = 2.5)" in captured.err

    assert main(["predict", "calibrated", *images, "--format", "json", "--no-calibration"]) == 0
    plain = json.loads(capsys.readouterr().out)
    moved = 1 / (1 + math.exp(-2.5 * math.log(0.45 / 0.55)))  # sigmoid(T logit(t))
    assert plain["temperatures"] is None and plain["thresholds"] == pytest.approx([moved])
    assert [p["probabilities"]["opacity"] for p in plain["predictions"]] == pytest.approx(
        torch.sigmoid(z).tolist(), rel=1e-5
    )
    assert [p["positive"] for p in plain["predictions"]] == [p["positive"] for p in document["predictions"]]

    assert main(["eval", "calibrated", "images", "-o", "ev-cal", "--n-bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "(temperature scaling stored with the model (T = 2.5))" in out
    metrics = json.loads((work / "ev-cal" / "metrics.json").read_text())
    assert metrics["calibration"]["temperatures"] == [2.5]
    assert metrics["calibration"]["source"] == "stored with the model"
    assert metrics["thresholds"] == [0.45] and metrics["per_label"][0]["temperature"] == 2.5
    rows = read_csv(work / "ev-cal" / "predictions.csv")
    assert list(rows[0]) == ["path", "target_opacity", "prob_opacity", "positive_opacity"]
    assert [int(r["positive_opacity"]) for r in rows] == [int(float(r["prob_opacity"]) >= 0.45) for r in rows]
    assert sorted(p.name for p in (work / "ev-cal").glob("*.png")) == [
        "attention.png", "confusion_matrix.png", "feature_maps.png", "gradcam.png", "pr.png", "reliability.png",
        "roc.png",
    ]  # fmt: skip


def test_tta_averages_seven_views(work, capsys, calibrated):
    images = _images(work)
    assert main(["predict", "calibrated", *images, "--format", "json", "--tta", "--no-calibration"]) == 0
    got = [p["probabilities"]["opacity"] for p in json.loads(capsys.readouterr().out)["predictions"]]
    transform = build_transforms(calibrated, train=False)
    x = torch.stack([transform(load_image(p)) for p in images])
    with one_thread(), torch.no_grad():
        expected = torch.stack([torch.sigmoid(calibrated(augment(x, v))) for v in DEFAULT_TTA_VIEWS]).mean(0)
    assert got == pytest.approx(expected[:, 0].tolist(), rel=1e-5)
    assert main(["eval", "calibrated", "images", "-o", "ev-tta", "--tta", "--n-bootstrap", "0"]) == 0
    notes = json.loads((work / "ev-tta" / "metrics.json").read_text())["notes"]
    assert any(n.startswith("Test-time augmentation: probabilities averaged over 7 views") for n in notes)


def test_explain_and_predict_gradcam(work, capsys):
    image = _images(work)[1]
    assert main(["explain", "model", image, "--method", "gradcam", "--label", "opacity", "-o", "cam.png"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "Grad-CAM figure: cam.png"
    assert Image.open(work / "cam.png").size[0] > 3 * Image.open(work / "cam.png").size[1] - 200  # 3 panels
    assert main(["explain", "model", image, "--label", "opacity"]) == 1
    assert _error(capsys) == (
        "qing: error: --label chooses the outputs Grad-CAM explains; add --method gradcam (attention has no label)\n"
    )
    assert main(["explain", "model", image, "--method", "gradcam", "--label", "nodule", "-o", "never.png"]) == 1
    assert _error(capsys) == "qing: error: --label 'nodule' is not one of the model's outputs: opacity\n"
    assert main(["predict", "model", image, "--heatmaps", "cams", "--heatmap-method", "gradcam"]) == 0
    capsys.readouterr()
    heatmap = work / "cams" / (image.rsplit("/", 1)[1].split(".")[0] + ".png")
    assert Image.open(heatmap).size == (64, 64)
    assert main(["predict", "model", image, "--heatmap-label", "opacity"]) == 1
    assert _error(capsys) == (
        "qing: error: --heatmap-label chooses the output Grad-CAM explains; add --heatmap-method gradcam\n"
    )


def test_compare_two_models_and_their_prediction_csvs(work, capsys, calibrated, tmp_path):
    other = qing.create_model("qing_test_tr1", num_classes=1).eval()
    set_meta(other, task="binary", thresholds=[0.5])
    qing.save_pretrained(other, tmp_path / "other", label_names=["opacity"], data_config={"input_size": (3, 64, 64)})
    write_class_folders(tmp_path / "test", {"normal": 4, "opacity": 4}, size=64)
    data = str(tmp_path / "test")
    argv = ["compare", "calibrated", str(tmp_path / "other"), data, "-o", str(tmp_path / "cmp"), "--n-bootstrap", "50"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "calibrated (A) vs other (B) on 8 images"
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert (saved["model_a"], saved["model_b"], saved["n_samples"]) == ("calibrated", "other", 8)
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        "comparison.json", "report.html", "report.md", "roc_comparison.png",
    ]  # fmt: skip

    # the same numbers by hand: both models' probabilities on the same images, in path order
    paths = sorted(str(p) for p in (tmp_path / "test").rglob("*.png"))
    y = np.array([int("/opacity/" in p) for p in paths])
    pa = torch.sigmoid(_logits(calibrated, paths) / 2.5).numpy()
    other = qing.create_model(f"local-dir:{tmp_path / 'other'}", pretrained=True).eval()  # its 64 px preprocessing
    pb = torch.sigmoid(_logits(other, paths)).numpy()
    expected = compare(
        y, pa, pb, task="binary", label_names=["opacity"], thresholds_a=[0.45], thresholds_b=[0.5],
        names=("calibrated", "other"), n_bootstrap=50,
    )  # fmt: skip
    row, want = saved["per_label"][0], expected.per_label[0]
    assert row["auroc_a"] == pytest.approx(want["auroc_a"]) and row["auroc_b"] == pytest.approx(want["auroc_b"])
    assert row["delong"]["p_value"] == pytest.approx(want["delong"]["p_value"], rel=1e-4)
    assert row["bootstrap"]["ci"] == pytest.approx(want["bootstrap"]["ci"], rel=1e-4)
    assert row["mcnemar"] == pytest.approx(want["mcnemar"])

    # two qing eval outputs: no DATA needed, the same comparison
    for name in ("calibrated", str(tmp_path / "other")):
        out = tmp_path / f"ev-{Path(name).name}"
        assert main(["eval", name, data, "-o", str(out), "--n-bootstrap", "0"]) == 0
    capsys.readouterr()
    csvs = [str(tmp_path / "ev-calibrated" / "predictions.csv"), str(tmp_path / "ev-other" / "predictions.csv")]
    assert main(["compare", *csvs, "-o", str(tmp_path / "cmp2"), "--n-bootstrap", "50"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "ev-calibrated (A) vs ev-other (B) on 8 images"
    again = json.loads((tmp_path / "cmp2" / "comparison.json").read_text())["per_label"][0]
    assert again["delong"]["p_value"] == pytest.approx(row["delong"]["p_value"], rel=1e-4)
    assert again["mcnemar"]["only_a_right"] == row["mcnemar"]["only_a_right"]

    assert main(["compare", "calibrated", csvs[1], "-o", str(tmp_path / "cmp3")]) == 1
    assert _error(capsys) == (
        "qing: error: give DATA (the labelled images) to run a model on; only two qing eval CSVs can do without\n"
    )
    (tmp_path / "bad.csv").write_text("file,score\na.png,0.3\n")
    assert main(["compare", str(tmp_path / "bad.csv"), csvs[1], "-o", str(tmp_path / "cmp4")]) == 1
    assert _error(capsys) == (
        f"qing: error: {tmp_path / 'bad.csv'} is not a qing predictions CSV: it needs a 'path' column and "
        "prob_<label> columns (found file, score)\n"
    )
