"""Running a model over a DataLoader: the device to run on, and the logits of every readable image.

One loop serves the trainer (validation and test predictions), ``qing eval`` and ``qing predict``::

    from qing.evaluate import collect_logits, resolve_device

    device = resolve_device("auto")
    model = model.to(device)
    out = collect_logits(model, loader, device=device)   # out.logits (N, C), out.indices (N,), out.bad

The loop runs a :class:`Runner`: anything with a ``device`` that maps a batch of images to logits.
A plain ``nn.Module`` is wrapped in a :class:`TorchRunner`, which also holds the fast PyTorch
paths (autocast, channels_last, ``torch.compile``); :class:`qing.deploy.OnnxModel` runs an exported
model in onnxruntime through the same loop::

    runner = TorchRunner(model, amp_dtype=torch.bfloat16, channels_last=True)
    out = collect_logits(runner, loader)

The loader yields batches as :func:`qing.data.collate_skip_bad` makes them (``image``, ``index``,
``bad``): unreadable images are handed on in :attr:`Batch.bad`, never stop the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Union, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from qing.data import BadImage

__all__ = [
    "Batch",
    "CUDAUnavailableError",
    "LoaderLogits",
    "Runner",
    "TorchRunner",
    "autocast",
    "collect_logits",
    "iter_logits",
    "resolve_device",
]


class CUDAUnavailableError(RuntimeError):
    """A CUDA device was asked for on a machine where CUDA is not available."""


def resolve_device(name: str = "auto", *, local_rank: Optional[int] = None) -> torch.device:
    """The device a name stands for, checked against this machine.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``
            (any ``torch.device`` string).
        local_rank: The GPU for a CUDA name without an index (``"auto"``, ``"cuda"``), e.g. a
            ``torchrun`` process's ``LOCAL_RANK``; ``None`` leaves the index unset (the current GPU).

    Returns:
        The ``torch.device``.

    Raises:
        ValueError: ``name`` is not a device.
        CUDAUnavailableError: ``name`` asks for CUDA and CUDA is not available here.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"{name!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CUDAUnavailableError(f"{name!r} asks for CUDA, which is not available here; use 'cpu'")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
    return device


@dataclass
class Batch:
    """One batch of model outputs.

    Attributes:
        indices: Dataset indices of the readable images, ``B`` of them.
        images: Their inputs as the model saw them, on its device, ``(B, C, H, W)``
            (``torch.zeros(0)`` when no image of the batch was readable).
        logits: float32 CPU logits ``(B, num_classes)`` (``torch.zeros(0)`` when ``B == 0``).
        bad: The batch's unreadable items.
    """

    indices: list[int]
    images: torch.Tensor
    logits: torch.Tensor
    bad: list[BadImage] = field(default_factory=list)


@dataclass
class LoaderLogits:
    """The logits of every readable image of a loader, in loader order.

    Attributes:
        indices: Dataset indices ``(N,)`` int64.
        logits: float32 CPU logits ``(N, num_classes)`` (``(0, 0)`` when nothing was readable).
        bad: The unreadable items, in the order met.
    """

    indices: torch.Tensor
    logits: torch.Tensor
    bad: list[BadImage] = field(default_factory=list)


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type with ``dtype``; a no-op context when ``dtype`` is ``None``.

    Args:
        device: Where the model runs.
        dtype: The autocast dtype (``torch.bfloat16``, ``torch.float16``), or ``None`` for none.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@runtime_checkable
class Runner(Protocol):
    """What the inference loop runs: a batch of preprocessed images in, logits out.

    A :class:`TorchRunner` (any ``nn.Module``) or a :class:`qing.deploy.OnnxModel` (onnxruntime).

    Attributes:
        device: Where the images must be (the loop moves each batch there).
    """

    device: torch.device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` float images on :attr:`device` -> ``(B, num_classes)`` logits (any device and dtype)."""
        ...


def _compile_mode(device: torch.device, compile: Union[bool, str]) -> Optional[str]:
    """``torch.compile``'s mode: ``reduce-overhead`` (CUDA graphs) on CUDA, the default elsewhere."""
    if compile is True:
        return "reduce-overhead" if device.type == "cuda" else None
    return str(compile)


class TorchRunner:
    """A PyTorch model as a :class:`Runner`, with the fast paths of timm's ``inference.py``.

    The model is put in eval mode and runs without gradients. ``channels_last`` converts the
    model's weights in place and each batch on the way in; ``compile`` wraps the model in
    ``torch.compile`` (the first batches of each shape pay for the compilation).

    Args:
        model: The model, on ``device``.
        device: Where it runs (default: the device of its first parameter, else the CPU).
        amp_dtype: Run under ``torch.autocast`` with this dtype (``torch.bfloat16``, ``torch.float16``).
        channels_last: Weights and inputs in ``torch.channels_last`` memory format.
        compile: ``torch.compile`` the model: ``False``; ``True`` for ``mode="reduce-overhead"`` (CUDA
            graphs) on CUDA and the default mode elsewhere; or a mode name (``"max-autotune"``, ...).
        compile_options: More ``torch.compile`` keyword arguments (``backend``, ``dynamic``, ...).

    Example:
        >>> import qing, torch
        >>> model = qing.create_model("qing_test_tr1", num_classes=2)
        >>> runner = TorchRunner(model, amp_dtype=torch.bfloat16, channels_last=True)
        >>> runner(torch.randn(4, 3, 64, 64)).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: Optional[torch.device] = None,
        amp_dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
        compile: Union[bool, str] = False,
        compile_options: Optional[Mapping[str, Any]] = None,
    ) -> None:
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.model = model.eval()
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.compile_mode = _compile_mode(self.device, compile) if compile else None
        options = dict(compile_options or {})
        self._forward = torch.compile(model, mode=self.compile_mode, **options) if compile else model

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` on :attr:`device` -> ``(B, num_classes)`` logits (the autocast dtype under AMP)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # grad mode and autocast are thread state: set around the forward only, never across a yield
        with torch.no_grad(), autocast(self.device, self.amp_dtype):
            return self._forward(images)


