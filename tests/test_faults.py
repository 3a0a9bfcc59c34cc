"""Faults and bad input, collected in one place (issue 12): each test reproduces a failure seen on main.

Sections are headed by their area; add new ones under their own heading.
"""

from __future__ import annotations

import json
import re
import struct
import zlib

import numpy as np
import pytest
import torch

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
from qing.meta import set_meta
from tests.make_fake_data import write_class_folders, write_dicom, write_png
from tests.test_cli import read_csv

pydicom = pytest.importorskip("pydicom")


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
