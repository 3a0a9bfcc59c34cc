"""Reading chest X-ray files into 8-bit PIL images: PNG/JPEG/any PIL format and DICOM.

Every reader ends in the same place: an ``"L"`` (``channels=1``) or ``"RGB"`` (``channels=3``)
image with values 0..255, so the transforms downstream never see a file format.

* 16-bit grayscale (``I;16`` PNG/TIFF) is scaled by its full range, ``value * 255 / 65535``
  (Pillow's own ``convert("L")`` would clip everything above 255 to white).
* Alpha (``RGBA``, ``LA``, palette images with transparency) is composited onto black:
  a transparent pixel carries no signal.
* DICOM (the ``qing[dicom]`` extra: pydicom and the decoders in ``DICOM_TRANSFER_SYNTAXES``):
  modality LUT (rescale slope and intercept), then the VOI LUT or window center/width, scaled by
  the output range the DICOM standard defines for it, then the Presentation LUT Shape: ``INVERSE``
  inverts, ``IDENTITY`` does not, and without a shape ``MONOCHROME1`` (bright = air) is inverted,
  so bones are bright.

Anything that goes wrong while decoding is an :class:`ImageLoadError` naming the file: truncated or
corrupt data, a decompression bomb (more pixels than twice ``PIL.Image.MAX_IMAGE_PIXELS``, for
DICOM ``Rows x Columns x frames`` too), a DICOM transfer syntax without an installed decoder, or
malformed DICOM LUTs (a Window Width of 0, a VOI LUT item without data).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DICOM_EXTENSIONS",
    "DICOM_TRANSFER_SYNTAXES",
    "IMAGE_EXTENSIONS",
    "DicomTransferSyntax",
    "FolderScan",
    "ImageLoadError",
    "check_image_header",
    "dicom_decoder_problem",
    "find_images",
    "is_dicom",
    "is_image_file",
    "load_image",
    "scan_folder",
]

PathLike = Union[str, os.PathLike]

_log = logging.getLogger("qing.data")

#: File name endings read as DICOM (files with the ``DICM`` preamble are DICOM whatever their name).
DICOM_EXTENSIONS = (".dcm", ".dicom")
#: File name endings treated as images: every format Pillow registers, plus DICOM.
IMAGE_EXTENSIONS = tuple(sorted(set(Image.registered_extensions()) | set(DICOM_EXTENSIONS)))


class DicomTransferSyntax(NamedTuple):
    """A DICOM transfer syntax qing reads, and the package that decodes its pixel data."""

    uid: str
    name: str
    decoder: str


#: The DICOM transfer syntaxes qing reads (each tested on real files): the uncompressed ones and RLE
#: through pydicom itself, JPEG Baseline through Pillow, the rest through the ``qing[dicom]`` extra's
#: pylibjpeg plugins (``python-gdcm``, if installed, is used by pydicom as well).
DICOM_TRANSFER_SYNTAXES = (
    DicomTransferSyntax("1.2.840.10008.1.2", "Implicit VR Little Endian", "pydicom"),
    DicomTransferSyntax("1.2.840.10008.1.2.1", "Explicit VR Little Endian", "pydicom"),
    DicomTransferSyntax("1.2.840.10008.1.2.1.99", "Deflated Explicit VR Little Endian", "pydicom"),
    DicomTransferSyntax("1.2.840.10008.1.2.2", "Explicit VR Big Endian", "pydicom"),
    DicomTransferSyntax("1.2.840.10008.1.2.5", "RLE Lossless", "pydicom"),
    DicomTransferSyntax("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)", "Pillow"),
    DicomTransferSyntax("1.2.840.10008.1.2.4.51", "JPEG Extended (Process 2 and 4)", "pylibjpeg-libjpeg"),
    DicomTransferSyntax("1.2.840.10008.1.2.4.57", "JPEG Lossless (Process 14)", "pylibjpeg-libjpeg"),
    DicomTransferSyntax(
        "1.2.840.10008.1.2.4.70", "JPEG Lossless, First-Order Prediction (Process 14, SV1)", "pylibjpeg-libjpeg"
    ),
    DicomTransferSyntax("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless", "pylibjpeg-libjpeg"),
    DicomTransferSyntax("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless", "pylibjpeg-libjpeg"),
    DicomTransferSyntax("1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless", "pylibjpeg-openjpeg"),
    DicomTransferSyntax("1.2.840.10008.1.2.4.91", "JPEG 2000", "pylibjpeg-openjpeg"),
)

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


@dataclass
class FolderScan:
    """What :func:`scan_folder` found under a folder.

    Attributes:
        images: Image files (by name ending, or DICOM by the ``DICM`` preamble whatever the name), sorted.
        not_images: Other files (hidden ones are not listed): neither read nor counted as images.
        loops: Folders not walked because they lead back to a folder already walked (a symbolic link
            such as ``class_a/up -> ..``, which would put the other classes' images into ``class_a``).
    """

    images: list[Path] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)
    loops: list[Path] = field(default_factory=list)


def scan_folder(folder: PathLike) -> FolderScan:
    """Walk ``folder`` for images: recursive, sorted, symlinks followed without loops, hidden entries skipped.

    A file without an image ending is an image when it is DICOM (the ``DICM`` preamble at byte 128,
    as PACS exports without ``.dcm``). A symlinked folder is followed unless it resolves to a folder
    already walked or to one that contains the current folder; each such link is logged and listed.
    """
    scan = FolderScan()
    visited = {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = os.path.realpath(dirpath)
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            target = os.path.realpath(os.path.join(dirpath, name))
            if target in visited or os.path.commonpath([target, here]) == target:
                link = Path(dirpath) / name
                if link.is_symlink():
                    _log.warning("not following %s -> %s: it leads back to a folder already walked", link, target)
                else:
                    _log.warning("skipping %s: already walked through a symbolic link to it", link)
                scan.loops.append(link)
                continue
            visited.add(target)
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(f for f in filenames if not f.startswith(".")):
            path = Path(dirpath) / name
            (scan.images if is_image_file(name) or _has_dicom_preamble(path) else scan.not_images).append(path)
    return scan


def find_images(folder: PathLike) -> list[Path]:
    """Image files under ``folder`` (see :func:`scan_folder`): recursive, sorted, DICOM without an ending too."""
    return scan_folder(folder).images


def is_dicom(path: PathLike) -> bool:
    """Whether ``path`` is a DICOM file: a ``.dcm``/``.dicom`` name or the ``DICM`` magic at byte 128."""
    return str(path).lower().endswith(DICOM_EXTENSIONS) or _has_dicom_preamble(path)


def _has_dicom_preamble(path: PathLike) -> bool:
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
            raise ImageLoadError(path, f"not a readable DICOM file ({_brief(e)})") from e
        _check_dicom_header(ds, path)
        return
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - parsing the header is the check
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, _bomb_reason(e)) from e
    except Exception as e:  # Pillow's plugins raise many types for odd headers
        raise ImageLoadError(path, f"not a readable image ({_brief(e)})") from e


def _bomb_reason(error: Exception) -> str:
    return f"image too large: {error} Raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"


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
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, _bomb_reason(e)) from e
    except Exception as e:  # any decode failure (Pillow's plugins raise many types) is an unreadable image
        raise ImageLoadError(path, _brief(e)) from e
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
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageLoadError(path, f"not a readable DICOM file ({_brief(e)})") from e
    _check_dicom_header(ds, path)
    try:
        return _dicom_to_8bit(ds, path)
    except ImageLoadError:
        raise
    except Exception as e:  # any failure past the header (codec, LUTs, odd values) makes the image unreadable
        raise ImageLoadError(path, f"DICOM pixel data unreadable ({_brief(e)})") from e


def _brief(error: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` on one line (pydicom's multi-line decoder reports joined), for the bad-file list."""
    text = "; ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    text = text.replace(":;", ":")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


_DICOM_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")


def _check_dicom_header(ds: Any, path: Path) -> None:
    """One gray or colour frame, not a decompression bomb, in a transfer syntax with a decoder installed."""
    try:
        problem = _dicom_header_problem(ds)
    except Exception as e:  # a malformed header element (Rows "abc", ...)
        problem = f"malformed DICOM header ({_brief(e)})"
    if problem is not None:
        raise ImageLoadError(path, problem)


def _dicom_header_problem(ds: Any) -> Optional[str]:
    if "Rows" not in ds or "Columns" not in ds:
        return "DICOM file without an image (no Rows/Columns)"
    frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    pixels = int(ds.Rows or 0) * int(ds.Columns or 0) * max(frames, 1)
    limit = _pixel_limit()
    if limit is not None and pixels > limit:
        return (
            f"image too large: {ds.Rows} x {ds.Columns} pixels" + (f" x {frames} frames" if frames > 1 else "")
            + f" exceeds the decompression-bomb limit of {limit:,} pixels (2 x PIL.Image.MAX_IMAGE_PIXELS); "
            "raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
        )  # fmt: skip
    if frames > 1:
        return f"multi-frame DICOM ({frames} frames) is not supported; export one frame"
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2", *_DICOM_COLOUR):
        return f"unsupported PhotometricInterpretation {photometric!r}"
    transfer_syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    return dicom_decoder_problem(transfer_syntax) if transfer_syntax is not None else None


def _int_or_none(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _pixel_limit() -> Optional[int]:
    """Pillow's decompression-bomb error threshold (``None`` when the user switched the guard off)."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def dicom_decoder_problem(transfer_syntax: str) -> Optional[str]:
    """Why pixel data in ``transfer_syntax`` cannot be decoded here, in one line, or ``None`` if it can.

    Asks pydicom which of its decoder plugins are installed; the message names the syntax and what to
    install (the ``qing[dicom]`` extra's package for the syntaxes in ``DICOM_TRANSFER_SYNTAXES``).

    Example:
        >>> dicom_decoder_problem("1.2.840.10008.1.2.1") is None  # Explicit VR Little Endian: always readable
        True
    """
    from pydicom.pixels import get_decoder  # pydicom is optional: imported where DICOM is read
    from pydicom.uid import UID

    uid = UID(str(transfer_syntax))
    label = f"{uid.name} ({uid})" if uid.name != str(uid) else str(uid)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return (
            f"transfer syntax {label} cannot be decoded by pydicom; convert the file to an uncompressed "
            "transfer syntax first (e.g. gdcmconv --raw)"
        )
    if decoder.is_available:
        return None
    known = next((s for s in DICOM_TRANSFER_SYNTAXES if s.uid == str(uid)), None)
    if known is not None:
        return f"transfer syntax {label} needs a decoder: pip install 'qing[dicom]' (installs {known.decoder})"
    return f"transfer syntax {label} needs a decoder: install one of {'; '.join(decoder.missing_dependencies)}"


def _dicom_to_8bit(ds: Any, path: Path) -> Image.Image:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut  # pydicom is optional: imported where used

    pixels = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()  # checked by the header check
    if photometric in _DICOM_COLOUR:
        if pixels.dtype != np.uint8:
            raise ImageLoadError(path, f"colour DICOM with {pixels.dtype} samples is not supported")
        return Image.fromarray(pixels, mode="RGB")  # pydicom converts YBR to RGB
    invert = _presentation_inverts(ds, photometric, path)

    values = apply_modality_lut(pixels, ds)
    low, high = _modality_range(ds)
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        if item.get("LUTDescriptor") is None or item.get("LUTData") is None:
            raise ImageLoadError(path, "VOI LUT Sequence item without LUT Descriptor or LUT Data")
        values = apply_voi_lut(values, ds)
        low, high = 0.0, float(2 ** int(item.LUTDescriptor[2]) - 1)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        values = apply_voi_lut(values, ds)  # windowing maps onto the modality output range
    scaled = np.clip((np.asarray(values, dtype=np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    if not np.isfinite(scaled).all():
        raise ImageLoadError(path, "DICOM pixel values are not finite after the modality and VOI LUTs")
    if invert:
        scaled = 1.0 - scaled
    return Image.fromarray(np.rint(scaled * 255.0).astype(np.uint8), mode="L")


def _presentation_inverts(ds: Any, photometric: str, path: Path) -> bool:
    """Whether low values are shown bright: the Presentation LUT Shape when present, else MONOCHROME1.

    DICOM PS3.3 (C.11.6.1, and the DX Image module C.8.11.7) defines the VOI LUT output as P-values
    (bright = high) after the Presentation LUT Shape: ``IDENTITY`` keeps them, ``INVERSE`` inverts them,
    and the shape already accounts for the Photometric Interpretation (DX: ``INVERSE`` with
    ``MONOCHROME1``). So a given shape decides on its own; without one, ``MONOCHROME1`` inverts.
    """
    shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
    if not shape:
        return photometric == "MONOCHROME1"
    if shape not in ("IDENTITY", "INVERSE"):
        raise ImageLoadError(path, f"unsupported Presentation LUT Shape {shape!r} (expected IDENTITY or INVERSE)")
    return shape == "INVERSE"


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
