"""Image files for ``qing predict``, ``qing eval`` and ``qing app``: INPUT arguments expanded to files, the
batches the model runs on (the loop itself is :func:`qing.evaluate.iter_logits`), and the one "predict these
files" path that ``qing predict`` and ``qing app`` share, so both give the same numbers."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from qing.cli._common import LoadedModel
from qing.data import (
    BadImage,
    ImageFiles,
    ImageTransform,
    collate_skip_bad,
    is_dicom,
    is_image_file,
    scan_folder,
)
from qing.evaluate import Runner, TorchRunner, iter_logits

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


@dataclass
class PredictedBatch:
    """One batch of :func:`iter_predictions`.

    Attributes:
        indices: Positions in the file list of the readable images, ``B`` of them.
        images: Their inputs as the model saw them (after preprocessing), on its device, ``(B, C, H, W)``.
        probabilities: ``(B, num_outputs)`` float probabilities (sigmoid, or softmax for multiclass).
        bad: The batch's unreadable files, with the reason.
    """

    indices: list[int]
    images: torch.Tensor
    probabilities: np.ndarray
    bad: list[BadImage] = field(default_factory=list)


def iter_predictions(
    loaded: LoadedModel,
    files: Sequence[Path],
    *,
    runner: Optional[Runner] = None,
    device: Optional[torch.device] = None,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: Optional[bool] = False,
    transform: Optional[ImageTransform] = None,
) -> Iterator[PredictedBatch]:
    """Probabilities for image files, batch by batch: what ``qing predict`` and ``qing app`` run.

    Args:
        loaded: The model (from :func:`qing.cli._common.load_model`), on ``device``.
        files: Image files (PNG, JPEG, DICOM, ...); unreadable ones come back in :attr:`PredictedBatch.bad`.
        runner: What runs the batches (``qing.cli._runtime.build_runner``: PyTorch with its fast paths, or
            onnxruntime); default: ``loaded.model`` on ``device``, or the ONNX file's runner.
        device: Where the model runs when no ``runner`` is given (default: where its weights are).
        batch_size: Images per forward pass.
        num_workers: Image-reading worker processes.
        progress: Progress bar on stderr (``None``: only on a terminal).
        transform: The evaluation transform (default: ``loaded.transform()``).

    The probabilities are calibrated with ``loaded.temperatures`` (:meth:`LoadedModel.probabilities`);
    test-time augmentation is a runner's (``build_runner`` with ``--tta``).
    """
    if runner is None:
        runner = loaded.onnx if loaded.model is None else TorchRunner(loaded.model, device=device)
    transform = transform or loaded.transform()
    dataset = ImageFiles(files, transform)
    loader = inference_loader(dataset, device=runner.device, batch_size=batch_size, num_workers=num_workers)
    for batch in iter_logits(runner, loader, progress=progress, desc="predict"):
        if batch.indices:
            probs = loaded.probabilities(batch.logits.numpy())
        else:
            probs = np.zeros((0, len(loaded.labels)))
        yield PredictedBatch(batch.indices, batch.images, probs, batch.bad)
