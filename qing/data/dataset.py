"""The image datasets (labelled samples + transform, with an optional in-memory cache; unlabelled files
for inference) and bad-file accounting.

An image that fails to decode (truncated, corrupt) does not stop an epoch: ``__getitem__`` returns
a :class:`BadImage` marker, :func:`collate_skip_bad` drops it from the batch and hands its path
on, and the trainer records it once in a :class:`BadFileLog` (logged and listed in the report).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from qing.data.image_io import ImageLoadError, load_image
from qing.data.samples import Sample
from qing.data.transforms import ImageTransform

__all__ = ["TASKS", "BadFileLog", "BadImage", "CXRDataset", "ImageFiles", "collate_skip_bad", "encode_targets"]

_log = logging.getLogger("qing.data")

#: Target encodings: binary -> float ``(1,)``, multilabel -> float ``(C,)``, multiclass -> long scalar.
TASKS = ("binary", "multilabel", "multiclass")


@dataclass(frozen=True)
class BadImage:
    """Marker returned by :class:`CXRDataset` and :class:`ImageFiles` for an image that could not be read."""

    index: int
    path: str
    reason: str


class BadFileLog:
    """Unreadable images, each recorded and logged once, in the order found."""

    def __init__(self) -> None:
        self._files: dict[str, str] = {}

    def add(self, path: str, reason: str, *, log: bool = True) -> bool:
        """Record ``path``; returns ``True`` (and logs a warning if ``log``) the first time it is seen."""
        path = str(path)
        if path in self._files:
            return False
        self._files[path] = reason
        if log:
            _log.warning("skipping unreadable image %s: %s", path, reason)
        return True

    def update(self, entries: Sequence[dict[str, str]]) -> None:
        """Merge ``[{"path": ..., "reason": ...}, ...]`` (from :meth:`to_list`; already logged where found)."""
        for entry in entries:
            self.add(entry["path"], entry["reason"], log=False)

    def to_list(self) -> list[dict[str, str]]:
        """JSON-able ``[{"path": ..., "reason": ...}]``."""
        return [{"path": p, "reason": r} for p, r in self._files.items()]

    def __contains__(self, path: object) -> bool:
        return str(path) in self._files

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)


def encode_targets(samples: Sequence[Sample], task: str) -> torch.Tensor:
    """Targets of ``samples`` as one tensor.

    Returns:
        binary: float ``(N, 1)``; multilabel: float ``(N, C)``; multiclass: long ``(N,)``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    values = [s.target for s in samples]
    if task == "multiclass":
        return torch.tensor(values, dtype=torch.long)
    if task == "binary":
        return torch.tensor(values, dtype=torch.float32).reshape(-1, 1)
    return torch.tensor(values, dtype=torch.float32).reshape(len(values), -1)


class CXRDataset(Dataset):
    """Labelled chest X-rays read from files.

    Items are dicts ``{"image": (C, H, W) float, "target": see encode_targets, "index": int}``
    or a :class:`BadImage` when the file cannot be decoded.

    Args:
        samples: The labelled images.
        task: ``"binary"``, ``"multilabel"`` or ``"multiclass"`` (sets the target encoding).
        transform: From :func:`qing.data.build_transforms`; its channel count sets how images are read.
        cache: Keep decoded, resized images (``transform.prepare`` output) in memory as uint8
            arrays, so only the first read of each image decodes it. Filled lazily, or all at once
            by :meth:`preload` (needed before forking DataLoader workers, which cannot fill it).
    """

    def __init__(self, samples: Sequence[Sample], *, task: str, transform: ImageTransform, cache: bool = False):
        self.samples = list(samples)
        self.task = task
        self.targets = encode_targets(self.samples, task)
        self.transform = transform
        self.cache = cache
        self._cached: list[Optional[np.ndarray]] = [None] * len(self.samples) if cache else []

    def __len__(self) -> int:
        return len(self.samples)

    def _prepared(self, index: int) -> Image.Image:
        if self.cache and self._cached[index] is not None:
            return Image.fromarray(self._cached[index])
        img = self.transform.prepare(load_image(self.samples[index].path, channels=self.transform.channels))
        if self.cache:
            self._cached[index] = np.asarray(img)
        return img

    def __getitem__(self, index: int) -> Union[dict[str, Any], BadImage]:
        try:
            img = self._prepared(index)
        except ImageLoadError as e:
            return BadImage(index, e.path, e.reason)
        return {"image": self.transform.finish(img), "target": self.targets[index], "index": index}

    def preload(self, *, num_threads: int = 4) -> list[BadImage]:
        """Decode and cache every image now (threads; Pillow releases the GIL while decoding).

        Returns:
            The images that could not be read (they stay uncached and keep failing in ``__getitem__``).
        """
        if not self.cache:
            raise RuntimeError("preload() needs a dataset created with cache=True")

        def load(index: int) -> Optional[BadImage]:
            try:
                self._prepared(index)
            except ImageLoadError as e:
                return BadImage(index, e.path, e.reason)
            return None

        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            bad = [b for b in pool.map(load, range(len(self))) if b is not None]
        _log.info("cached %d images in memory (%.1f MB)", len(self) - len(bad), self.cache_bytes / 2**20)
        return bad

    def drop(self, indices: Sequence[int]) -> None:
        """Remove the samples at ``indices`` (e.g. unreadable ones found by :meth:`preload`)."""
        dropped = set(indices)
        keep = [i for i in range(len(self)) if i not in dropped]
        self.samples = [self.samples[i] for i in keep]
        self.targets = self.targets[keep]
        if self.cache:
            self._cached = [self._cached[i] for i in keep]

    @property
    def cache_bytes(self) -> int:
        """Memory held by the cache."""
        return sum(a.nbytes for a in self._cached if a is not None)


class ImageFiles(Dataset):
    """Unlabelled image files for inference (``qing predict``).

    Items are dicts ``{"image": (C, H, W) float, "index": int}`` or a :class:`BadImage` when the file
    cannot be read: undecodable, vanished since it was listed, a DICOM without pydicom, odd pixel data.

    Args:
        paths: The image files.
        transform: From :func:`qing.data.build_transforms`; its channel count sets how images are read.
    """

    def __init__(self, paths: Sequence[Path], transform: ImageTransform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Union[dict[str, Any], BadImage]:
        path = self.paths[index]
        try:
            image = load_image(path, channels=self.transform.channels)
            return {"image": self.transform(image), "index": index}
        except ImageLoadError as err:
            return BadImage(index, str(path), err.reason)
        except (OSError, ImportError, ValueError) as err:  # vanished file, pydicom missing, odd pixel data
            return BadImage(index, str(path), str(err).splitlines()[0] if str(err) else type(err).__name__)


def collate_skip_bad(items: Sequence[Union[dict[str, Any], BadImage]]) -> dict[str, Any]:
    """``default_collate`` over the readable items; unreadable ones go to ``batch["bad"]``.

    Returns:
        ``{"image": (B, C, H, W), "target": (B, ...), "index": (B,), "bad": [BadImage, ...]}``;
        ``image``/``target``/``index`` are ``None`` when no item was readable.
    """
    good = [item for item in items if not isinstance(item, BadImage)]
    bad = [item for item in items if isinstance(item, BadImage)]
    batch = default_collate(good) if good else {"image": None, "target": None, "index": None}
    batch["bad"] = bad
    return batch
