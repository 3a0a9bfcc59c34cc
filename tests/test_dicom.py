"""DICOM as hospitals export it: every transfer syntax qing claims, a decoder that is not installed, and
the Presentation LUT Shape with MONOCHROME1/2 (real files written by pydicom, Pillow and tests/lossless_jpeg.py,
or bundled with pydicom)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from qing.data import DICOM_TRANSFER_SYNTAXES, ImageLoadError, check_image_header, dicom_decoder_problem, load_image
from tests.conftest import REPO_ROOT
from tests.make_fake_data import write_dicom, write_png

pydicom = pytest.importorskip("pydicom")
from pydicom import uid  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

# A smooth 12-bit "radiograph" with detail: JPEG and JPEG 2000 lossy coding stay close to it.
_Y, _X = np.mgrid[0:48, 0:40]
IMAGE_12BIT = (2048 + 1500 * np.sin(_X / 7.0) * np.cos(_Y / 9.0) + 40 * ((_X + _Y) % 5)).astype(np.uint16)


def expected_8bit(pixels: np.ndarray, bits: int) -> np.ndarray:
    """What qing makes of MONOCHROME2 pixels without LUTs: the stored-bits range onto 0..255."""
    return np.rint(pixels / (2**bits - 1) * 255).astype(np.uint8)


# ---- every claimed transfer syntax ----------------------------------------------------------------

# uid -> (pixels, bits stored, keyword arguments of write_dicom, largest difference allowed in 8-bit output)
_WRITTEN = {
    uid.ImplicitVRLittleEndian: (IMAGE_12BIT, 12, {}, 0),
    uid.ExplicitVRLittleEndian: (IMAGE_12BIT, 12, {}, 0),
    uid.DeflatedExplicitVRLittleEndian: (IMAGE_12BIT, 12, {}, 0),
    uid.RLELossless: (IMAGE_12BIT, 12, {}, 0),
    uid.JPEGBaseline8Bit: ((IMAGE_12BIT >> 4).astype(np.uint8), 8, {}, 6),
    uid.JPEGLossless: (IMAGE_12BIT, 12, {"jpeg_predictor": 6}, 0),
    uid.JPEGLosslessSV1: (IMAGE_12BIT, 12, {}, 0),
    uid.JPEGLSLossless: (IMAGE_12BIT, 12, {}, 0),
    uid.JPEGLSNearLossless: (IMAGE_12BIT, 12, {"jls_error": 3}, 1),  # 3 of 4095 is below one 8-bit step
    uid.JPEG2000Lossless: (IMAGE_12BIT, 12, {}, 0),
    uid.JPEG2000: (IMAGE_12BIT, 12, {"j2k_psnr": [60]}, 2),
}
# uid -> pydicom's bundled file (no encoder here for these)
_BUNDLED = {
    uid.ExplicitVRBigEndian: "MR_small_bigendian.dcm",
    uid.JPEGExtended12Bit: "JPGExtended.dcm",
}


def test_the_claimed_syntaxes_are_the_tested_ones():
    assert sorted(s.uid for s in DICOM_TRANSFER_SYNTAXES) == sorted(str(u) for u in [*_WRITTEN, *_BUNDLED])
    for syntax in DICOM_TRANSFER_SYNTAXES:
        assert uid.UID(syntax.uid).is_transfer_syntax, syntax


def test_the_fine_tuning_guide_lists_each_syntax_with_its_decoder():
    guide = (REPO_ROOT / "docs" / "guides" / "fine-tuning.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| [^|]+ \| `([\d.]+)` \| (\S+) \|$", guide, re.MULTILINE)}
    assert rows == {s.uid: s.decoder for s in DICOM_TRANSFER_SYNTAXES}


@pytest.mark.parametrize("transfer_syntax", list(_WRITTEN), ids=lambda u: uid.UID(u).name)
def test_written_files_decode_in_every_claimed_syntax(tmp_path, transfer_syntax):
    pixels, bits, kwargs, tolerance = _WRITTEN[transfer_syntax]
    path = write_dicom(tmp_path / "x.dcm", pixels, bits_stored=bits, transfer_syntax=transfer_syntax, **kwargs)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == transfer_syntax
    check_image_header(path)
    out = np.asarray(load_image(path, channels=1)).astype(int)
    reference = expected_8bit(pixels, bits).astype(int)
    assert out.shape == pixels.shape
    assert np.abs(out - reference).max() <= tolerance
    if tolerance == 0:  # lossless: the stored values themselves come back
        np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, pixels)


def test_jpeg_lossless_at_16_bits_with_every_predictor(tmp_path):
    """Process 14 at full 16-bit precision (differences wrap modulo 2**16) with all seven predictors."""
    pixels = (IMAGE_12BIT.astype(np.uint32) * 16 + 7).astype(np.uint16)
    pixels[0, :3] = (0, 65535, 0)
    for predictor in range(1, 8):
        path = write_dicom(
            tmp_path / f"p{predictor}.dcm",
            pixels,
            bits_stored=16,
            transfer_syntax=uid.JPEGLossless,
            jpeg_predictor=predictor,
        )
        np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, pixels)
        np.testing.assert_array_equal(np.asarray(load_image(path, channels=1)), expected_8bit(pixels, 16))


def test_bundled_big_endian_matches_its_little_endian_twin():
    big = get_testdata_file(_BUNDLED[uid.ExplicitVRBigEndian])
    little = get_testdata_file("MR_small.dcm")
    assert pydicom.dcmread(big).file_meta.TransferSyntaxUID == uid.ExplicitVRBigEndian
    np.testing.assert_array_equal(np.asarray(load_image(big, channels=1)), np.asarray(load_image(little, channels=1)))


def test_bundled_jpeg_extended_12bit_is_scaled_by_its_12_bits():
    path = get_testdata_file(_BUNDLED[uid.JPEGExtended12Bit])
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == uid.JPEGExtended12Bit and ds.BitsStored == 12
    out = np.asarray(load_image(path, channels=1))
    np.testing.assert_array_equal(out, expected_8bit(ds.pixel_array, 12))
    assert out.shape == (1024, 256) and out.max() == round(ds.pixel_array.max() / 4095 * 255) > 0


def test_bundled_jpeg_lossless_rgb_reads_as_rgb():
    path = get_testdata_file("SC_rgb_jpeg_gdcm.dcm")  # .70, as exported by GDCM
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1
    out = np.asarray(load_image(path, channels=3))
    np.testing.assert_array_equal(out, pydicom.dcmread(path).pixel_array)


# ---- a decoder that is not installed --------------------------------------------------------------

_HIDE_DECODERS = """
import importlib.abc, sys

