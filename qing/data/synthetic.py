"""A seeded, clearly labelled SYNTHETIC chest-X-ray-like dataset for demos and tests.

The images are drawings, not radiographs: a bright body outline, two dark lung fields with faint
rib stripes and a heart shadow. Class ``opacity`` adds one to three bright blurred patches inside
the lungs (as pneumonia opacities look); class ``normal`` has none. Every image carries the word
SYNTHETIC, the files are named ``synthetic_p<patient>_<k>.png``, and a README in the folder says
what they are. Several images share a patient (same anatomy, different noise and pose), so
patient-grouped splitting has something to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["PATIENT_REGEX_SYNTHETIC", "SYNTHETIC_CLASSES", "make_synthetic_cxr", "synthetic_cxr_image"]

#: Class folder names: index 0 is the negative class.
SYNTHETIC_CLASSES = ("normal", "opacity")
#: Patient id in the synthetic file names: ``synthetic_p0007_1.png`` -> ``p0007``.
PATIENT_REGEX_SYNTHETIC = r"^synthetic_(?P<patient>p\d+)_"

_README = """SYNTHETIC DATA - NOT REAL CHEST X-RAYS

These images were drawn by qing.data.make_synthetic_cxr (seed {seed}) for demos and tests.
They are not medical images and must not be used to judge a model's clinical performance.
Classes: normal (no patches), opacity (bright patches in the lung fields).
Layout: train/<class>/*.png, test/<class>/*.png; file names synthetic_p<patient>_<k>.png.
"""


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1.0


def synthetic_cxr_image(
    rng: np.random.Generator, *, size: int = 128, opacity: bool, anatomy: np.ndarray | None = None
) -> Image.Image:
    """Draw one synthetic chest image.

    Args:
        rng: Random generator (noise, pose, patches).
        size: Side in pixels.
        opacity: Add bright patches inside the lungs.
        anatomy: 6 patient parameters (lung offsets/sizes, heart size); drawn from ``rng`` if ``None``.

    Returns:
        A ``"L"`` image ``size x size``.
    """
    a = anatomy if anatomy is not None else rng.uniform(-1, 1, size=6)
    lin = np.linspace(-1, 1, size)
    xx, yy = np.meshgrid(lin, lin)
    angle = rng.uniform(-0.06, 0.06)  # slight pose change per image
    xx, yy = xx * np.cos(angle) - yy * np.sin(angle), xx * np.sin(angle) + yy * np.cos(angle)
    img = np.full((size, size), 0.05)
    img[_ellipse(xx, yy, 0.0, 0.08, 0.86 + 0.04 * a[0], 0.98)] = 0.55
    lungs = np.zeros_like(img, dtype=bool)
    for side in (-1, 1):
        lungs |= _ellipse(xx, yy, side * (0.36 + 0.03 * a[1]), -0.05 + 0.03 * a[2], 0.24 + 0.02 * a[3], 0.52)
    img[lungs] = 0.18
    img[lungs] += 0.07 * (np.sin(yy[lungs] * 26 + np.abs(xx[lungs]) * 6) > 0.55)  # ribs
    img[_ellipse(xx, yy, 0.1, 0.28, 0.2 + 0.03 * a[4], 0.18 + 0.02 * a[5])] = 0.62  # heart
    if opacity:
        ys, xs = np.nonzero(lungs)
        for _ in range(rng.integers(1, 4)):
            k = rng.integers(len(ys))
            cy, cx = lin[ys[k]], lin[xs[k]]
            sigma = rng.uniform(0.07, 0.14)
            img += rng.uniform(0.25, 0.4) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)) * lungs
    img += rng.normal(0.0, 0.02, img.shape)
    pil = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8), mode="L")
    pil = pil.filter(ImageFilter.GaussianBlur(radius=size / 128))
    ImageDraw.Draw(pil).text((2, size - 12), "SYNTHETIC", fill=200)
    return pil


def make_synthetic_cxr(
    root: Union[str, os.PathLike],
    *,
    train_patients_per_class: int = 20,
    test_patients_per_class: int = 5,
    images_per_patient: int = 2,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a synthetic two-class dataset in the original folder layout.

    Creates ``root/train/{normal,opacity}/`` and ``root/test/{normal,opacity}/`` PNGs and
    ``root/README.txt``. The same arguments always give the same files.

    Args:
        root: Output folder (created; existing files with the same names are overwritten).
        train_patients_per_class: Patients per class in train.
        test_patients_per_class: Patients per class in test.
        images_per_patient: Images per patient (same anatomy, new noise and pose).
        size: Image side in pixels.
        seed: Random seed.

    Returns:
        ``root`` as a ``Path``.

    Example:
        >>> root = make_synthetic_cxr("demo_data", train_patients_per_class=4)  # doctest: +SKIP
        >>> sorted(p.name for p in (root / "train").iterdir())
        ['normal', 'opacity']
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    patient = 0
    for split, n_patients in (("train", train_patients_per_class), ("test", test_patients_per_class)):
        for label, name in enumerate(SYNTHETIC_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(n_patients):
                anatomy = rng.uniform(-1, 1, size=6)
                for k in range(images_per_patient):
                    image = synthetic_cxr_image(rng, size=size, opacity=bool(label), anatomy=anatomy)
                    image.save(folder / f"synthetic_p{patient:04d}_{k}.png")
                patient += 1
    (root / "README.txt").write_text(_README.format(seed=seed))
    return root