def _n_items(loader: Iterable[Any]) -> Optional[int]:
    sampler = getattr(loader, "sampler", None)
    return len(sampler) if hasattr(sampler, "__len__") else None


def iter_logits(
    model: Union[nn.Module, Runner],
    loader: Iterable[Mapping[str, Any]],
    *,
    device: Optional[torch.device] = None,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    progress: Optional[bool] = False,
    desc: str = "images",
) -> Iterator[Batch]:
    """Run a model over ``loader``, one :class:`Batch` per loader batch, in loader order.

    A model runs in eval mode without gradients (its mode is restored when the loop ends);
    a batch whose images were all unreadable yields a :class:`Batch` with no indices and its ``bad``.

    Args:
        model: An ``nn.Module`` on ``device`` (run through a :class:`TorchRunner` with the options
            below), or a :class:`Runner` (a :class:`TorchRunner`, a :class:`qing.deploy.OnnxModel`)
            that carries its own options.
        loader: Batches ``{"image": (B, C, H, W) or None, "index": (B,), "bad": [BadImage, ...]}`` as
            :func:`qing.data.collate_skip_bad` makes them (a DataLoader over
            :class:`~qing.data.CXRDataset` or :class:`~qing.data.ImageFiles`).
        device: Where the images go (default: the device of the model's first parameter).
        amp_dtype: Run under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``); ``None``: as is.
        channels_last: Model and images in ``torch.channels_last`` memory format.
        progress: Progress bar (images) on stderr; ``None`` shows it only on a terminal.
        desc: The progress bar's label.

    Yields:
        :class:`Batch` es with float32 CPU logits ``(B, num_classes)``.

    Raises:
        ValueError: A :class:`Runner` with ``amp_dtype``, ``channels_last`` or another ``device``.
    """
    module = model if isinstance(model, nn.Module) else None
    if module is not None:
        was_training = module.training
        runner: Runner = TorchRunner(module, device=device, amp_dtype=amp_dtype, channels_last=channels_last)
    else:
        if amp_dtype is not None or channels_last:
            raise ValueError("amp_dtype and channels_last are options of the runner (TorchRunner), not of the loop")
        if device is not None and torch.device(device) != model.device:
            raise ValueError(f"device={device} but the runner runs on {model.device}")
        runner = model
    disable = None if progress is None else not progress
    try:
        with tqdm(total=_n_items(loader), desc=desc, unit="img", disable=disable) as bar:
            for batch in loader:
                bad = list(batch["bad"])
                if batch["image"] is None:
                    bar.update(len(bad))
                    yield Batch([], torch.zeros(0), torch.zeros(0), bad)
                    continue
                images = batch["image"].to(runner.device, non_blocking=True)
                logits = runner(images)
                bar.update(len(images) + len(bad))
                yield Batch(batch["index"].tolist(), images, logits.float().cpu(), bad)
    finally:
        if module is not None:
            module.train(was_training)


def collect_logits(
    model: Union[nn.Module, Runner], loader: Iterable[Mapping[str, Any]], **options: Any
) -> LoaderLogits:
    """All logits of :func:`iter_logits`, concatenated; unreadable items are left out and listed.

    Args:
        model: The model or :class:`Runner`.
        loader: As for :func:`iter_logits`.
        **options: The keyword arguments of :func:`iter_logits` (``device``, ``amp_dtype``,
            ``channels_last``, ``progress``, ``desc``).

    Returns:
        :class:`LoaderLogits`: ``indices (N,)``, float32 CPU ``logits (N, num_classes)``, ``bad``.
    """
    indices: list[int] = []
    logits: list[torch.Tensor] = []
    bad: list[BadImage] = []
    for batch in iter_logits(model, loader, **options):
        bad += batch.bad
        if batch.indices:
            indices += batch.indices
            logits.append(batch.logits)
    return LoaderLogits(
        torch.tensor(indices, dtype=torch.long), torch.cat(logits) if logits else torch.zeros(0, 0), bad
    )
