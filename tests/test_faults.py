"""Faults and bad input, collected in one place (issues 12, 13, 14, 18): each test reproduces a failure seen on
main, from the outside where it can (a real ``qing`` run, real files, real processes), and checks that nothing
was lost and that the message names the file or setting and what to do.

Sections are headed by their area; add new ones under their own heading.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from huggingface_hub import HfApi
from PIL import Image
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import qing
from qing.cli import main
from qing.data import (
    CXRDataset,
    DataConfig,
    ImageLoadError,
    build_transforms,
    check_image_header,
    collate_skip_bad,
    load_image,
    load_splits,
    read_class_folders,
)
from qing.data.split_record import read_split_record
from qing.hub import ModelSourceNotFoundError
from qing.meta import set_meta
from qing.train import Callback, TrainConfig, Trainer, find_checkpoint, load_training_state, save_checkpoint
from qing.train.amp import CPU_AUTO_BF16, CPU_BF16_ENV, resolve_amp
from qing.train.run_folder import RunFolderBusyError, RunFolderError, read_marker
from qing.weights import UnsafeCheckpointError, WeightsNotFoundError
from tests.make_fake_data import write_class_folders, write_dicom, write_png
from tests.model_helpers import legacy_chexnet_state_dict, randomize_batchnorm
from tests.test_cli import qing_env, read_csv, run_qing
from tests.train_helpers import synthetic_root, tiny_config, weights

pydicom = pytest.importorskip("pydicom")
pytest_plugins = ["tests.hub_server"]  # the loopback Hub fixtures: hub_server, hub

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = Path(__file__).with_name("train_script.py")

pytest_plugins = ["tests.hub_server"]  # the loopback Hub fixtures: hub_server, hub


# ==== Bad input: images, DICOM, folders and label CSVs (issue 12 items 11, 12 and 14) ====================


@pytest.fixture(scope="module")
def binary_model(tmp_path_factory):
    """A binary ``qing_test_tr1`` model folder (64 px, positive class "opacity") to run the CLI with."""
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(3)
    model = qing.create_model("qing_test_tr1", num_classes=1).eval()
    set_meta(model, task="binary", thresholds=[0.5], threshold_method="youden")
    qing.save_pretrained(model, root / "model", label_names=["opacity"], data_config={"input_size": (3, 64, 64)})
    return root / "model"


def write_png_bomb(path, *, side: int = 40000):
    """A PNG whose header claims ``side x side`` pixels (1.6 gigapixels at 40000), with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


BOMB_REASON = (
    "image too large: Image size (1600000000 pixels) exceeds limit of 178956970 pixels, could be decompression "
    "bomb DOS attack. Raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
)


def test_decompression_bomb_is_an_unreadable_image_in_train_eval_and_predict(tmp_path, binary_model, capsys):
    data = tmp_path / "data"
    write_class_folders(data, {"normal": 6, "opacity": 6}, size=64)
    bomb = write_png_bomb(data / "opacity" / "bomb.png")
    with pytest.raises(ImageLoadError, match=re.escape("bomb.png: image too large")):
        load_image(bomb)

    splits = load_splits(DataConfig(root=str(data), test_fraction=0.3))  # what qing train reads
    assert splits.bad_files.to_list() == [{"path": str(bomb), "reason": BOMB_REASON}]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12

    out = tmp_path / "preds.csv"
    assert main(["predict", str(binary_model), str(data), "-o", str(out), "--device", "cpu"]) == 1
    rows = read_csv(out)
    assert len(rows) == 13 and [r["error"] for r in rows if r["error"]] == [BOMB_REASON]
    err = capsys.readouterr().err
    assert f"qing: skipped {bomb}: {BOMB_REASON}" in err.splitlines()
    assert "qing: 12 image(s) predicted" in err

    report = tmp_path / "eval"
    assert main(["eval", str(binary_model), str(data), "-o", str(report), "--device", "cpu", "--n-bootstrap", "5"]) == 1
    assert json.loads((report / "metrics.json").read_text())["n_samples"] == 12
    assert "qing: error: 1 image(s) could not be read (listed in the report)" in capsys.readouterr().err


def test_dicom_claiming_a_huge_image_is_refused_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "huge.dcm", np.zeros((4, 4), dtype=np.uint16))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 40000, 40000  # the pixel data stays 32 bytes: decoding would fail or allocate 3 GB
    ds.save_as(path)
    message = (
        "image too large: 40000 x 40000 pixels exceeds the decompression-bomb limit of 178,956,970 pixels "
        "(2 x PIL.Image.MAX_IMAGE_PIXELS); raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
    )
    for check in (check_image_header, load_image):
        with pytest.raises(ImageLoadError, match=re.escape(f"huge.dcm: {message}")):
            check(path)


def _malformed_dicoms(folder):
    """An empty VOI LUT Sequence item and a zero Window Width: headers that parse, pixels that cannot be shown."""
    ramp = np.array([[0, 1000, 2048, 3000, 4095]], dtype=np.uint16)
    empty_lut = write_dicom(folder / "empty_voi_lut.dcm", ramp, window=(2048, 1000))
    ds = pydicom.dcmread(empty_lut)
    ds.VOILUTSequence = [pydicom.Dataset()]
    ds.save_as(empty_lut)
    zero_width = write_dicom(folder / "zero_width.dcm", ramp, window=(2048, 0))
    return empty_lut, zero_width


def test_malformed_dicoms_are_unreadable_images_named_in_the_batch(tmp_path):
    empty_lut, zero_width = _malformed_dicoms(tmp_path)
    good = write_png(tmp_path / "good.png", size=64)
    for path in (empty_lut, zero_width):
        check_image_header(path)  # the header is fine: only decoding finds the fault
    with pytest.raises(
        ImageLoadError, match=re.escape("empty_voi_lut.dcm: VOI LUT Sequence item without LUT Descriptor")
    ):
        load_image(empty_lut)
    with pytest.raises(
        ImageLoadError,
        match=re.escape("zero_width.dcm: DICOM pixel data unreadable (ValueError: The (0028,1051) Window Width"),
    ):
        load_image(zero_width)

    model = qing.create_model("qing_test_tr1", num_classes=1)
    samples = [qing.data.Sample(p, i % 2) for i, p in enumerate([empty_lut, good, zero_width])]
    dataset = CXRDataset(samples, task="binary", transform=build_transforms(model, train=True, img_size=64))
    batch = collate_skip_bad([dataset[i] for i in range(3)])  # what every training step sees
    assert batch["image"].shape == (1, 3, 64, 64) and batch["index"].tolist() == [1]
    assert [(b.path, b.reason.split(" (")[0]) for b in batch["bad"]] == [
        (str(empty_lut), "VOI LUT Sequence item without LUT Descriptor or LUT Data"),
        (str(zero_width), "DICOM pixel data unreadable"),
    ]


