"""Reading image files: 16-bit, alpha, palette, grayscale/RGB, DICOM (real files written with pydicom)."""

import numpy as np
import pytest
from PIL import Image

from qing.data import ImageLoadError, check_image_header, is_dicom, load_image
from tests.make_fake_data import write_dicom, write_png, write_truncated_png

pydicom = pytest.importorskip("pydicom")


def test_8bit_gray_to_three_channels_and_back(tmp_path):
    path = write_png(tmp_path / "gray.png", seed=3)
    original = np.asarray(Image.open(path))
    rgb = load_image(path, channels=3)
    assert rgb.mode == "RGB"
    arr = np.asarray(rgb)
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], original)
    gray = load_image(path, channels=1)
    assert gray.mode == "L"
    np.testing.assert_array_equal(np.asarray(gray), original)


def test_16bit_png_scaled_by_full_range(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    out = np.asarray(load_image(path, channels=1))
    # 257 -> 1, 32768 * 255 / 65535 = 127.5019 -> 128; Pillow's convert("L") would clip both to 255
    np.testing.assert_array_equal(out, [[0, 1, 128, 255]])


def test_rgba_composited_onto_black(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)  # opaque: kept
    rgba[0, 1] = (200, 100, 50, 0)  # transparent: no signal
    rgba[1, 0] = (200, 100, 50, 128)  # half: scaled by 128/255
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    out = np.asarray(load_image(path, channels=3)).astype(int)
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[0, 1].tolist() == [0, 0, 0]
    np.testing.assert_allclose(out[1, 0], np.array([200, 100, 50]) * 128 / 255, atol=1)


def test_palette_with_and_without_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.putpixel((1, 0), 1)
    plain = tmp_path / "palette.png"
    img.save(plain)
    assert np.asarray(load_image(plain, channels=3))[0, 0].tolist() == [10, 20, 30]
    assert np.asarray(load_image(plain, channels=1))[0, 0] == round(0.299 * 10 + 0.587 * 20 + 0.114 * 30)
    transparent = tmp_path / "palette_t.png"
    img.save(transparent, transparency=1)
    assert Image.open(transparent).info.get("transparency") == 1
    assert np.asarray(load_image(transparent, channels=3))[0, 0].tolist() == [0, 0, 0]


def test_unreadable_files_raise_image_load_error(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png: the file is empty \(0 bytes\)"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match="the file is empty"):
        check_image_header(empty)

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageLoadError, match=r"cannot read image .*notes\.png: not a readable image"):
        check_image_header(text)

    truncated = write_truncated_png(tmp_path / "cut.png")
    check_image_header(truncated)  # the header is fine ...
    with pytest.raises(ImageLoadError, match=r"cut\.png"):  # ... the pixels are not
        load_image(truncated)

    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image(tmp_path / "missing.png")


# ---- DICOM ------------------------------------------------------------------------------------

RAMP = np.array([[0, 1000, 2048, 3000, 4095]], dtype=np.uint16)  # 12 bits stored


def test_dicom_monochrome2_scaled_by_bits_stored(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", RAMP)
    assert is_dicom(path)
    out = np.asarray(load_image(path, channels=1))
    np.testing.assert_array_equal(out, np.rint(RAMP / 4095 * 255).astype(np.uint8))
    assert load_image(path, channels=3).mode == "RGB"


def test_dicom_detected_by_magic_without_extension(tmp_path):
    path = write_dicom(tmp_path / "IMG0001", RAMP)
    assert is_dicom(path)
    np.testing.assert_array_equal(np.asarray(load_image(path, channels=1)), np.rint(RAMP / 4095 * 255))


def test_dicom_monochrome1_inverted(tmp_path):
    path = write_dicom(tmp_path / "m1.dcm", RAMP, photometric="MONOCHROME1")
    out = np.asarray(load_image(path, channels=1))
    np.testing.assert_array_equal(out, np.rint((1 - RAMP / 4095) * 255).astype(np.uint8))
    assert out[0, 0] == 255 and out[0, -1] == 0  # air (0 in MONOCHROME1 = white) becomes black


def test_dicom_window_applied(tmp_path):
    path = write_dicom(tmp_path / "w.dcm", RAMP, window=(2048, 1000))
    out = np.asarray(load_image(path, channels=1))
    # DICOM LINEAR window: c' = 2047.5, w' = 999; 1000 <= c' - w'/2 -> 0; 3000 > c' + w'/2 -> max;
    # 2048 -> ((2048 - 2047.5) / 999 + 0.5) * 255 = 127.63 -> 128
    assert out.tolist() == [[0, 0, 128, 255, 255]]


def test_dicom_voi_lut_sequence_applied(tmp_path):
    lut = list(range(4095, -1, -1))  # inverting 12-bit LUT
    path = write_dicom(tmp_path / "lut.dcm", RAMP, voi_lut=([4096, 0, 12], lut))
    out = np.asarray(load_image(path, channels=1))
    np.testing.assert_array_equal(out, np.rint((4095 - RAMP) / 4095 * 255).astype(np.uint8))


def test_dicom_rescale_keeps_relative_scale(tmp_path):
    plain = np.asarray(load_image(write_dicom(tmp_path / "p.dcm", RAMP), channels=1))
    rescaled = np.asarray(load_image(write_dicom(tmp_path / "r.dcm", RAMP, rescale=(2.0, -1024.0)), channels=1))
    np.testing.assert_array_equal(plain, rescaled)


def test_dicom_16_bits_stored(tmp_path):
    pixels = np.array([[0, 65535, 32768]], dtype=np.uint16)
    out = np.asarray(load_image(write_dicom(tmp_path / "s.dcm", pixels, bits_stored=16), channels=1))
    assert out.tolist() == [[0, 255, 128]]


def test_broken_dicom_is_an_image_load_error(tmp_path):
    path = write_dicom(tmp_path / "broken.dcm", RAMP)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageLoadError, match=r"broken\.dcm"):
        load_image(path)
