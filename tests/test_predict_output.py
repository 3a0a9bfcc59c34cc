"""What ``qing predict`` shows a new user (issue 13): every file of an input folder accounted for, the
multi-label table with positives first and their thresholds, and heatmaps at the input image's size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import qing
from qing.cli import main
from qing.data import build_transforms, load_image
from qing.meta import set_meta
from tests.make_fake_data import write_dicom, write_png
from tests.train_helpers import one_thread

CXR14_SUBSET = ["Atelectasis", "Effusion", "Pleural_Thickening", "Pneumonia", "Infiltration", "Consolidation"]


@pytest.fixture(scope="module")
def binary_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(2)
    model = qing.create_model("qing_test_tr1", num_classes=1).eval()
    set_meta(model, task="binary", thresholds=[0.5], threshold_method="youden")
    qing.save_pretrained(model, root / "model", label_names=["opacity"], data_config={"input_size": (3, 64, 64)})
    return root / "model"


def probabilities(model_dir, paths, task="binary"):
    model = qing.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    transform = build_transforms(model, train=False)
    with one_thread(), torch.no_grad():
        logits = torch.cat([model(transform(load_image(p))[None]) for p in paths])
    return torch.sigmoid(logits).tolist()


def test_extensionless_dicoms_are_read_and_other_files_reported(tmp_path, binary_model, capsys):
    scans = tmp_path / "dicoms"
    ramp = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    write_dicom(scans / "IM0001", ramp)  # as PACS exports them: no .dcm
    write_dicom(scans / "series" / "IM0002", 4095 - ramp)
    write_png(scans / "chest.png", size=64)
    write_dicom(scans / "other.dcm", ramp)
    (scans / "DICOMDIR.txt").write_text("index\n")
    (scans / ".DS_Store").write_bytes(b"\0")  # hidden: silently ignored
    assert main(["predict", str(binary_model), str(scans), "--format", "json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    paths = [p["path"] for p in document["predictions"]]
    assert paths == [str(scans / n) for n in ("IM0001", "chest.png", "other.dcm", "series/IM0002")]
    reason = "not an image file (no image ending such as .png/.jpg/.dcm, no DICOM preamble)"
    assert document["not_read"] == [{"path": str(scans / "DICOMDIR.txt"), "reason": reason}]
    assert captured.err.splitlines() == [
        f"qing: not read {scans / 'DICOMDIR.txt'}: {reason}",
        "qing: 4 image(s) predicted; calibration: none (the model has no stored temperatures); "
        "thresholds: 0.5 (stored with the model, youden); 1 other file(s) not read (listed above)",
    ]
    expected = probabilities(binary_model, paths)
    assert [p["probabilities"]["opacity"] for p in document["predictions"]] == pytest.approx(
        [e[0] for e in expected], rel=1e-5, abs=1e-6
    )


def test_multilabel_table_shows_positives_first_with_their_thresholds(tmp_path, capsys):
    images = [write_png(tmp_path / f"img{i}.png", size=64, seed=i) for i in range(3)]
    torch.manual_seed(0)
    model = qing.create_model("qing_test_tr1", num_classes=len(CXR14_SUBSET)).eval()
    model_dir = tmp_path / "cxr"
    qing.save_pretrained(model, model_dir, label_names=CXR14_SUBSET, data_config={"input_size": (3, 64, 64)})
    probs = probabilities(model_dir, images)
    # thresholds just below and just above image 0's probabilities: 3 digits would print them equal
    thresholds = [p - 4e-5 if i % 2 == 0 else p + 4e-5 for i, p in enumerate(probs[0])]
    set_meta(model, task="multilabel", thresholds=thresholds, threshold_method="youden")
    tuned = tmp_path / "cxr-tuned"
    qing.save_pretrained(model, tuned, label_names=CXR14_SUBSET, data_config={"input_size": (3, 64, 64)})

    assert main(["predict", str(tuned), *map(str, images), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split("  ")[:1] == ["image"] and "positive (probability >= threshold)" in lines[0]
    first = lines[2]
    assert first.startswith(str(images[0]))
    positive_cell, negative_cell = first[len(str(images[0])) :].strip().split("  ", 1)
    positives = [entry.rsplit(" ", 3) for entry in positive_cell.split("; ")]
    expected = sorted(((n, p) for n, p, t in zip(CXR14_SUBSET, probs[0], thresholds) if p >= t), key=lambda x: -x[1])
    assert [name for name, *_ in positives] == [name for name, _ in expected]  # most probable first, names whole
    for name, p, sign, t in positives:
        assert sign == ">=" and p != t and float(p) >= float(t)  # enough digits to see the difference
        assert float(t) == pytest.approx(thresholds[CXR14_SUBSET.index(name)], abs=5e-5)
    name, p, sign, t = negative_cell.strip().rsplit(" ", 3)
    top_negative = max((p, n) for n, p, t in zip(CXR14_SUBSET, probs[0], thresholds) if p < t)[1]
    assert name == top_negative and sign == "<" and float(p) < float(t)
    shown = ", ".join(f"{t:.6g}" for t in thresholds)
    assert f"thresholds: {shown} (stored with the model, youden)" in captured.err
    assert "Pleural_Thick…" not in captured.out


def test_heatmaps_have_the_input_image_size_and_place(tmp_path, binary_model, capsys):
    wide = tmp_path / "in" / "wide.png"
    wide.parent.mkdir(parents=True)
    Image.fromarray(np.full((90, 150), 128, dtype=np.uint8), mode="L").save(wide)
    ramp = (np.arange(70 * 40).reshape(70, 40) % 4096).astype(np.uint16)
    scan = write_dicom(tmp_path / "in" / "scan.dcm", ramp)
    argv = ["predict", str(binary_model), str(wide), str(scan), "--heatmaps", str(tmp_path / "hm"), "--device", "cpu"]
    assert main(argv) == 0
    capsys.readouterr()
    with Image.open(tmp_path / "hm" / "wide.png") as image:
        assert image.size == (150, 90)
        wide_overlay = np.asarray(image)
    with Image.open(tmp_path / "hm" / "scan.png") as image:
        assert image.size == (40, 70)
    # the model's squash resize saw the whole image: every pixel is tinted (no longer plain gray)
    assert (np.abs(wide_overlay.astype(int) - 128).max(axis=2) > 0).all()
