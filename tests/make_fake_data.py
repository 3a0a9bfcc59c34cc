"""Tiny fake datasets and image files for the data and trainer tests (written into tmp_path).

Run as a script to look at them: ``python tests/make_fake_data.py /tmp/fake``.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from qing.data import make_synthetic_cxr, synthetic_cxr_image
from tests.lossless_jpeg import encode_jpeg_lossless


def write_png(path: Path, *, size: int = 48, seed: int = 0, mode: str = "L") -> Path:
    """A random 8-bit image."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def write_truncated_png(path: Path, *, size: int = 48, seed: int = 0) -> Path:
    """A PNG whose header parses but whose pixel data stops halfway."""
    write_png(path, size=size, seed=seed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_class_folders(
    root: Path,
    counts: dict[str, int],
    *,
    size: int = 48,
    seed: int = 0,
    patients_per_image: int = 1,
) -> list[Path]:
    """``root/<class>/synthetic_p<id>_<k>.png`` drawn by the synthetic generator (opacity for the 2nd class)."""
    rng = np.random.default_rng(seed)
    paths = []
    patient = 0
    for label, (name, n) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            if i % patients_per_image == 0:
                patient += 1
            path = folder / f"synthetic_p{seed:02d}{patient:04d}_{i % patients_per_image}.png"
            synthetic_cxr_image(rng, size=size, opacity=label > 0).save(path)
            paths.append(path)
    return paths


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    window: Optional[tuple[float, float]] = None,
    voi_lut: Optional[tuple[Sequence[int], Sequence[int]]] = None,
    rescale: Optional[tuple[float, float]] = None,
    presentation_lut_shape: Optional[str] = None,
    transfer_syntax: Optional[str] = None,
    jpeg_predictor: int = 1,
    **compress_kwargs: Any,
) -> Path:
    """A real single-frame grayscale DICOM file written with pydicom.

    Args:
        pixels: ``(H, W)`` unsigned integers within ``bits_stored`` bits (8 bits or fewer are stored in
            8-bit samples, more in 16-bit ones).
        window: ``(center, width)``.
        voi_lut: ``(descriptor, data)`` of a VOI LUT Sequence item.
        rescale: ``(slope, intercept)``.
        presentation_lut_shape: ``"IDENTITY"`` or ``"INVERSE"`` (Presentation LUT Shape, 2050,0020).
        transfer_syntax: UID to write in (default Explicit VR Little Endian). Implicit and deflated
            are written by pydicom; JPEG Lossless (``.57``/``.70``) by ``tests.lossless_jpeg``; JPEG
            Baseline by Pillow (8-bit pixels); RLE, JPEG-LS and JPEG 2000 by ``Dataset.compress``
            (``compress_kwargs`` go there, e.g. ``jls_error=2``).
        jpeg_predictor: Selection value for JPEG Lossless ``.57``.
    """
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate

    transfer_syntax = uid.UID(transfer_syntax or uid.ExplicitVRLittleEndian)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("u1" if bits_stored <= 8 else "<u2").tobytes()
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if presentation_lut_shape is not None:
        ds.PresentationLUTShape = presentation_lut_shape
    if voi_lut is not None:
        item = Dataset()
        item.add_new(0x00283002, "US", list(voi_lut[0]))  # LUTDescriptor (VR ambiguous: US/SS)
        item.add_new(0x00283006, "US", list(voi_lut[1]))  # LUTData (VR ambiguous: US/OW)
        ds.VOILUTSequence = [item]

    if transfer_syntax in (uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGBaseline8Bit):
        if transfer_syntax == uid.JPEGBaseline8Bit:
            buffer = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="JPEG", quality=95)
            frame = buffer.getvalue()
        else:
            predictor = 1 if transfer_syntax == uid.JPEGLosslessSV1 else jpeg_predictor
            frame = encode_jpeg_lossless(pixels, precision=bits_stored, predictor=predictor)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    elif transfer_syntax.is_compressed:
        ds.compress(transfer_syntax, **compress_kwargs)
    else:  # implicit, explicit, deflated: pydicom encodes the data set as the file meta says
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def synthetic_dataset(root: Path, **kwargs) -> Path:
    """The package's synthetic two-class dataset (train/test class folders)."""
    return make_synthetic_cxr(root, **kwargs)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fake_data")
    write_class_folders(out / "train", {"normal": 8, "opacity": 8}, patients_per_image=2)
    write_class_folders(out / "test", {"normal": 3, "opacity": 3}, seed=1)
    write_dicom(out / "dicom" / "ramp.dcm", (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16))
    print(f"wrote {out}")
