"""Running a model over image files in batches: input expansion, an unlabelled image dataset, the batch loop."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from qing.data import (
    BadImage,
    ImageLoadError,
    ImageTransform,
    collate_skip_bad,
    find_images,
    is_image_file,
    load_image,
)

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


class ImageFiles(Dataset):
    """Unlabelled images for inference: items ``{"image": (C, H, W), "index": int}`` or a :class:`BadImage`."""

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


@dataclass
class Batch:
    """One batch of model outputs.

    Attributes:
        indices: Dataset indices of the readable images ``(B,)``.
        images: Their normalized inputs on the model's device ``(B, C, H, W)``.
        logits: float32 CPU logits ``(B, num_classes)``.
        bad: Items that could not be read.
    """

    indices: list[int]
    images: torch.Tensor
    logits: torch.Tensor
    bad: list[BadImage]


def run_batches(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool | None = None,
    desc: str = "images",
) -> Iterator[Batch]:
    """Run ``model`` over ``dataset`` in order; unreadable items are passed on, never stop the loop.

    Args:
        model: In eval mode on ``device``.
        dataset: Items as :class:`ImageFiles` / ``qing.data.CXRDataset`` give them.
        device: The model's device.
        batch_size: Images per forward pass.
        num_workers: DataLoader worker processes.
        progress: Progress bar on stderr; ``None`` shows it only on a terminal.
        desc: Progress bar label.
    """
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        pin_memory=device.type == "cuda",
    )
    with tqdm(total=len(dataset), desc=desc, unit="img", disable=None if progress is None else not progress) as bar:
        for batch in loader:
            bad = list(batch["bad"])
            if batch["image"] is None:
                bar.update(len(bad))
                yield Batch([], torch.zeros(0), torch.zeros(0), bad)
                continue
            images = batch["image"].to(device, non_blocking=True)
            with torch.no_grad():
                logits = model(images).float().cpu()
            bar.update(len(images) + len(bad))
            yield Batch(batch["index"].tolist(), images, logits, bad)
