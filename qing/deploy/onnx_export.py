"""Export a qing (or any timm) model to ONNX, checked against PyTorch, with its labels and preprocessing.

::

    import qing
    from qing.deploy import export_onnx

    model = qing.create_model("local-dir:runs/pneumonia/checkpoints/best", pretrained=True)
    report = export_onnx(model, "pneumonia.onnx", images=["chest.png"])
    report.max_abs_diff          # {"random (3 images)": 2e-07, "images (2 + 1 synthetic)": 1e-07, ...}

The graph has one input ``image`` ``(N, C, H, W)`` float32 and one output ``logits``
``(N, num_classes)``; the batch dimension is dynamic, and so are height and width where the model
allows it (checked: the qing hybrids with fixed sin-cos positions and the DenseNets do; a learned
position table does not, so such a model is exported for its input size). The file's
``metadata_props`` say how to preprocess and decide (see :mod:`qing.deploy.metadata`).

**Exporter.** ``exporter="torchscript"`` (the default) traces the model with
``torch.onnx.export(..., dynamo=False)``. On torch 2.14 it exports ``qing_densenet121_tr2`` in about a
tenth of the time of the ``torch.export``-based exporter (38 s against 400 s on a loaded 2-core CPU;
4 s against 55 s for the tiny test model) with the same parity (maximum difference ~1e-7), which is what
keeps ``--runtime onnx`` (export on the fly) usable. ``exporter="dynamo"`` uses the newer exporter
(opset 18 or later); both are checked the same way.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from timm.utils import unwrap_model
from torch import nn

from qing._io import atomic_path
from qing.data import build_transforms, find_images, load_image, resolve_image_config
from qing.data.synthetic import synthetic_cxr_image
from qing.deploy._deps import require
from qing.deploy.metadata import describe_preprocessing
from qing.deploy.runtime import OnnxModel
from qing.meta import get_meta, model_labels, model_task
from qing.version import __version__

__all__ = ["DEFAULT_OPSET", "EXPORTERS", "OnnxExport", "OnnxExportError", "OnnxParityError", "export_onnx"]

_logger = logging.getLogger(__name__)

#: The exporters of :func:`export_onnx` and the opset each uses by default (17: LayerNormalization is
#: one operator; onnxruntime >= 1.11, TensorRT and OpenVINO read it; the dynamo exporter needs >= 18).
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
EXPORTERS = tuple(DEFAULT_OPSET)
INPUT_NAME, OUTPUT_NAME = "image", "logits"
_SPATIAL = ("auto", "dynamic", "fixed")


class OnnxParityError(ValueError):
    """The exported graph's logits differ from PyTorch's by more than the tolerance; no file was written."""


class OnnxExportError(RuntimeError):
    """``torch.onnx.export`` cannot convert the model (an operator without an ONNX form); no file was written."""


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote and how it was checked.

    Attributes:
        path: The ``.onnx`` file.
        exporter: ``torchscript`` or ``dynamo``.
        opset: The ONNX opset.
        spatial: ``dynamic`` (any side that is a multiple of ``spatial_multiple``) or ``fixed``.
        spatial_multiple: The input side multiple a dynamic graph needs.
        max_abs_diff: Largest ``|onnx - torch|`` logit difference per check (random inputs, images,
            another input size when dynamic).
        images: The real image files the parity check ran on.
        skipped_images: ``(path, reason)`` of image files that could not be read.
        metadata: The ``metadata_props`` written (decoded).
    """

    path: Path
    exporter: str
    opset: int
    spatial: str
    spatial_multiple: Optional[int]
    max_abs_diff: dict[str, float]
    images: list[str] = field(default_factory=list)
    skipped_images: list[tuple[str, str]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    images: Iterable[Union[str, os.PathLike]] = (),
    opset: Optional[int] = None,
    exporter: str = "torchscript",
    spatial: str = "auto",
    atol: float = 1e-4,
    source: Optional[str] = None,
    overwrite: bool = False,
) -> OnnxExport:
    """Export ``model`` to an ONNX file whose logits match PyTorch's, with labels and preprocessing in its metadata.

    The graph is written to a temporary file beside ``path`` and checked in onnxruntime against the
    PyTorch model (float32, CPU): random inputs at a batch size other than the traced one, two
    synthetic chest images and ``images`` through the model's own preprocessing, and for a dynamic
    graph random inputs at another size. Only when every maximum absolute difference is ``<= atol``
    is the file renamed to ``path``; otherwise nothing is left behind.

    Args:
        model: A timm/qing model (its ``pretrained_cfg`` gives the preprocessing, ``qing_meta`` the
            task and thresholds); DDP/compiled wrappers are unwrapped. It is not changed.
        path: The ``.onnx`` file to write.
        images: Image files or folders (PNG, JPEG, DICOM) for the parity check.
        opset: ONNX opset (default: :data:`DEFAULT_OPSET` of the exporter).
        exporter: ``"torchscript"`` (default, see the module notes) or ``"dynamo"``.
        spatial: ``"auto"`` (dynamic height and width where the check passes at another size, else
            fixed), ``"dynamic"`` (an error where it does not pass) or ``"fixed"``.
        atol: Largest accepted absolute logit difference.
        source: What the model was loaded from, recorded in the metadata (e.g. ``"hf-hub:me/cxr"``).
        overwrite: Replace an existing ``path``.

    Returns:
        An :class:`OnnxExport` with the check's differences.

    Raises:
        OnnxParityError: The exported graph disagrees with PyTorch by more than ``atol``.
        OnnxExportError: The exporter cannot convert the model (the message names the operator).
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        ValueError: A bad argument, or ``images`` of which none could be read.
        ImportError: ``onnx`` or ``onnxruntime`` is missing (``pip install 'qing[onnx]'``).
    """
    onnx = require("onnx", "ONNX export")
    require("onnxruntime", "the ONNX parity check")
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"ONNX files end in .onnx, got {path}")
    if path.is_dir() or (path.exists() and not overwrite):
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) or choose another name")
    if exporter not in DEFAULT_OPSET:
        raise ValueError(f"exporter={exporter!r}; use one of {EXPORTERS}")
    if spatial not in _SPATIAL:
        raise ValueError(f"spatial={spatial!r}; use one of {_SPATIAL}")
    opset = int(opset or DEFAULT_OPSET[exporter])
    if exporter == "dynamo" and opset < 18:
        raise ValueError(f"the dynamo exporter writes opset 18 or later, got opset={opset}")

    model = unwrap_model(model)
    if not isinstance(getattr(model, "pretrained_cfg", None), dict) or not hasattr(model, "num_classes"):
        raise TypeError(f"expected a timm/qing model (from qing.create_model), got {type(model).__name__}")
    image_config = resolve_image_config(model)
    work = _float32_cpu(model)
    checks, skipped, used_images = _check_inputs(model, image_config, images)
    expected = {name: _torch_logits(work, x) for name, x in checks.items()}
    other = _other_size_input(work, image_config)

    multiple = _spatial_multiple(model)
    plans = {"auto": [True, False], "dynamic": [True], "fixed": [False]}[spatial]
    with atomic_path(path) as tmp:
        for dynamic in plans:
            _export_graph(work, tmp, exporter=exporter, opset=opset, sample=checks["random"][:2], dynamic=dynamic)
            metadata = _metadata(
                model,
                image_config,
                source=source,
                exporter=exporter,
                opset=opset,
                spatial="dynamic" if dynamic else "fixed",
                multiple=multiple if dynamic else None,
            )
            proto = onnx.load(str(tmp))
            onnx.helper.set_model_props(proto, {key: json.dumps(value) for key, value in metadata.items()})
            proto.doc_string = f"{metadata['architecture']} exported by qing {__version__}: {metadata['preprocessing']}"
            onnx.save(proto, str(tmp))
            runtime = OnnxModel(tmp, log_severity=4)  # a failing shape check is expected, not an error
            diffs = {name: _max_abs_diff(runtime, checks[name], expected[name]) for name in checks}
            if not dynamic:
                break
            reason = _dynamic_failure(runtime, other, diffs, atol)
            if reason is None:
                break
            if spatial == "dynamic":
                raise OnnxParityError(f"{metadata['architecture']} cannot be exported with dynamic height and width: "
                                      f"{reason}; use spatial='fixed'")  # fmt: skip
            _logger.info("exporting %s for a fixed input size: %s", metadata["architecture"], reason)
        worst = max(diffs.values())
        if not worst <= atol:  # NaN fails too
            table = ", ".join(f"{name}: {value:.3g}" for name, value in diffs.items())
            raise OnnxParityError(
                f"the ONNX graph of {metadata['architecture']} differs from PyTorch by up to {worst:.3g} in the logits "
                f"(tolerance {atol:g}; {table}); no file was written. Try another opset or exporter"
            )
    return OnnxExport(
        path=path,
        exporter=exporter,
        opset=opset,
        spatial=metadata["spatial"],
        spatial_multiple=metadata["spatial_multiple"],
        max_abs_diff=diffs,
        images=used_images,
        skipped_images=skipped,
        metadata=metadata,
    )


