"""Image files for ``qing predict`` and ``qing eval``: INPUT arguments expanded to files, and the batches
the model runs on (the loop itself is :func:`qing.evaluate.iter_logits`)."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from qing.data import collate_skip_bad, find_images, is_image_file

_GLOB_CHARS = ("*", "?", "[")


@dataclass
class Inputs:
    """Image files found from INPUT arguments, and the arguments that gave none.

    Attributes:
        files: Image files in argument order (folders walked recursively, sorted), each once.
        missing: ``(argument, reason)`` for arguments naming nothing readable.
    """

    files: list[Path] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)


def expand_inputs(arguments: Sequence[str]) -> Inputs:
    """Files, folders (recursive, image endings only) and glob patterns -> image files.

    A file named explicitly is kept whatever its ending (a DICOM file may have none); an argument
    that is neither a file, a folder nor a matching pattern is recorded in ``missing``.
    """
    inputs, seen = Inputs(), set()

    def add(path: Path) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            inputs.files.append(path)

    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_file():
            add(path)
        elif path.is_dir():
            images = find_images(path)
            if not images:
                inputs.missing.append((argument, "folder holds no image files (.png, .jpg, .dcm, ...)"))
            for image in images:
                add(image)
        elif any(c in argument for c in _GLOB_CHARS):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(argument), recursive=True))]
            images = [m for m in matches if m.is_file() and is_image_file(m)]
            for folder in (m for m in matches if m.is_dir()):
                images += find_images(folder)
            if not images:
                inputs.missing.append((argument, "no image files match this pattern"))
            for image in images:
                add(image)
        else:
            inputs.missing.append((argument, "no such file or folder"))
    return inputs


def inference_loader(dataset: Dataset, *, device: torch.device, batch_size: int, num_workers: int) -> DataLoader:
    """The batches ``qing eval`` and ``qing predict`` run the model on: in order, unreadable items handed on.

    Args:
        dataset: A :class:`qing.data.ImageFiles` or :class:`qing.data.CXRDataset`.
        device: Where the model runs (CUDA pins the batches' memory).
        batch_size: Images per forward pass.
        num_workers: DataLoader worker processes.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        pin_memory=device.type == "cuda",
    )