def test_symlink_loop_in_a_class_folder_keeps_every_image_with_its_own_label(tmp_path, caplog):
    write_class_folders(tmp_path, {"normal": 2, "opacity": 3}, size=32)
    (tmp_path / "normal" / "up").symlink_to("..", target_is_directory=True)  # normal/up/opacity/... on main
    items, classes = read_class_folders(tmp_path)
    assert classes == ["normal", "opacity"]
    assert (
        sorted((p.parent.name, label) for p, label in items)
        == [("normal", "normal")] * 2 + [("opacity", "opacity")] * 3
    )
    assert f"not following {tmp_path / 'normal' / 'up'} -> {tmp_path}" in caplog.text


def test_heatmap_names_never_collide(tmp_path, binary_model, capsys):
    for rel in ("y/a.png", "z/a.png", "z/a-2.png"):
        write_png(tmp_path / "in" / rel, size=48, seed=len(rel))
    argv = ["predict", str(binary_model), str(tmp_path / "in"), "--heatmaps", str(tmp_path / "hm")]
    assert main([*argv, "-o", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    rows = read_csv(tmp_path / "p.csv")
    names = {r["path"].split("/in/")[1]: r["heatmap"].split("/hm/")[1] for r in rows}
    assert names == {"y/a.png": "a.png", "z/a-2.png": "a-2.png", "z/a.png": "a-3.png"}
    assert sorted(p.name for p in (tmp_path / "hm").iterdir()) == ["a-2.png", "a-3.png", "a.png"]
    capsys.readouterr()


def test_csv_line_with_missing_fields_is_named(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text("path,label\na.png,NORMAL\nb.png\n")
    with pytest.raises(ValueError) as error:
        load_splits(DataConfig(labels_csv=str(tmp_path / "labels.csv")))
    assert str(error.value) == (
        f"{tmp_path / 'labels.csv'}:3: 1 field(s) but the header has 2 (path, label); "
        "fix the missing or extra comma on that line"
    )


def test_csv_with_a_byte_order_mark_reads(tmp_path):
    write_class_folders(tmp_path, {"NORMAL": 6, "PNEUMONIA": 6}, size=32)
    lines = ["path,label"] + [f"{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(tmp_path.rglob("*.png"))]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8-sig")  # as Excel saves it
    assert (tmp_path / "labels.csv").read_bytes().startswith(b"\xef\xbb\xbfpath,")
    splits = load_splits(DataConfig(labels_csv=str(tmp_path / "labels.csv"), label_column="label", test_fraction=0.3))
    assert splits.class_names == ["NORMAL", "PNEUMONIA"] and splits.label_names == ["PNEUMONIA"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12


REPO_ROOT = Path(__file__).resolve().parents[1]
X = torch.linspace(-2, 2, 1 * 3 * 64 * 64).reshape(1, 3, 64, 64)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


# =============================================================================================
# Weights, models and the Hub (qing.weights, qing.models, qing.hub, qing._factory, qing.meta)
# =============================================================================================

XRV_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"


def _plant_marker(path: str) -> None:
    """What a planted pickle runs when unpickled: it leaves a file, so a test can see whether it ran."""
    Path(path).write_text("the pickle ran")


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_plant_marker, (self.marker,))


def _tiny(num_classes: int = 2, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = qing.create_model("qing_test_tr1", num_classes=num_classes, **kwargs).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


# ---- issue 12, item 1: a Hub repo's config.json cannot point qing at a local file ----------------------------


def test_a_hub_config_cannot_choose_a_local_file(hub, tmp_path, caplog):
    published, planted = _tiny(seed=1), _tiny(seed=2)
    other = tmp_path / "elsewhere" / "other.safetensors"
    other.parent.mkdir()
    save_file(planted.state_dict(), other)  # a file on the user's disk that the repo's config names
    repo = "qing-tester/planted-config"
    qing.push_to_hub(published, repo, label_names=["a", "b"])
    config = json.loads(hub.files(repo)["config.json"])
    config["pretrained_cfg"].update(file=str(other), url="http://127.0.0.1:9/never-fetched.pth")
    HfApi().upload_file(path_or_fileobj=json.dumps(config).encode(), path_in_repo="config.json", repo_id=repo)

    with caplog.at_level(logging.WARNING, logger="qing"):
        model = qing.create_model(f"hf-hub:{repo}", pretrained=True)
    assert torch.equal(_logits(model), _logits(published))
    assert f"qing_test_tr1: ignored file, url from the config.json of {repo}" in caplog.text
    assert "file" not in model.pretrained_cfg or model.pretrained_cfg["file"] != str(other)

    folder = tmp_path / "local"  # the same for local-dir: a url or state_dict in config.json is ignored
    qing.save_pretrained(published, folder, label_names=["a", "b"])
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["url"] = "http://127.0.0.1:9/never-fetched.pth"
    (folder / "config.json").write_text(json.dumps(config))
    assert torch.equal(_logits(qing.from_pretrained(folder)), _logits(published))


# ---- issue 12, item 2: registry files are searched only in the weights directory; trust is the caller's -------


def test_a_planted_file_in_the_current_folder_is_never_read(tmp_path, monkeypatch):
    marker = tmp_path / "marker.txt"
    work = tmp_path / "work"
    (work / "xrv").mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Planted(marker)}, work / "xrv" / XRV_FILE)
    monkeypatch.chdir(work)
    monkeypatch.setenv("QING_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setattr("qing.weights.locate.XRV_CACHE_DIR", tmp_path / "xrv-cache")
    monkeypatch.setenv("QING_TRUST_PICKLE", "1")  # the documented opt-in, set for another file
    with pytest.raises(WeightsNotFoundError) as err:  # offline (the suite): not found, and ./xrv is not looked at
        qing.create_model("qing_xrv_densenet121.all", pretrained=True)
    assert str(work / "xrv") not in str(err.value) and not marker.exists()

    # in the weights directory the same file is still refused: QING_TRUST_PICKLE covers only files the caller names
    (tmp_path / "weights" / "xrv").mkdir(parents=True)
    (work / "xrv" / XRV_FILE).rename(tmp_path / "weights" / "xrv" / XRV_FILE)
    with pytest.raises(UnsafeCheckpointError, match=r"unsafe pickle: it contains tests\.test_faults\._plant_marker"):
        qing.create_model("qing_xrv_densenet121.all", pretrained=True)
    assert not marker.exists()


# ---- issue 12, item 6: save_pretrained replaces only a qing model folder ------------------------------------


def test_save_pretrained_keeps_a_project_folder(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"name": "my-project"}')
    (project / "main.py").write_text("print('hello')\n")
    model = _tiny()
    with pytest.raises(FileExistsError) as err:
        qing.save_pretrained(model, project, label_names=["a", "b"])
    assert str(err.value) == (
        f"{project} is not a qing model folder (its config.json is not one qing wrote); refusing to replace it and "
        "what it holds (config.json, main.py). Choose a new folder, or pass overwrite=True to replace it with "
        "everything in it."
    )
    assert (project / "main.py").read_text() == "print('hello')\n"

    saved = qing.save_pretrained(model, tmp_path / "model", label_names=["a", "b"])
    qing.save_pretrained(_tiny(seed=3), saved, label_names=["a", "b"])  # a qing model folder is replaced
    assert torch.equal(_logits(qing.from_pretrained(saved)), _logits(_tiny(seed=3)))
    qing.save_pretrained(model, project, label_names=["a", "b"], overwrite=True)
    assert not (project / "main.py").exists() and qing.hub.is_model_folder(project)


# ---- issue 12, item 10: qing pull keeps every file byte for byte ---------------------------------------------


def test_pull_keeps_every_file_byte_for_byte(hub, tmp_path, monkeypatch, capsys):
    repo = "qing-tester/licensed"
    qing.push_to_hub(_tiny(), repo, label_names=["a", "b"])
    card = (
        "---\nlicense: cc-by-nc-4.0\nlibrary_name: timm\n---\n# Licensed\n\nTrained on data that forbids "
        "commercial use.\n\n## Citation\n\n```bibtex\n@misc{x, title={X}}\n```\n"
    )
    api = HfApi()
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo)
    api.upload_file(path_or_fileobj=b"third-party notices\n", path_in_repo="NOTICE.txt", repo_id=repo)
    monkeypatch.chdir(tmp_path)
    assert main(["pull", repo, "pulled"]) == 0
    files = hub.files(repo)
    pulled = {p.relative_to(tmp_path / "pulled").as_posix(): p.read_bytes() for p in (tmp_path / "pulled").rglob("*")}
    assert pulled == files  # README (licence, citation), NOTICE.txt, weights and config: all as the repo has them
    assert (
        "saved: pulled (.gitattributes, NOTICE.txt, README.md, config.json, model.safetensors)"
        in capsys.readouterr().out
    )


# ---- issue 12, item 14: messages ---------------------------------------------------------------------------


def test_a_classifier_that_does_not_fit_is_reported_with_full_shapes(tmp_path, caplog):
    state = _tiny().state_dict()
    state["head.weight"] = torch.zeros(2, 48)  # another architecture's head: same outputs, other width
    path = tmp_path / "other.safetensors"
    save_file(state, path)
    with caplog.at_level(logging.WARNING, logger="qing"):
        model = qing.create_model(
            "qing_test_tr1", pretrained=True, num_classes=2, pretrained_cfg_overlay=dict(file=str(path))
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert (
        "the checkpoint's classifier does not fit the model's 2 outputs (head.weight (2, 48) vs model (2, 64); "
        "head.bias (2,) vs model (2,)): dropped head.weight, head.bias" in warnings[0]
    )
    assert model.qing_load_report.dropped == ["head.weight", "head.bias"]


def test_an_unknown_pretrained_cfg_key_names_the_valid_ones():
    with pytest.raises(TypeError) as err:
        qing.create_model("qing_test_tr1", pretrained_cfg_overlay=dict(mean=(0.5,) * 3, labels=["a"]))
    assert str(err.value).startswith(
        "qing_test_tr1: unknown pretrained_cfg_overlay key(s) 'labels'; timm's PretrainedCfg has architecture, "
    )
    assert "label_names" in str(err.value)
    with pytest.raises(TypeError, match="unknown pretrained_cfg_overlay key"):
        timm.create_model("qing_chexnet_densenet121", pretrained_cfg_overlay=dict(licence="x"))


def test_a_malicious_legacy_pickle_is_called_unsafe(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "model.pth.tar"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Planted(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as err:
        qing.create_model("qing_test_tr1", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(err.value)
    assert message.startswith(
        f"refusing to unpickle {path}: unsafe pickle: it contains tests.test_faults._plant_marker."
    )
    assert "trust_pickle=True" in message and "QING_TRUST_PICKLE=1" in message and not marker.exists()


# ---- issue 13, item 1: a random head carries no label names, no thresholds, and says so once ----------------


def test_a_backbone_only_load_says_which_parts_are_random(tmp_path, caplog):
    path = tmp_path / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), path)
    with caplog.at_level(logging.INFO, logger="qing"):
        model = qing.create_model(
            "qing_test_tr1.r160_in1k", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "qing_test_tr1.r160_in1k: randomly initialized (not in the checkpoint): cls_token, token_proj.* (4), "
        "blocks.* (12), pre_logits.* (2), head.* (2); label names: class_0..class_13 (the source's 14 label names "
        "do not apply); no thresholds: fine-tune the model before reading its predictions"
    ]
    assert model.pretrained_cfg["label_names"] == tuple(f"class_{i}" for i in range(14))
    assert model.qing_meta.thresholds is None


def test_the_zoo_marks_backbone_only_tags():
    spec = importlib.util.spec_from_file_location("model_zoo", REPO_ROOT / "docs" / "hooks" / "model_zoo.py")
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    rows = {
        line.split(" | ")[0].strip("| `"): line
        for line in zoo.model_zoo_markdown().splitlines()
        if line.startswith("| `")
    }
    assert "head: random (backbone only)" in rows["qing_resnet50_tr2.a1_in1k"]
    assert "head: random (backbone only)" in rows["qing_densenet121_tr2.chexnet"]
    assert "ChestX-ray14 (14)" in rows["qing_chexnet_densenet121.chexnet"]  # its classifier is CheXNet's own
    assert "no licence stated by the source" in rows["qing_chexnet_densenet121.chexnet"]


# ---- issue 13, item 3: num_classes, label names and thresholds stay consistent --------------------------------


def test_label_names_follow_the_head_through_create_reset_and_save(tmp_path, caplog):
    model = qing.create_model("qing_densenet121_tr2", num_classes=1, device="meta")
    assert (model.pretrained_cfg["num_classes"], model.pretrained_cfg["label_names"]) == (1, ("class_0",))
    model = _tiny(num_classes=3)
    qing.set_meta(model, thresholds=[0.2, 0.4, 0.6], threshold_method="youden", metrics={"roc_auc": 0.9})
    model.reset_classifier(2)
    assert model.pretrained_cfg["label_names"] == ("class_0", "class_1") and model.pretrained_cfg["num_classes"] == 2
    assert model.qing_meta.thresholds is None and model.qing_meta.metrics == {}
    with caplog.at_level(logging.WARNING, logger="qing"):
        folder = qing.save_pretrained(model, tmp_path / "saved")
    assert json.loads((folder / "config.json").read_text())["label_names"] == ["class_0", "class_1"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    plain = qing.create_model("qing_chexnet_densenet121", device="meta")
    plain.reset_classifier(1)
    assert plain.pretrained_cfg["label_names"] == ("class_0",)


# ---- issue 13, item 9: set_meta ---------------------------------------------------------------------------


def test_set_meta_takes_one_threshold_for_all_and_forgets_a_stale_method():
    model = _tiny(num_classes=3)
    qing.set_meta(model, thresholds=[0.1, 0.2, 0.3], threshold_method="youden")
    assert qing.set_meta(model, thresholds=0.3).thresholds == [0.3, 0.3, 0.3]
    assert model.qing_meta.threshold_method is None  # "youden" described the old thresholds
    assert qing.set_meta(model, thresholds=[0.5, 0.5, 0.4], threshold_method="manual").threshold_method == "manual"
    with pytest.raises(ValueError, match="2 thresholds for a model with 3 outputs"):
        qing.set_meta(model, thresholds=[0.5, 0.5])


# ---- issue 13, item 10: file modes and a short LoadReport repr -----------------------------------------------


def test_saved_files_are_0644_and_the_load_report_repr_is_short(tmp_path):
    folder = qing.save_pretrained(_tiny(), tmp_path / "m", label_names=["a", "b"])
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {
        "model.safetensors": "0o644", "config.json": "0o644", "README.md": "0o644"
    }  # fmt: skip
    model = qing.create_model(
        "qing_test_tr1", pretrained=True, num_classes=2, pretrained_cfg_overlay=dict(file=str(folder))
    )
    text = repr(model.qing_load_report)
    assert text == (
        f"LoadReport('qing_test_tr1', source={str(folder / 'model.safetensors')!r}, format='qing', loaded=111, "
        "filled=0, dropped=0, unused=0, adapted=0)"
    )


# ---- issue 13, item 6 (Python side): errors that suggest the right thing --------------------------------------


def test_from_pretrained_says_no_such_folder_and_takes_run_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceNotFoundError) as err:
        qing.from_pretrained("./runs/typo/checkpoints/best")
    assert str(err.value).startswith("no such folder: ./runs/typo/checkpoints/best does not exist; ")
    model = _tiny()
    qing.save_pretrained(model, tmp_path / "runs" / "cxr" / "checkpoints" / "best", label_names=["a", "b"])
    for run in ("runs/cxr", tmp_path / "runs" / "cxr"):
        assert torch.equal(_logits(qing.from_pretrained(run)), _logits(model))


def test_a_mistyped_overlay_path_is_named_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QING_WEIGHTS_DIR", str(tmp_path / "weights"))
    with pytest.raises(WeightsNotFoundError) as err:
        qing.create_model(
            "qing_densenet121_tr2", pretrained=True, pretrained_cfg_overlay=dict(file="weigths/chexnet/model.pth.tar")
        )
    assert str(err.value) == (
        f"pretrained weights for qing_densenet121_tr2.chexnet: the file {tmp_path / 'weigths/chexnet/model.pth.tar'} "
        f"('weigths/chexnet/model.pth.tar' relative to the current directory {tmp_path}) given as "
        "pretrained_cfg_overlay file does not exist; check the path (an absolute path avoids surprises)"
    )
    assert "weights/weigths" not in str(err.value)


def test_checkpoint_path_goes_through_format_detection(tmp_path):
    torchvision = pytest.importorskip("torchvision")

    torch.manual_seed(31)
    reference = torchvision.models.densenet121(weights=None)
    reference.classifier = torch.nn.Sequential(torch.nn.Linear(1024, 14), torch.nn.Sigmoid())
    randomize_batchnorm(reference).eval()
    path = tmp_path / "model.pth.tar"
    torch.save({"state_dict": legacy_chexnet_state_dict(reference)}, path, _use_new_zipfile_serialization=False)
    x = torch.randn(1, 3, 64, 64)
    for create in (timm.create_model, qing.create_model):
        model = create("qing_chexnet_densenet121", checkpoint_path=str(path)).eval()
        with torch.no_grad():
            assert torch.allclose(torch.sigmoid(model(x)), reference(x), atol=1e-5)
    hybrid = timm.create_model("qing_densenet121_tr2", checkpoint_path=str(path)).eval()
    with torch.no_grad():
        assert torch.allclose(hybrid.backbone.forward_features(x), reference.features(x), atol=1e-5)


# ==== Training runs and run folders (issue 12 items 4-9 and 13, 13 items 2, 5, 6, 8, 10, 14, 18 item 3) ====


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """16 train (8 patients) and 8 test synthetic images at 64 px."""
    return synthetic_root(tmp_path_factory.mktemp("synthetic"))


def _train_args(data: Path, *extra: str) -> list[str]:
    """A ``qing train`` command line for qing_test_tr1 on the synthetic images: one short epoch, no extras."""
    return [
        "train", str(data), "--model", "qing_test_tr1", "--img-size", "64", "--epochs", "1", "--batch-size", "4",
        "--device", "cpu", "--no-progress", "--no-tensorboard", "--log-images", "0", "--n-bootstrap", "10",
        "--patient-regex", qing.data.PATIENT_REGEX_SYNTHETIC, "--val-fraction", "0.25", *extra,
    ]  # fmt: skip


def _error(result: subprocess.CompletedProcess) -> str:
    """The ``qing: error: ...`` part of stderr (after the log lines the run printed before failing)."""
    assert "qing: error: " in result.stderr, result.stderr
    return result.stderr[result.stderr.index("qing: error: ") :]


# ---- 12.5: --overwrite checks everything first, then removes only what qing wrote -----------------


def test_overwrite_checks_first_and_removes_only_what_qing_wrote(tmp_path, data_root):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("my notes")

    # the audit's repro: the batch does not fit, and nothing may be deleted on the way to saying so
    bad = run_qing(*_train_args(data_root, "--report-dir", "precious", "--overwrite", "--batch-size", "32",
                                "--output-dir", "run"), cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 1
    assert "fewer than one batch of 32" in bad.stderr
    assert (precious / "notes.txt").read_text() == "my notes" and not (tmp_path / "run").exists()

    # a valid run that would write its report into a folder qing does not own: refused, folder untouched
    refused = run_qing(*_train_args(data_root, "--report-dir", "precious", "--overwrite", "--output-dir", "run"),
                       cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 1
    assert _error(refused).startswith(
        "qing: error: --report-dir precious holds notes.txt, which qing did not write. qing never removes or "
        "replaces files it did not write"
    )
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]

    # a run, the user's own file in its run folder, then --overwrite: qing's files go, the user's stays
    first = run_qing(*_train_args(data_root, "--output-dir", "run"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "run"
    (run / "my-notes.md").write_text("keep me")
    old_best = weights(run / "checkpoints" / "best")
    assert read_marker(run)["entries"] == ["config.yaml", "splits.csv", "train.log"]
    assert read_marker(run / "checkpoints")["entries"] == ["best", "last"]

    again = run_qing(*_train_args(data_root, "--output-dir", "run"), cwd=tmp_path)
    assert again.returncode == 1
    assert "already holds a run" in again.stderr
    assert "--resume continues it, --overwrite replaces it (removing only what qing wrote)" in again.stderr
    assert "resume=True" not in again.stderr and "Traceback" not in again.stderr

    replaced = run_qing(*_train_args(data_root, "--output-dir", "run", "--overwrite", "--seed", "7"), cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert (run / "my-notes.md").read_text() == "keep me"
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 7
    new_best = weights(run / "checkpoints" / "best")
    assert any(not torch.equal(old_best[k], new_best[k]) for k in old_best)  # really a new run
    log = (run / "train.log").read_text()
    assert log.count("training qing_test_tr1 (") == 1  # the old log went with the old run

    # a file dropped into qing's report folder blocks the next overwrite instead of being deleted
    (run / "report" / "figure-for-paper.png").write_bytes(b"not qing's")
    blocked = run_qing(*_train_args(data_root, "--output-dir", "run", "--overwrite"), cwd=tmp_path)
    assert blocked.returncode == 1
    assert "holds figure-for-paper.png, which qing did not write" in blocked.stderr
    assert (run / "report" / "figure-for-paper.png").read_bytes() == b"not qing's"
    assert all(torch.equal(new_best[k], v) for k, v in weights(run / "checkpoints" / "best").items())


def test_folders_of_another_run_and_shared_folders_are_refused(tmp_path, data_root):
    first = tiny_config(data_root, tmp_path / "a", report=False, tensorboard=False, log_dir=str(tmp_path / "tb"))
    Trainer(first.replace(tensorboard=True)).fit()
    assert read_marker(tmp_path / "tb")["run"] == str((tmp_path / "a").resolve())
    second = first.replace(output_dir=str(tmp_path / "b"), tensorboard=True, overwrite=True)
    with pytest.raises(RunFolderError, match=r"log_dir .*/tb holds the output of another run \(.*/a\)"):
        Trainer(second).fit()
    with pytest.raises(ValueError, match="output_dir and report_dir are the same folder"):
        Trainer(first.replace(report_dir=str(tmp_path / "a")))


def test_a_refused_run_folder_is_left_exactly_as_it_was(tmp_path, data_root):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "config.yaml").write_text("mine: true\n")
    (folder / "notes.txt").write_text("my notes")
    cfg = tiny_config(data_root, folder, report=False, tensorboard=False)
    with pytest.raises(RunFolderError, match=r"holds config.yaml, which qing did not write.*Nothing was changed"):
        Trainer(cfg).fit()
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "notes.txt"]  # no lock file left behind
    assert (folder / "config.yaml").read_text() == "mine: true\n"


# ---- 12.7 and 12.9: --resume never silently starts over; config.yaml only after a resume succeeded ------


def test_resume_needs_a_complete_recognised_checkpoint(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path / "run", epochs=1, tensorboard=False)
    Trainer(cfg).fit()
    run = cfg.run_dir
    config_before = (run / "config.yaml").read_bytes()
    best_before = weights(run / "checkpoints" / "best")

    # a rejected resume (EMA asked for, the checkpoint has none) changes nothing, config.yaml included
    with pytest.raises(ValueError, match="was saved without EMA weights; resume with ema=False"):
        Trainer(cfg.replace(resume=True, epochs=2, ema=True)).fit()
    assert (run / "config.yaml").read_bytes() == config_before

    # an unreadable training state: refused, nothing replaced
    state = run / "checkpoints" / "last" / "training_state.json"
    state.write_text("{ not json")
    with pytest.raises(FileNotFoundError) as error:
        Trainer(cfg.replace(resume=True, epochs=2)).fit()
    assert str(error.value) == (
        f"resume=True but {run / 'checkpoints' / 'last'} cannot be resumed: it is incomplete or unreadable. "
        "Nothing was changed. To start a new run, drop resume (with overwrite=True if the folder holds an "
        "earlier run)"
    )
    assert (run / "config.yaml").read_bytes() == config_before
    assert all(torch.equal(best_before[k], v) for k, v in weights(run / "checkpoints" / "best").items())

    # from the command line: a run folder without a checkpoint, and the flags named as flags
    fresh = run_qing(*_train_args(data_root, "--output-dir", "fresh", "--resume"), cwd=tmp_path)
    assert fresh.returncode == 1
    assert fresh.stderr.splitlines()[-1] == (
        "qing: error: --resume but fresh/checkpoints/last cannot be resumed: no complete checkpoint there. Nothing "
        "was changed. To start a new run, drop --resume (with --overwrite if the folder holds an earlier run)"
    )
    assert not (tmp_path / "fresh" / "config.yaml").exists() and not (tmp_path / "fresh" / "checkpoints").exists()

    # --overwrite with --resume and nothing to resume: a new run, said so
    new = Trainer(cfg.replace(resume=True, overwrite=True, epochs=1)).fit()
    assert new.epochs_completed == 1
    assert "cannot resume from" in (run / "train.log").read_text()


# ---- 12.8: two runs on one run folder --------------------------------------------------------------


def test_a_second_run_on_the_same_folder_fails_at_once_naming_the_first(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path / "run", epochs=2, tensorboard=False)
    config_file = cfg.save(tmp_path / "run.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, str(TRAIN_SCRIPT), str(config_file), "--pause-at", "0,0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 300
        for line in holder.stdout:
            if line.startswith("PAUSED"):
                break
            assert time.monotonic() < deadline, "the first run did not reach its pause point"
        second = run_qing("train", "--config", str(config_file), cwd=tmp_path)
        assert holder.poll() is None  # the second run did not wait for the first to end
        assert second.returncode == 1
        assert _error(second).startswith(
            f"qing: error: {cfg.run_dir} is in use by another run (pid {holder.pid} on {socket.gethostname()}, started "
        )
        assert "wait for it to finish, or give this run another output folder" in second.stderr
        log = (cfg.run_dir / "train.log").read_text()
        assert log.count("training qing_test_tr1 (") == 1  # the second run wrote nothing into the first's log
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # the operating system released the killed run's lock: a new run takes the folder (the stale owner file is ignored)
    result = Trainer(cfg.replace(overwrite=True, epochs=1)).fit()
    assert result.epochs_completed == 1
    assert not (cfg.run_dir / ".qing-run.owner").exists()


def test_the_lock_is_held_by_a_running_trainer_in_this_process_too(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path / "run", epochs=1, tensorboard=False)
    seen = []

    class SecondRun(Callback):
        def on_step_end(self, trainer, *, epoch, step, loss):
            if not seen:
                with pytest.raises(RunFolderBusyError, match=rf"in use by another run \(pid {os.getpid()} on "):
                    Trainer(cfg.replace(overwrite=True)).fit()
                seen.append(True)

    Trainer(cfg, callbacks=[SecondRun()]).fit()
    assert seen == [True]


# ---- 12.9: durability --------------------------------------------------------------------------------


def test_checkpoint_replacement_is_flushed_around_each_rename(tmp_path, monkeypatch):
    model = qing.create_model("qing_test_tr1", num_classes=1)
    target = tmp_path / "checkpoints" / "last"
    kwargs = dict(label_names=["x"], data_config={"input_size": (3, 64, 64)}, training_state={"epoch": 1})
    save_checkpoint(target, model, **kwargs)

    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(target, model, **{**kwargs, "training_state": {"epoch": 2}})

    aside, into_place = [e for e in events if e[0] == "replace"]  # the old folder aside, the new one in
    staging = Path(into_place[1])
    assert aside[1] == str(target) and Path(aside[2]).name.startswith(".last.old-") and into_place[2] == str(target)
    before = [e[1] for e in events[: events.index(aside)] if e[0] == "fsync"]
    # every file written into the staging folder, and the staging folder itself, reached the disk first
    names = ("model.safetensors", "config.json", "training_state.json", "training_state.safetensors")
    assert {str(staging / name) for name in names} <= set(before)
    assert str(staging) in before
    # the parent folder after the old one went aside, after the new one came in, and after the old one went
    after_aside = [e[1] for e in events[events.index(aside) + 1 : events.index(into_place)] if e[0] == "fsync"]
    after_in = [e[1] for e in events[events.index(into_place) + 1 :] if e[0] == "fsync"]
    assert after_aside == [str(target.parent)] and after_in == [str(target.parent)] * 2
    assert load_training_state(target)["epoch"] == 2 and not list(target.parent.glob(".last.*"))


def test_checkpoint_repair_takes_the_newest_complete_copy(tmp_path):
    model = qing.create_model("qing_test_tr1", num_classes=1)
    folder = tmp_path / "checkpoints"
    kwargs = dict(label_names=["x"], data_config={"input_size": (3, 64, 64)})
    for epoch in (1, 2, 3):
        state = {"epoch": epoch, "global_step": 3 * epoch}
        save_checkpoint(folder / f"e{epoch}", model, training_state=state, **kwargs)
    # a kill during a replacement: "last" gone, epoch 2 set aside complete, epoch 3 set aside but half
    # deleted (an interrupted clean-up of a later save), and a half-written staging folder
    os.replace(folder / "e2", folder / ".last.old-aaaa1111")
    os.replace(folder / "e3", folder / ".last.old-bbbb2222")
    (folder / ".last.old-bbbb2222" / "training_state.safetensors").unlink()
    os.replace(folder / "e1", folder / ".last.x1y2.tmp")
    now = time.time()
    os.utime(folder / ".last.old-bbbb2222", (now + 10, now + 10))  # the broken copy looks newest by time

    assert find_checkpoint(folder / "last", repair=False, require_state=True) is None  # looking changes nothing
    assert len(list(folder.glob(".last.*"))) == 3
    last = find_checkpoint(folder / "last", require_state=True)
    assert last == folder / "last" and load_training_state(last)["epoch"] == 2
    assert sorted(p.name for p in folder.iterdir()) == ["last"]  # leftovers removed

    # only incomplete copies: no checkpoint, and resume says so instead of starting over
    os.replace(folder / "last", folder / ".last.old-cccc3333")
    (folder / ".last.old-cccc3333" / "model.safetensors").write_bytes(b"\x00" * 10)
    assert find_checkpoint(folder / "last", require_state=True) is None


# ---- 12.13: YAML numbers -----------------------------------------------------------------------------


def test_yaml_numbers_are_numbers_and_wrong_types_name_the_field(tmp_path, data_root):
    (tmp_path / "run.yaml").write_text("lr: 1e-4\nmin_lr: 1e-7\nepochs: '3'\ndata:\n  val_fraction: 2.5e-1\n")
    shown = run_qing("train", str(data_root), "--config", "run.yaml", "--set", "backbone_lr=3e-5",
                     "--set", "weight_decay=5e-2", "--print-config", cwd=tmp_path)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    config = yaml.safe_load(shown.stdout)
    values = (config["lr"], config["min_lr"], config["backbone_lr"], config["weight_decay"], config["epochs"])
    assert values == (1e-4, 1e-7, 3e-5, 0.05, 3)
    assert all(type(v) is float for v in values[:4]) and config["data"]["val_fraction"] == 0.25
    cfg = TrainConfig.from_file(tmp_path / "run.yaml")
    assert (cfg.lr, cfg.min_lr, cfg.epochs, cfg.data.val_fraction) == (1e-4, 1e-7, 3, 0.25)

    bad = run_qing("train", str(data_root), "--set", "lr=fast", "--print-config", cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr == "qing: error: lr must be a number, got 'fast' (str)\n"
    with pytest.raises(ValueError, match=r"^data\.scale must be a list of 2 numbers, got \[0\.9\] \(list\)$"):
        TrainConfig(data={"scale": [0.9]})
    with pytest.raises(ValueError, match=r"^epochs must be an integer, got 2\.5 \(float\)$"):
        TrainConfig.from_dict({"epochs": 2.5})
    with pytest.raises(ValueError, match=r"^freeze_backbone must be true or false, got 'maybe' \(str\)$"):
        TrainConfig.from_dict({"freeze_backbone": "maybe"})
    with pytest.raises(ValueError, match=r"^data\.label_columns must be a list of texts, got 'Mass' \(str\)$"):
        TrainConfig.from_dict({"data": {"label_columns": "Mass"}})
    assert TrainConfig.from_dict({"pos_weight": "2.5"}).pos_weight == 2.5


# ---- 12.4 and 13.6: qing push's token and its DIR -------------------------------------------------------


def test_push_reads_the_token_from_a_file_and_warns_about_token_on_the_command_line(hub, tmp_path):
    model = qing.create_model("qing_test_tr1", num_classes=1).eval()
    qing.save_pretrained(model, tmp_path / "model", label_names=["Pneumonia"])
    env = qing_env(
        HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(hub.cache_dir),
        HF_HOME=str(tmp_path / "hf-home"),
    )  # fmt: skip
    env.pop("HF_TOKEN", None)
    token_file = tmp_path / "token"
    token_file.write_text(hub.token + "\n")
    token_file.chmod(0o600)
    pushed = run_qing("push", "model", "qing-tester/from-file", "--token-file", "token", cwd=tmp_path, env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert "model.safetensors" in hub.files("qing-tester/from-file") and pushed.stderr == ""

    token_file.chmod(0o644)
    on_line = run_qing("push", "model", "qing-tester/on-line", "--token", hub.token, cwd=tmp_path, env=env)
    assert on_line.returncode == 0, on_line.stderr
    assert on_line.stderr == (
        "qing: warning: a token given with --token shows in `ps` and in your shell history; prefer the HF_TOKEN "
        "environment variable, `hf auth login`, or --token-file FILE\n"
    )
    readable = run_qing("push", "model", "qing-tester/readable", "--token-file", "token", cwd=tmp_path, env=env)
    assert readable.returncode == 0, readable.stderr
    assert "--token-file token can be read by other users; restrict it with chmod 600 token" in readable.stderr

    token_file.write_text("")
    empty = run_qing("push", "model", "qing-tester/x", "--token-file", "token", cwd=tmp_path, env=env)
    assert empty.returncode == 1
    assert empty.stderr == (
        "qing: error: --token-file token must hold the token alone (one word, e.g. hf_...); it holds 0\n"
    )
    (tmp_path / "runs").mkdir()
    missing = run_qing("push", "runs/nope", "me/x", cwd=tmp_path, env=env)
    assert missing.returncode == 1 and "hf-hub:" not in missing.stderr
    assert missing.stderr == (
        "qing: error: DIR runs/nope does not exist; give a model folder or a run folder (as qing train --output-dir "
        "wrote it)\n"
    )


# ---- 13.2: the run's own split, and no silent evaluation on training images -----------------------------


def test_eval_takes_the_runs_test_split_and_warns_about_training_images(tmp_path):
    data = tmp_path / "images"  # class folders only: qing makes the train/val/test split
    for cls, opacity in (("normal", False), ("opacity", True)):
        (data / cls).mkdir(parents=True)
        rng = np.random.default_rng(int(opacity))
        for i in range(12):
            image = qing.data.synthetic_cxr_image(rng, size=64, opacity=opacity)
            image.save(data / cls / f"synthetic_p{100 * opacity + i:04d}_0.png")
    trained = run_qing(*_train_args(data, "--output-dir", "run"), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr

    rows = read_split_record(tmp_path / "run" / "splits.csv")
    by_split = {s: [r for r in rows if r.split == s] for s in ("train", "val", "test")}
    assert sum(map(len, by_split.values())) == 24 and all(by_split.values())
    assert {r.patient for r in by_split["test"]}.isdisjoint(r.patient for r in by_split["train"])
    assert all(r.relative_path == f"{r.label}/{r.path.name}" for r in rows)

    test = run_qing("eval", "run", "images", "--split", "test", "-o", "ev-test", "--n-bootstrap", "10", cwd=tmp_path)
    assert test.returncode == 0, test.stderr
    with open(tmp_path / "ev-test" / "predictions.csv", newline="") as f:
        evaluated = [(tmp_path / row["path"]).resolve() for row in csv.DictReader(f)]
    assert sorted(evaluated) == sorted(r.path for r in by_split["test"])
    assert "were used to train" not in test.stderr
    assert f"the test split of run/splits.csv ({len(by_split['test'])} images)" in test.stdout

    everything = run_qing("eval", "run", "images", "-o", "ev-all", "--n-bootstrap", "10", cwd=tmp_path)
    assert everything.returncode == 0, everything.stderr
    n_train, n_val = len(by_split["train"]), len(by_split["val"])
    assert (
        f"qing: warning: {n_train + n_val} of the 24 images were used to train ({n_train}) or validate ({n_val}) "
        "this model, so its metrics on them are optimistic; evaluate on held-out images (qing eval run DATA "
        "--split test takes the run's test split)"
    ) in everything.stderr


# ---- 13.5: published weights by default -----------------------------------------------------------------


def test_train_starts_from_the_tags_published_weights_by_default(tmp_path, data_root, monkeypatch, caplog):
    name = "qing_test_tr1.r160_in1k"  # its backbone: timm's test_resnet.r160_in1k on the Hub
    backbone = qing.create_model("test_resnet", num_classes=0)
    torch.manual_seed(5)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in backbone.state_dict().items()}
    local = tmp_path / "weights" / "timm" / "test_resnet.r160_in1k" / "model.safetensors"
    local.parent.mkdir(parents=True)
    save_file(state, str(local))  # the qing weights directory holds a local copy of the tag's Hub weights
    monkeypatch.setenv("QING_WEIGHTS_DIR", str(tmp_path / "weights"))
    cfg = tiny_config(data_root, tmp_path / "run", model=name)
    assert cfg.pretrained is None

    with caplog.at_level("INFO", logger="qing.train"):
        trainer = Trainer(cfg)
    assert next(r for r in caplog.records if r.name == "qing.train").getMessage() == (
        f"{name}: starting from the published weights of {name} (the default; pretrained=False trains from scratch)"
    )
    assert trainer.config.pretrained is True
    loaded = trainer.model.backbone.state_dict()
    common = [k for k in state if k in loaded]
    assert len(common) > 10 and all(torch.equal(loaded[k], state[k]) for k in common)

    caplog.clear()
    with caplog.at_level("INFO", logger="qing.train"):
        scratch = Trainer(cfg.replace(pretrained=False))
    first = next(r for r in caplog.records if r.name == "qing.train").getMessage()
    assert first == f"{name}: training from scratch (random initialization): pretrained=False"
    assert not torch.equal(scratch.model.backbone.state_dict()["conv1.0.weight"], state["conv1.0.weight"])

    # the weights missing: the command line offers its own flags, not Python code
    no_weights = qing_env(QING_WEIGHTS_DIR=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    missing = run_qing(*_train_args(data_root, "--model", name, "--output-dir", "run2"), cwd=tmp_path, env=no_weights)
    assert missing.returncode == 1
    assert f"{name} not found" in _error(missing).splitlines()[0]
    assert "pretrained_cfg_overlay" not in missing.stderr and "qing.create_model(" not in missing.stderr
    assert missing.stderr.rstrip().endswith(
        "For this run: --pretrained-file PATH loads a weights file you have; --no-pretrained trains from scratch "
        "(random initialization)."
    )
    assert not (tmp_path / "run2").exists()
    flags = run_qing("train", str(data_root), "--no-pretrained", "--print-config", cwd=tmp_path)
    assert yaml.safe_load(flags.stdout)["pretrained"] is False


# ---- 13.6 and 13.8: python -m qing.train, and the console of a Python run ---------------------------------


def test_python_m_qing_train_on_an_existing_run_prints_one_line(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path / "run", epochs=1, tensorboard=False)
    config_file = cfg.save(tmp_path / "run.yaml")
    env = {**qing_env(), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "qing.train", str(config_file)]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    last_line = second.stderr.splitlines()[-1]
    assert last_line.startswith(f"python -m qing.train: error: {cfg.run_dir} already holds a run (")
    assert last_line.endswith(
        "; --resume continues it, --set overwrite=true replaces it (removing only what qing wrote), or give this "
        "run another folder (--set output_dir=DIR)"
    )


_CONSOLE_SCRIPT = """
import logging, sys
from qing.train import TrainConfig, Trainer
if sys.argv[2] == "quiet":
    logging.getLogger("qing.train").setLevel(logging.WARNING)
if sys.argv[2] == "configured":  # a program with its own logging that silences qing (as benchmarks/ does)
    logging.basicConfig(level=logging.INFO, format="mine %(levelname)s %(name)s: %(message)s")
    logging.getLogger("qing").setLevel(logging.WARNING)
    logging.getLogger("app").info("starting")
Trainer(TrainConfig.from_file(sys.argv[1])).fit()
"""


def test_fit_logs_one_line_per_epoch_to_the_console_unless_silenced(tmp_path, data_root):
    env = {**qing_env(), "PYTHONPATH": str(REPO)}
    for mode in ("default", "quiet", "configured"):
        cfg = tiny_config(data_root, tmp_path / mode, epochs=2, tensorboard=False)
        config_file = cfg.save(tmp_path / f"{mode}.yaml")
        done = subprocess.run(
            [sys.executable, "-c", _CONSOLE_SCRIPT, str(config_file), mode],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        epochs = [line for line in done.stderr.splitlines() if line.startswith("qing.train: epoch ")]
        ours = [line for line in done.stderr.splitlines() if line.startswith("qing.train: ")]
        if mode == "default":
            assert [line.split(":")[1] for line in epochs] == [" epoch 1/2", " epoch 2/2"]
            assert "train_loss=" in epochs[0] and "val_auroc=" in epochs[0]
            assert ours[0] == (
                "qing.train: qing_test_tr1: training from scratch (random initialization): qing_test_tr1 has no "
                "published weights"
            )
        else:
            assert ours == []
        if mode == "configured":  # the program's handler shows its own records and qing's warnings only
            mine = [line for line in done.stderr.splitlines() if line.startswith("mine ")]
            assert mine[0] == "mine INFO app: starting"
            assert all(line.startswith("mine WARNING qing") for line in mine[1:]), mine
        assert (cfg.run_dir / "train.log").read_text().count(" INFO qing.train: epoch ") == 2  # the log keeps them


# ---- 14: the loss is read every log_every_steps steps, not every step ------------------------------------


class _LossReads(TorchFunctionMode):
    """Counts host reads (``.item()``, ``.tolist()``, ``float()``, ...) of tensors computed from a loss."""

    READS = frozenset({"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy"})

    def __init__(self):
        super().__init__()
        self.tainted: dict[int, weakref.ref] = {}
        self.reads = 0

    def _is_tainted(self, value) -> bool:
        ref = self.tainted.get(id(value))
        return ref is not None and ref() is value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        hit = any(isinstance(t, torch.Tensor) and self._is_tainted(t) for t in tree_leaves((args, kwargs)))
        if hit and name in self.READS:
            self.reads += 1
        out = func(*args, **kwargs)
        if hit or name in ("binary_cross_entropy_with_logits", "cross_entropy"):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.tainted[id(t)] = weakref.ref(t)
        return out


class _ReadsPerStep(Callback):
    """Host reads of the loss during each optimizer step (validation reads between epochs are left out)."""

    def __init__(self, mode: _LossReads):
        self.mode, self.mark, self.per_step, self.losses = mode, 0, [], []

    def on_step_end(self, trainer, *, epoch, step, loss):
        self.per_step.append(self.mode.reads - self.mark)
        self.mark = self.mode.reads
        self.losses.append(loss)  # kept on the device: reading it here would count

    def on_epoch_end(self, trainer, *, epoch, record):
        self.mark = self.mode.reads


def test_the_loss_is_read_once_per_log_every_steps_not_every_step(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path / "run", epochs=2, log_every_steps=3)
    mode = _LossReads()
    probe = _ReadsPerStep(mode)
    with mode:
        result = Trainer(cfg, callbacks=[probe]).fit()
    # 3 steps per epoch: one read after the 3rd step of each (the 3rd global step, and the end of the epoch)
    assert probe.per_step == [0, 0, 1, 0, 0, 1]
    losses = [float(loss) for loss in probe.losses]
    np.testing.assert_allclose([h["train_loss"] for h in result.history], [np.mean(losses[:3]), np.mean(losses[3:])])
    events = EventAccumulator(str(cfg.tensorboard_path), size_guidance={"scalars": 0})
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in logged] == [3, 6]
    np.testing.assert_allclose([v for _, v in logged], [np.mean(losses[:3]), np.mean(losses[3:])], rtol=1e-6)


def test_a_nan_loss_between_reads_is_found_at_the_next_read_with_its_step(tmp_path, data_root):
    class Poison(Callback):
        def on_step_end(self, trainer, *, epoch, step, loss):
            if (epoch, step) == (1, 0):
                with torch.no_grad():
                    trainer.model.head.weight.fill_(float("nan"))

    cfg = tiny_config(data_root, tmp_path / "run", epochs=3, log_every_steps=1)
    with pytest.raises(qing.train.NonFiniteLossError, match=r"^training loss is nan at epoch 2, step 2: stopping"):
        Trainer(cfg, callbacks=[Poison()]).fit()
    assert load_training_state(cfg.checkpoints_path / "last")["epoch"] == 1


# ---- 18.3: bf16 autocast training on CPUs with bfloat16 instructions ---------------------------------------


def test_bf16_training_on_cpu_where_supported_and_a_clear_error_elsewhere(tmp_path, data_root, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(CPU_BF16_ENV, "0")  # a CPU without bfloat16 instructions
    with pytest.raises(ValueError, match=r"amp='bf16' on this CPU \(.*\) would emulate bfloat16: it has no bfloat16 "):
        Trainer(tiny_config(data_root, tmp_path / "no", amp="bf16"))
    assert resolve_amp("auto", cpu) is None
    with pytest.raises(ValueError, match=r"amp='fp16' needs CUDA \(float16 autocast with a gradient scaler\)"):
        resolve_amp("fp16", cpu)

    monkeypatch.setenv(CPU_BF16_ENV, "1")  # a CPU with them (forced: this machine may have none)
    assert resolve_amp("auto", cpu) == torch.bfloat16  # the benchmark's decision, checked against its results below
    results = json.loads((REPO / "benchmarks" / "results" / "finetune_pneumonia200_amp_cpu.json").read_text())
    verdict = results["comparison"]["qing_densenet121_tr2"]
    assert len(verdict["auroc_difference_bf16_minus_fp32_per_seed"]) == 3
    assert CPU_AUTO_BF16 is verdict["within_seed_spread"] is True
    assert abs(verdict["auroc_difference_mean"]) <= verdict["fp32_auroc_sd_over_seeds"]
    trainer = Trainer(tiny_config(data_root, tmp_path / "bf16", amp="bf16", epochs=1, tensorboard=False))
    assert trainer.amp_dtype == torch.bfloat16
    dtypes = []
    linear = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    result = trainer.fit()
    assert len(dtypes) == 3 + 1 and set(dtypes) == {torch.bfloat16}  # 3 training steps and validation, in bf16
    assert all(t.dtype == torch.float32 for t in weights(result.best_checkpoint).values() if t.is_floating_point())
    assert np.isfinite(result.history[0]["train_loss"])


# ---- 13.10: training curves and the attention figure --------------------------------------------------------


def test_training_curves_have_whole_epoch_ticks(tmp_path, monkeypatch):
    from qing.evaluate import plots

    figures = []
    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figures.append(fig) or real(fig, path, **kw))
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_auroc": 0.5 + e / 10} for e in (1, 2, 3)]
    plots.plot_training_curves(history, tmp_path / "curves.png")
    (fig,) = figures
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_the_attention_figure_title_is_not_clipped_with_one_image(tmp_path):
    model = qing.create_model("qing_test_tr1", num_classes=1, img_size=64).eval()
    path = qing.explain.save_attention_overlays(model, torch.randn(1, 3, 64, 64), tmp_path / "attention.png")
    pixels = np.asarray(Image.open(path).convert("L"))
    title_band = pixels[: int(0.1 * pixels.shape[0])]
    assert (title_band < 128).any()  # the title is drawn
    # and ends before the figure does: no dark pixel in the outer 2% of columns of the title band
    edge = max(2, pixels.shape[1] // 50)
    assert (title_band[:, :edge] > 200).all() and (title_band[:, -edge:] > 200).all()