def _float32_cpu(model: nn.Module) -> nn.Module:
    """An eval-mode float32 CPU model with ``model``'s weights (a copy unless ``model`` already is one)."""
    tensors = [*model.parameters(), *model.buffers()]
    plain = all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors)
    if plain and not model.training:
        return model
    return copy.deepcopy(model).cpu().float().eval()


def _spatial_multiple(model: nn.Module) -> int:
    stride = getattr(model, "feat_stride", None)
    if not stride:
        info = getattr(model, "feature_info", None)
        stride = info[-1].get("reduction") if isinstance(info, list) and info else None
    return int(stride or 32)


def _check_inputs(
    model: nn.Module, image_config: Mapping[str, Any], images: Iterable[Union[str, os.PathLike]]
) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]], list[str]]:
    """The parity inputs: random images (batch 3), synthetic and given images through the preprocessing."""
    channels, height, width = image_config["input_size"]
    generator = torch.Generator().manual_seed(0)
    checks = {"random": torch.randn(3, channels, height, width, generator=generator)}  # the export traces 2
    transform = build_transforms(dict(image_config), train=False)
    rng = np.random.default_rng(0)
    pictures = [synthetic_cxr_image(rng, size=max(height, width), opacity=flag) for flag in (False, True)]
    files: list[Path] = []
    for item in images:
        item = Path(item)
        files += find_images(item) if item.is_dir() else [item]
    skipped, used = [], []
    for file in files:
        try:
            pictures.append(load_image(file, channels=channels))
            used.append(str(file))
        except (OSError, ValueError, ImportError) as err:
            skipped.append((str(file), str(err).splitlines()[0] if str(err) else type(err).__name__))
            _logger.info("parity check: skipped %s (%s)", file, skipped[-1][1])
    if files and not used:
        raise ValueError(f"none of the {len(files)} image file(s) given for the parity check could be read")
    pictures = [p.convert("L" if channels == 1 else "RGB") for p in pictures]
    checks[f"images ({len(used)} + 2 synthetic)"] = torch.stack([transform(p) for p in pictures])
    return checks, skipped, used


