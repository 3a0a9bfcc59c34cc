"""A small JPEG Lossless (ITU-T T.81 process 14) encoder for the DICOM tests.

pydicom can encode RLE, JPEG-LS and JPEG 2000 but not lossless JPEG, the compression PACS exports of
chest radiographs use most (transfer syntaxes 1.2.840.10008.1.2.4.57 and .70). This writes one
grayscale frame: SOI, SOF3, one Huffman table, SOS with the chosen predictor, the coded
differences, EOI. Written from the standard's Annex H; no restart intervals, no point transform.
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["encode_jpeg_lossless"]

_CATEGORIES = 17  # difference categories SSSS = 0..16
_CODE_LENGTH = 5  # every category gets a 5-bit code: canonical code of category k is k itself


def _predictions(x: np.ndarray, predictor: int, precision: int) -> np.ndarray:
    """Prediction of each sample (T.81 table H.1), with the first-line and first-column rules of H.1.2.1."""
    ra = np.zeros_like(x)
    ra[:, 1:] = x[:, :-1]
    rb = np.zeros_like(x)
    rb[1:, :] = x[:-1, :]
    rc = np.zeros_like(x)
    rc[1:, 1:] = x[:-1, :-1]
    formulas = {
        1: lambda: ra,
        2: lambda: rb,
        3: lambda: rc,
        4: lambda: ra + rb - rc,
        5: lambda: ra + ((rb - rc) >> 1),
        6: lambda: rb + ((ra - rc) >> 1),
        7: lambda: (ra + rb) >> 1,
    }
    pred = formulas[predictor]().copy()
    pred[0, 1:] = ra[0, 1:]  # first line: the sample to the left
    pred[1:, 0] = rb[1:, 0]  # first column: the sample above
    pred[0, 0] = 1 << (precision - 1)
    return pred


def _entropy_coded(differences: np.ndarray) -> bytes:
    out = bytearray()
    acc, nbits = 0, 0

    def put(value: int, length: int) -> None:
        nonlocal acc, nbits
        acc = (acc << length) | (value & ((1 << length) - 1))
        nbits += length
        while nbits >= 8:
            nbits -= 8
            byte = (acc >> nbits) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0x00)  # byte stuffing
            acc &= (1 << nbits) - 1

    for d in differences.ravel().tolist():
        category = abs(d).bit_length()
        put(category, _CODE_LENGTH)
        if 0 < category < 16:  # category 16 (difference 32768) has no extra bits
            put(d if d > 0 else d - 1, category)
    if nbits:
        pad = 8 - nbits
        put((1 << pad) - 1, pad)  # pad the last byte with 1-bits
    return bytes(out)


def encode_jpeg_lossless(pixels: np.ndarray, *, precision: int, predictor: int = 1) -> bytes:
    """One grayscale frame as a lossless JPEG codestream.

    Args:
        pixels: ``(H, W)`` unsigned integers below ``2**precision``.
        precision: Sample precision in bits, 2..16 (the DICOM Bits Stored).
        predictor: Selection value 1..7 (DICOM's ``.70`` transfer syntax requires 1).

    Returns:
        The codestream, to be encapsulated in DICOM Pixel Data.
    """
    if not 2 <= precision <= 16 or not 1 <= predictor <= 7:
        raise ValueError(f"precision must be 2..16 and predictor 1..7, got {precision} and {predictor}")
    x = np.asarray(pixels).astype(np.int64)
    if x.ndim != 2 or x.min() < 0 or x.max() >= 1 << precision:
        raise ValueError(f"pixels must be (H, W) in [0, {(1 << precision) - 1}]")
    height, width = x.shape
    differences = (x - _predictions(x, predictor, precision)) % 65536  # modulo 2**16 (H.1.2.1)
    differences = np.where(differences > 32768, differences - 65536, differences)

    bits = [0] * 16
    bits[_CODE_LENGTH - 1] = _CATEGORIES
    soi, eoi = b"\xff\xd8", b"\xff\xd9"
    sof3 = b"\xff\xc3" + struct.pack(">HBHHB", 11, precision, height, width, 1) + bytes([1, 0x11, 0])
    dht = b"\xff\xc4" + struct.pack(">HB", 2 + 1 + 16 + _CATEGORIES, 0x00) + bytes(bits) + bytes(range(_CATEGORIES))
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + bytes([1, 0x00, predictor, 0, 0])
    return soi + sof3 + dht + sos + _entropy_coded(differences) + eoi