class HideDecoders(importlib.abc.MetaPathFinder):
    # as if the qing[dicom] decoders (and gdcm/pyjpegls) were not installed
    hidden = ("pylibjpeg", "libjpeg", "openjpeg", "rle", "gdcm", "jpeg_ls")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideDecoders())
"""


def test_missing_decoder_is_one_line_naming_syntax_and_package_and_the_file_is_skipped(tmp_path):
    folder = tmp_path / "scans"
    write_dicom(folder / "lossless.dcm", IMAGE_12BIT, transfer_syntax=uid.JPEGLosslessSV1)
    write_dicom(folder / "plain.dcm", IMAGE_12BIT)
    write_png(folder / "chest.png", size=64)
    script = _HIDE_DECODERS + textwrap.dedent(
        f"""
        import logging
        import qing
        from qing.cli import main
        from qing.data import DataConfig, load_splits

        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        splits = load_splits(DataConfig(train_dir={str(tmp_path / "classes")!r}, test_fraction=0.25))
        print("bad files:", len(splits.bad_files), file=sys.stderr)
        model = qing.create_model("qing_test_tr1", num_classes=1)
        qing.save_pretrained(model, "model", label_names=["opacity"], data_config={{"input_size": (3, 64, 64)}})
        sys.exit(main(["predict", "model", {str(folder)!r}, "--device", "cpu"]))
        """
    )
    for name in ("normal", "opacity"):  # training data: one unreadable lossless file among readable ones
        for i in range(4):
            write_dicom(tmp_path / "classes" / name / f"{name}{i}.dcm", IMAGE_12BIT >> i)
    write_dicom(tmp_path / "classes" / "opacity" / "lossless.dcm", IMAGE_12BIT, transfer_syntax=uid.JPEGLossless)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    needs = "needs a decoder: pip install 'qing[dicom]' (installs pylibjpeg-libjpeg)"
    lossless_70 = "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])"
    lines = result.stderr.splitlines()
    assert (
        f"skipping unreadable image {tmp_path / 'classes' / 'opacity' / 'lossless.dcm'}: transfer syntax "
        f"JPEG Lossless, Non-Hierarchical (Process 14) (1.2.840.10008.1.2.4.57) {needs}" in lines
    )
    assert "bad files: 1" in lines
    skipped = f"qing: skipped {folder / 'lossless.dcm'}: transfer syntax {lossless_70} (1.2.840.10008.1.2.4.70)"
    assert f"{skipped} {needs}" in lines
    assert "qing: error: 1 of 3 input(s) could not be read (listed above)" in lines
    assert any(line.startswith("qing: 2 image(s) predicted") for line in lines)


def test_a_syntax_pydicom_cannot_decode_says_to_convert(tmp_path):
    path = write_dicom(tmp_path / "video.dcm", IMAGE_12BIT, transfer_syntax=uid.JPEGLosslessSV1)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML  # a video syntax: no pydicom decoder at all
    ds.save_as(path)
    message = (
        "transfer syntax MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100) cannot be decoded by pydicom; "
        "convert the file to an uncompressed transfer syntax first (e.g. gdcmconv --raw)"
    )
    assert dicom_decoder_problem(uid.MPEG2MPML) == message
    for check in (check_image_header, load_image):
        with pytest.raises(ImageLoadError, match=re.escape(f"{path}: {message}")):
            check(path)


# ---- Presentation LUT Shape with MONOCHROME1/2 ------------------------------------------------------

RAMP = np.array([[0, 1000, 2048, 3000, 4095]], dtype=np.uint16)
POSITIVE = expected_8bit(RAMP, 12)  # high values bright
NEGATIVE = 255 - POSITIVE  # low values bright


@pytest.mark.parametrize(
    ("photometric", "shape", "expected"),
    [
        ("MONOCHROME2", None, POSITIVE),
        ("MONOCHROME2", "IDENTITY", POSITIVE),
        ("MONOCHROME2", "INVERSE", NEGATIVE),  # the shape inverts
        ("MONOCHROME1", None, NEGATIVE),  # no shape: MONOCHROME1 inverts
        ("MONOCHROME1", "INVERSE", NEGATIVE),  # DX's pairing: inverted once, not twice
        ("MONOCHROME1", "IDENTITY", POSITIVE),  # a given shape decides (PS3.3 C.11.6.1; DCMTK alike)
    ],
)
def test_presentation_lut_shape_with_photometric_interpretation(tmp_path, photometric, shape, expected):
    path = write_dicom(tmp_path / "x.dcm", RAMP, photometric=photometric, presentation_lut_shape=shape)
    np.testing.assert_array_equal(np.asarray(load_image(path, channels=1)), expected)


def test_presentation_lut_shape_applies_after_the_window(tmp_path):
    path = write_dicom(tmp_path / "w.dcm", RAMP, window=(2048, 1000), presentation_lut_shape="INVERSE")
    # the window gives [[0, 0, 128, 255, 255]] (see test_data_io.test_dicom_window_applied); then inverted
    assert np.asarray(load_image(path, channels=1)).tolist() == [[255, 255, 127, 0, 0]]


def test_unknown_presentation_lut_shape_is_unreadable(tmp_path):
    path = write_dicom(tmp_path / "od.dcm", RAMP, presentation_lut_shape="LIN OD")
    with pytest.raises(ImageLoadError, match=r"unsupported Presentation LUT Shape 'LIN OD' \(expected IDENTITY"):
        load_image(path)


def test_inverse_monochrome2_predicts_like_the_inverted_png(tmp_path):
    """End to end: an INVERSE file gives the model the same pixels as the visually equivalent PNG."""
    gray = expected_8bit(IMAGE_12BIT, 12)
    inverted = write_dicom(tmp_path / "inv.dcm", 4095 - IMAGE_12BIT, presentation_lut_shape="INVERSE")
    Image.fromarray(gray, mode="L").save(tmp_path / "same.png")
    np.testing.assert_array_equal(
        np.asarray(load_image(inverted, channels=3)), np.asarray(load_image(tmp_path / "same.png", channels=3))
    )


def test_what_qing_cannot_show_is_found_by_the_header_check():
    """Multi-frame and palette files are refused before any pixel is decoded (``load_splits`` skips them)."""
    cases = {
        "SC_rgb_rle_2frame.dcm": "multi-frame DICOM (2 frames) is not supported; export one frame",
        "examples_palette.dcm": "unsupported PhotometricInterpretation 'PALETTE COLOR'",
    }
    for name, reason in cases.items():
        path = get_testdata_file(name)
        for check in (check_image_header, load_image):
            with pytest.raises(ImageLoadError, match=re.escape(f"{name}: {reason}")):
                check(path)
