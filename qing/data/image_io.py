"""Reading chest X-ray files into 8-bit PIL images: PNG/JPEG/any PIL format and DICOM.

Every reader ends in the same place: an ``"L"`` (``channels=1``) or ``"RGB"`` (``channels=3``)
image with values 0..255, so the transforms downstream never see a file format.

* 16-bit grayscale (``I;16`` PNG/TIFF) is scaled by its full range, ``value * 255 / 65535``
  (Pillow's own ``convert("L")`` would clip everything above 255 to white).
* Alpha (``RGBA``, ``LA``, palette images with transparency) is composited onto black:
  a transparent pixel carries no signal.
* DICOM (needs ``pydicom``, the ``qing[dicom]`` extra): modality LUT (rescale slope and
  intercept), then the VOI LUT or window center/width, scaled by the output range the DICOM
  standard defines for it; ``MONOCHROME1`` (bright = air) is inverted so bones are bright.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DICOM_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "check_image_header",
    "find_images",
    "is_dicom",
    "is_image_file",
    "load_image",
]

PathLike = Union[str, os.PathLike]

#: File name endings read as DICOM (files with the ``DICM`` preamble are DICOM whatever their name).
DICOM_EXTENSIONS = (".dcm", ".dicom")
#: File name endings treated as images: every format Pillow registers, plus DICOM.
IMAGE_EXTENSIONS = tuple(sorted(set(Image.registered_extensions()) | set(DICOM_EXTENSIONS)))

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageLoadError(OSError):
    """A file that cannot be read as an image (zero bytes, truncated, not an image, unsupported).

    Attributes:
        path: The file.
        reason: What went wrong, in words.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def is_image_file(path: PathLike) -> bool:
    """Whether ``path`` has an image file name ending (see ``IMAGE_EXTENSIONS``); hidden files are not."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(folder: PathLike) -> list[Path]:
    """Image files under ``folder``: recursive, sorted, symlinks followed, hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(f))
    return found


def is_dicom(path: PathLike) -> bool:
    """Whether ``path`` is a DICOM file: a ``.dcm``/``.dicom`` name or the ``DICM`` magic at byte 128."""
    if str(path).lower().endswith(DICOM_EXTENSIONS):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _import_pydicom() -> Any:
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover - the test environment has pydicom
        raise ImportError("reading DICOM files needs pydicom: pip install 'qing[dicom]'") from e
    return pydicom


def check_image_header(path: PathLike) -> None:
    """Cheap pre-flight check: the file exists, is not empty and its header parses.

    Decodes no pixels, so truncated pixel data is only found by ``load_image``.

    Raises:
        FileNotFoundError: The file does not exist.
        ImageLoadError: Zero bytes or an unreadable header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageLoadError(path, "the file is empty (0 bytes)")
    if is_dicom(path):
        pydicom = _import_pydicom()
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as e:
            raise ImageLoadError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from e
        if "Rows" not in ds:
            raise ImageLoadError(path, "DICOM file without an image (no Rows)")
        return
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - parsing the header is the check
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageLoadError(path, f"not a readable image ({type(e).__name__}: {e})") from e


def load_image(path: PathLike, *, channels: int = 3) -> Image.Image:
    """Read an image file as an 8-bit ``"L"`` (1 channel) or ``"RGB"`` (3 channels) PIL image.

    Args:
        path: PNG, JPEG, TIFF, BMP, ... (anything Pillow reads) or DICOM.
        channels: 1 for grayscale models (``in_chans=1``), 3 to replicate gray into RGB.

    Returns:
        The decoded image, ``mode == "L"`` or ``"RGB"``, EXIF orientation applied.

    Raises:
        ImageLoadError: The file is empty, truncated, not an image, or in an unsupported mode.
        FileNotFoundError: The file does not exist.

    Example:
        >>> img = load_image("chest.dcm", channels=1)  # doctest: +SKIP
        >>> img.mode, img.size
        ('L', (2048, 2500))
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageLoadError(path, "the file is empty (0 bytes)")
    img = _read_dicom(path) if is_dicom(path) else _read_pil(path)
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _read_pil(path: Path) -> Image.Image:
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: truncated data raises here, not inside a transform
            img = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e
    return _to_8bit(img, path)


def _to_8bit(img: Image.Image, path: Path) -> Image.Image:
    """Any Pillow mode -> ``"L"`` or ``"RGB"`` (alpha composited onto black, 16-bit rescaled)."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageLoadError(path, f"{mode} pixel values outside 0..65535 (min {arr.min()}, max {arr.max()})")
        return Image.fromarray(np.rint(arr * (255.0 / 65535.0)).astype(np.uint8), mode="L")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        base = "L" if mode in ("LA", "La") else "RGB"
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert(base)
    if mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("L" if mode == "1" else "RGB")
    raise ImageLoadError(path, f"unsupported image mode {mode!r}; convert it to 8/16-bit grayscale or RGB")


def _read_dicom(path: Path) -> Image.Image:
    pydicom = _import_pydicom()
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageLoadError(path, f"DICOM pixel data unreadable ({type(e).__name__}: {e})") from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageLoadError(path, f"multi-frame DICOM ({frames} frames) is not supported; export one frame")
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"):
        if pixels.dtype != np.uint8:
            raise ImageLoadError(path, f"colour DICOM with {pixels.dtype} samples is not supported")
        return Image.fromarray(pixels, mode="RGB")  # pydicom converts YBR to RGB
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageLoadError(path, f"unsupported PhotometricInterpretation {photometric!r}")

    values = apply_modality_lut(pixels, ds)
    low, high = _modality_range(ds)
    if ds.get("VOILUTSequence"):
        values = apply_voi_lut(values, ds)
        low, high = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        values = apply_voi_lut(values, ds)  # windowing maps onto the modality output range
    scaled = np.clip((np.asarray(values, dtype=np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return Image.fromarray(np.rint(scaled * 255.0).astype(np.uint8), mode="L")


def _modality_range(ds: Any) -> tuple[float, float]:
    """The value range after the modality LUT: stored bits range, through rescale slope/intercept."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    if int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = sorted((low * float(slope) + float(intercept), high * float(slope) + float(intercept)))
    return low, high
