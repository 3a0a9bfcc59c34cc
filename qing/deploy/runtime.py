"""An exported ONNX model in onnxruntime, with its labels, thresholds and preprocessing from the file.

:class:`OnnxModel` is a :class:`qing.evaluate.Runner`: ``qing predict`` and ``qing eval`` run it
through the same loop as a PyTorch model::

    from qing.deploy import OnnxModel
    from qing.data import ImageFiles, collate_skip_bad
    from qing.evaluate import collect_logits

    onnx_model = OnnxModel("model.onnx")
    dataset = ImageFiles(paths, onnx_model.transform())
    loader = DataLoader(dataset, batch_size=16, collate_fn=collate_skip_bad)
    out = collect_logits(onnx_model, loader)       # out.logits (N, num_classes), as with the PyTorch model
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from qing.data import ImageTransform, build_transforms
from qing.deploy._deps import require
from qing.deploy.metadata import OnnxMetadata

__all__ = ["OnnxModel"]


class OnnxModel:
    """An ONNX file written by :func:`qing.deploy.export_onnx`, run by onnxruntime.

    Args:
        path: The ``.onnx`` file.
        providers: onnxruntime execution providers, in order of preference (default: the CPU).
        threads: Intra-op threads (default: onnxruntime's, one per physical core).
        log_severity: onnxruntime's log level for this session (0 verbose ... 3 errors, 4 fatal only).

    Attributes:
        path: The file.
        session: The ``onnxruntime.InferenceSession``.
        metadata: Its qing metadata (:class:`~qing.deploy.OnnxMetadata`): labels, task, thresholds,
            preprocessing.
        device: ``cpu``: where :meth:`__call__` expects its images (onnxruntime copies them to its device).

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is not a readable ONNX model, or has no qing metadata.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        *,
        providers: Optional[Sequence[str]] = None,
        threads: Optional[int] = None,
        log_severity: int = 3,
    ) -> None:
        ort = require("onnxruntime", "running an ONNX model")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        options = ort.SessionOptions()
        options.log_severity_level = int(log_severity)
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{self.path} is not a readable ONNX model: {first}") from err
        self.metadata = OnnxMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, where=str(self.path))
        self.device = torch.device("cpu")

    @property
    def labels(self) -> list[str]:
        """One name per output."""
        return self.metadata.labels

    @property
    def task(self) -> str:
        """``binary``, ``multilabel`` or ``multiclass``."""
        return self.metadata.task

    @property
    def image_config(self) -> dict[str, Any]:
        """Preprocessing: ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``."""
        return dict(self.metadata.image_config)

    def transform(self) -> ImageTransform:
        """The eval transform of the exported model (:func:`qing.data.build_transforms` of its image config)."""
        return build_transforms(self.image_config, train=False)

    def check_input(self, shape: Sequence[int]) -> None:
        """Raise a ``ValueError`` saying what fits when images of ``shape`` ``(B, C, H, W)`` do not."""
        channels, height, width = self.metadata.image_config["input_size"]
        if len(shape) != 4 or shape[1] != channels:
            raise ValueError(f"{self.path.name} takes (N, {channels}, H, W) float32 images, got {tuple(shape)}")
        if self.metadata.spatial != "dynamic" and tuple(shape[2:]) != (height, width):
            raise ValueError(
                f"{self.path.name} was exported for {height}x{width} inputs only (fixed spatial size), got "
                f"{shape[2]}x{shape[3]}; resize to {height}x{width} (its preprocessing does)"
            )
        multiple = self.metadata.spatial_multiple
        if self.metadata.spatial == "dynamic" and multiple and (shape[2] % multiple or shape[3] % multiple):
            raise ValueError(
                f"{self.path.name} takes sides that are multiples of {multiple}, got {shape[2]}x{shape[3]}"
            )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` preprocessed images -> float32 CPU logits ``(B, num_classes)``."""
        self.check_input(images.shape)
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([self.metadata.output_name], {self.metadata.input_name: array})
        return torch.from_numpy(logits)

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, task={self.task!r}, labels={self.labels!r})"
