"""Faults and bad input, collected in one place (issue 12): each test reproduces a failure seen on main.

Sections are headed by their area; add new ones under their own heading.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file

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
from qing.hub import ModelSourceNotFoundError
from qing.meta import set_meta
from qing.weights import UnsafeCheckpointError, WeightsNotFoundError
from tests.make_fake_data import write_class_folders, write_dicom, write_png
from tests.model_helpers import randomize_batchnorm
from tests.test_cli import read_csv

pydicom = pytest.importorskip("pydicom")

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
    from tests.test_weights_chexnet import _legacy_chexnet_state_dict

    torch.manual_seed(31)
    reference = torchvision.models.densenet121(weights=None)
    reference.classifier = torch.nn.Sequential(torch.nn.Linear(1024, 14), torch.nn.Sigmoid())
    randomize_batchnorm(reference).eval()
    path = tmp_path / "model.pth.tar"
    torch.save({"state_dict": _legacy_chexnet_state_dict(reference)}, path, _use_new_zipfile_serialization=False)
    x = torch.randn(1, 3, 64, 64)
    for create in (timm.create_model, qing.create_model):
        model = create("qing_chexnet_densenet121", checkpoint_path=str(path)).eval()
        with torch.no_grad():
            assert torch.allclose(torch.sigmoid(model(x)), reference(x), atol=1e-5)
    hybrid = timm.create_model("qing_densenet121_tr2", checkpoint_path=str(path)).eval()
    with torch.no_grad():
        assert torch.allclose(hybrid.backbone.forward_features(x), reference.features(x), atol=1e-5)