def _other_size_input(model: nn.Module, image_config: Mapping[str, Any]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(input, logits)`` at another height and width, or ``None`` when PyTorch itself refuses that size."""
    channels, height, width = image_config["input_size"]
    step = _spatial_multiple(model)
    x = torch.randn(1, channels, height + step, width + 2 * step, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            return x, model(x).float()
    except Exception as err:  # a fixed-size model asserts or fails on a shape: export it for its size
        _logger.info("the model does not run at %dx%d (%s): fixed input size", x.shape[2], x.shape[3], err)
        return None


def _dynamic_failure(
    runtime: OnnxModel, other: Optional[tuple[torch.Tensor, torch.Tensor]], diffs: dict[str, float], atol: float
) -> Optional[str]:
    """Why a dynamic-size graph is not usable (``None``: it is); records the other-size check in ``diffs``."""
    if other is None:
        return "the PyTorch model does not run at another input size"
    x, expected = other
    name = f"another size ({x.shape[2]}x{x.shape[3]})"
    try:
        diffs[name] = _max_abs_diff(runtime, x, expected)
    except Exception as err:  # onnxruntime rejects the shape: a size was traced into the graph
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        return f"onnxruntime fails at {x.shape[2]}x{x.shape[3]} ({first})"
    if not diffs[name] <= atol:
        value = diffs.pop(name)
        return f"its logits at {x.shape[2]}x{x.shape[3]} differ from PyTorch by {value:.3g}"
    return None


_CHUNK = 16  # images per forward pass of the check


def _torch_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(part).float() for part in x.split(_CHUNK)])


def _max_abs_diff(runtime: OnnxModel, x: torch.Tensor, expected: torch.Tensor) -> float:
    got = torch.cat([runtime(part) for part in x.split(_CHUNK)])
    if got.shape != expected.shape:
        raise ValueError(f"ONNX logits have shape {tuple(got.shape)}, PyTorch's {tuple(expected.shape)}")
    return float((got - expected).abs().max())


def _export_graph(
    model: nn.Module, path: Path, *, exporter: str, opset: int, sample: torch.Tensor, dynamic: bool
) -> None:
    """Write the graph of ``model`` (input ``image``, output ``logits``, dynamic batch) to ``path``."""
    try:
        _run_exporter(model, path, exporter=exporter, opset=opset, sample=sample, dynamic=dynamic)
    except torch.onnx.errors.OnnxExporterError as err:
        other = "dynamo" if exporter == "torchscript" else "torchscript"
        raise OnnxExportError(
            f"torch.onnx.export ({exporter} exporter, opset {opset}) cannot convert {type(model).__name__}: {err}; "
            f"try exporter={other!r} (--exporter {other}) or another opset"
        ) from err


def _run_exporter(
    model: nn.Module, path: Path, *, exporter: str, opset: int, sample: torch.Tensor, dynamic: bool
) -> None:
    if exporter == "dynamo":
        dim = torch.export.Dim.DYNAMIC
        shapes = ({0: dim, 2: dim, 3: dim} if dynamic else {0: dim},)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (sample,),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=shapes,
                external_data=False,
                verbose=False,
            )
        return
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    with warnings.catch_warnings():  # the tracer's notes on Python-level shape checks, and its deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )


def _metadata(
    model: nn.Module,
    image_config: Mapping[str, Any],
    *,
    source: Optional[str],
    exporter: str,
    opset: int,
    spatial: str,
    multiple: Optional[int],
) -> dict[str, Any]:
    meta = get_meta(model)
    labels = model_labels(model)
    task = model_task(model)
    thresholds = None
    if task != "multiclass":
        stored = meta.thresholds if meta.thresholds is not None and len(meta.thresholds) == len(labels) else None
        thresholds = list(stored) if stored is not None else None
    architecture = str(model.pretrained_cfg.get("architecture") or type(model).__name__)
    return {
        "architecture": architecture,
        "source": source or architecture,
        "qing_version": __version__,
        "exporter": exporter,
        "opset": opset,
        "task": task,
        "labels": labels,
        "activation": "softmax" if task == "multiclass" else "sigmoid",
        "temperatures": list(meta.temperatures) if meta.temperatures is not None else None,
        "thresholds": thresholds,
        "threshold_method": meta.threshold_method if thresholds is not None else None,
        "negative_label": meta.negative_label if task == "binary" else None,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "color_mode": "L" if image_config["input_size"][0] == 1 else "RGB",
        "input_size": list(image_config["input_size"]),
        "interpolation": image_config["interpolation"],
        "crop_mode": image_config["crop_mode"],
        "crop_pct": image_config["crop_pct"],
        "mean": list(image_config["mean"]),
        "std": list(image_config["std"]),
        "spatial": spatial,
        "spatial_multiple": multiple,
        "preprocessing": describe_preprocessing(image_config),
    }
