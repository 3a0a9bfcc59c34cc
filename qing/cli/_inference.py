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

from qing.data import collate_skip_bad, is_dicom, is_image_file, scan_folder

_GLOB_CHARS = ("*", "?", "[")


@dataclass
class Inputs:
    """Image files found from INPUT arguments, the arguments that gave none, and the files not read.

    Attributes:
        files: Image files in argument order (folders walked recursively, sorted), each once.
        missing: ``(argument, reason)`` for arguments naming nothing readable.
        not_images: Files in the folders (or glob matches) that are not images and were not read.
    """

    files: list[Path] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)


def expand_inputs(arguments: Sequence[str]) -> Inputs:
    """Files, folders (recursive) and glob patterns -> image files.

    In folders and glob matches a file is an image by its ending or, whatever its name, by the DICOM
    ``DICM`` preamble (PACS exports often have no ``.dcm``); the other files are listed in
    ``not_images``. A file named explicitly is kept whatever it is (its read then says what is wrong);
    an argument that is neither a file, a folder nor a matching pattern is recorded in ``missing``.
    """
    inputs, seen = Inputs(), set()

    def add(path: Path) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            inputs.files.append(path)

    def add_folder(folder: Path) -> int:
        scan = scan_folder(folder)
        for image in scan.images:
            add(image)
        inputs.not_images.extend(p for p in scan.not_images if p not in inputs.not_images)
        return len(scan.images)

    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_file():
            add(path)
        elif path.is_dir():
            if not add_folder(path):
                inputs.missing.append((argument, "folder holds no image files (.png, .jpg, .dcm, DICOM, ...)"))
        elif any(c in argument for c in _GLOB_CHARS):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(argument), recursive=True))]
            found = 0
            for match in matches:
                if match.is_dir():
                    found += add_folder(match)
                elif is_image_file(match) or is_dicom(match):
                    add(match)
                    found += 1
                elif match.is_file() and match not in inputs.not_images:
                    inputs.not_images.append(match)
            if not found:
                inputs.missing.append((argument, "no image files match this pattern"))
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
