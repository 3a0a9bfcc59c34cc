"""What the ``qing`` commands share: errors, options, devices, models from MODEL arguments, labels, outputs."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from huggingface_hub.constants import CONFIG_NAME
from torch import nn

from qing._factory import create_model
from qing.convert import load_checkpoint_file
from qing.data import ImageTransform, build_transforms, resolve_image_config
from qing.deploy import OnnxModel
from qing.evaluate import inference, probabilities
from qing.explain import gradcam_layer
from qing.meta import ModelMeta, get_meta, model_labels, model_task

_log = logging.getLogger("qing.cli")

#: Endings of checkpoint files a MODEL argument may name (converted on the fly).
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt", ".safetensors")


class CLIError(Exception):
    """A user mistake or a failure with a message that says what to do; printed as ``qing: error: ...``."""


# ---- options -----------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and example epilogs; wraps option help."""


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """``--debug`` and ``--verbose`` on a subcommand (they may also come before the command)."""
    group = parser.add_argument_group("output control")
    group.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error"
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what qing does (INFO level)"
    )


def add_device_flags(parser: argparse.ArgumentParser, *, batch: bool = True, workers: bool = True) -> None:
    """``--device``, and ``--batch-size`` and ``--num-workers`` where batches are read."""
    group = parser.add_argument_group("compute")
    group.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    if batch:
        group.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="images per forward pass")
    if workers:
        group.add_argument(
            "--num-workers",
            type=non_negative_int,
            default=0,
            metavar="N",
            help="image-reading worker processes (0: in-process)",
        )


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The MODEL positional argument of the commands that run a model (see :func:`load_model`)."""
    parser.add_argument("model", metavar="MODEL", help="model folder, hf-hub:/local-dir: source or registered name")


def add_progress_flag(group: argparse._ActionsContainer) -> None:
    """``--progress`` / ``--no-progress``: a progress bar on stderr (default: only on a terminal)."""
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: only on a terminal)",
    )


def add_calibration_flags(group: argparse._ActionsContainer, *, tta: bool = True) -> None:
    """``--no-calibration`` (and ``--tta``): how logits become the probabilities shown and thresholded."""
    group.add_argument(
        "--calibration",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="divide the logits by the model's stored temperatures (temperature scaling fitted on validation); "
        "--no-calibration shows plain sigmoid/softmax probabilities, with the stored thresholds moved to that "
        "scale so every decision stays the same",
    )
    if tta:
        group.add_argument(
            "--tta",
            action="store_true",
            help="test-time augmentation: average the probabilities over 7 views (the image, 4%% shifts in four "
            "directions, zooms 0.95 and 1.05; no flip: laterality); 7x slower",
        )


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def resolve_device(name: str) -> torch.device:
    """``--device``: :func:`qing.evaluate.resolve_device`, its errors worded for the command line."""
    try:
        return inference.resolve_device(name)
    except inference.CUDAUnavailableError as err:
        raise CLIError(f"--device {name} but CUDA is not available here; use --device cpu") from err
    except ValueError as err:
        raise CLIError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from err


# ---- models --------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model from a MODEL argument, in eval mode on its device, with what predictions need.

    Attributes:
        model: The PyTorch model; ``None`` when MODEL is an ONNX file.
        name: The MODEL argument as given.
        source: What was loaded, in words (folder, Hub repo, registry tag, converted file, ONNX file).
        labels: One name per output (``output_<i>`` where the model has none).
        task: ``binary``, ``multilabel`` or ``multiclass``.
        thresholds: Per-output decision thresholds (sigmoid tasks), ``[]`` for multiclass (argmax); on the
            scale of the probabilities :meth:`probabilities` gives.
        threshold_source: Where the thresholds came from, in words.
        negative_label: Binary task: the name shown for a negative decision.
        temperatures: The temperatures logits are divided by (``None``: not calibrated).
        calibration_source: How the probabilities are calibrated, in words.
        threshold_method: How stored thresholds were chosen (``None`` for given or default ones).
        image_config: The preprocessing (``qing.data.resolve_image_config``).
        onnx: The onnxruntime model: the ONNX MODEL, or the PyTorch model exported by ``--runtime onnx``.
    """

    model: Optional[nn.Module]
    name: str
    source: str
    labels: list[str]
    task: str
    thresholds: list[float]
    threshold_source: str
    negative_label: str = "negative"
    temperatures: Optional[list[float]] = None
    calibration_source: str = "none"
    threshold_method: Optional[str] = None
    image_config: dict[str, Any] = field(default_factory=dict)
    onnx: Optional[OnnxModel] = None

    def probabilities(self, logits: Any) -> Any:
        """``(N, C)`` probabilities of ``(N, C)`` logits: the task's sigmoid/softmax after the temperatures."""
        return probabilities(logits, self.task, self.temperatures)

    @property
    def has_attention(self) -> bool:
        """Whether attention maps can be drawn (a qing CNN-Transformer in PyTorch)."""
        return hasattr(self.model, "forward_attention") and bool(getattr(self.model, "feat_stride", None))

    def transform(self) -> ImageTransform:
        """The eval transform of the model's preprocessing."""
        return build_transforms(self.image_config, train=False)

    @property
    def has_cnn_stage(self) -> bool:
        """Whether Grad-CAM can be drawn (a CNN stage of a PyTorch model, :func:`qing.explain.gradcam_layer`)."""
        if self.model is None:
            return False
        try:
            gradcam_layer(self.model)
        except TypeError:
            return False
        return True


def _looks_like_path(spec: str) -> bool:
    return (
        "/" in spec
        or os.sep in spec
        or spec.startswith((".", "~"))
        or spec.lower().endswith((*CHECKPOINT_SUFFIXES, ".json"))
    )


def _model_folder(path: Path) -> Optional[Path]:
    """The model folder a path names: itself, a run folder's ``checkpoints/best``, or a weights file's folder."""
    if path.is_dir():
        for candidate in (path, path / "checkpoints" / "best"):
            if (candidate / CONFIG_NAME).is_file():
                return candidate
        return None
    if path.name == CONFIG_NAME or (path.suffix == ".safetensors" and (path.parent / CONFIG_NAME).is_file()):
        return path.parent
    return None


def _create_from_spec(spec: str) -> tuple[nn.Module, str]:
    """Build the model a MODEL argument names, with its weights; returns ``(model, description)``."""
    if spec.startswith(("hf-hub:", "local-dir:")):
        return create_model(spec, pretrained=True), spec
    path = Path(spec).expanduser()
    if path.exists():
        folder = _model_folder(path)
        if folder is not None:
            return create_model(f"local-dir:{folder}", pretrained=True), f"model folder {folder}"
        if path.is_dir():
            raise CLIError(
                f"{path} is not a model folder: it has no config.json (expected a folder written by qing train, "
                "qing convert, qing pull or qing.save_pretrained, or a run folder with checkpoints/best)"
            )
        converted = load_checkpoint_file(path)
        _log.warning(
            "converted %s (%s format) on the fly; save it once with `qing convert %s DIR` and use DIR",
            path,
            converted.format,
            path,
        )
        return converted.create_model(), f"{converted.format} checkpoint {path}"
    if _looks_like_path(spec):
        hint = f"; for a Hub repo write hf-hub:{spec}" if spec.count("/") == 1 and not spec.startswith(".") else ""
        raise CLIError(f"model folder or checkpoint not found: {spec}{hint}")
    model = create_model(spec, pretrained=True)
    _warn_untrained_head(model, spec)
    return model, f"registered weights {spec}"


def _warn_untrained_head(model: nn.Module, spec: str) -> None:
    report = getattr(model, "qing_load_report", None)
    head = model.pretrained_cfg.get("classifier") or ()
    head = (head,) if isinstance(head, str) else tuple(head)
    if report is not None and any(k.startswith(tuple(f"{h}." for h in head)) for k in report.filled):
        _log.warning(
            "%s holds backbone weights only: its classifier is randomly initialized, so its predictions mean "
            "nothing until it is fine-tuned (qing train --model %s --pretrained ...)",
            spec,
            spec,
        )


def parse_thresholds(text: Optional[str], num_outputs: int) -> Optional[list[float]]:
    """``--threshold``: one probability for every output, or a comma-separated list with one per output."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as err:
        raise CLIError(f"--threshold expects probabilities like 0.5 or 0.3,0.6, got {text!r}") from err
    if len(values) == 1:
        values = values * num_outputs
    if len(values) != num_outputs:
        raise CLIError(f"--threshold has {len(values)} values for a model with {num_outputs} outputs")
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise CLIError(f"--threshold values are probabilities in [0, 1], got {text}")
    return values


def load_model(
    spec: str, *, device: torch.device, threshold: Optional[str] = None, calibration: bool = True
) -> LoadedModel:
    """The model a MODEL argument names, in eval mode on ``device``, with labels, task, calibration and thresholds.

    MODEL is a folder written by ``qing train`` / ``convert`` / ``pull`` (or a run folder, meaning its
    ``checkpoints/best``), ``hf-hub:owner/name[@revision]``, ``local-dir:PATH``, a registered
    ``architecture.tag``, a foreign checkpoint file (converted on the fly), or an ``.onnx`` file
    written by ``qing export`` (labels, temperatures, thresholds and preprocessing from its metadata).
    With ``calibration=False`` the stored temperatures are dropped and the stored thresholds moved to the
    plain probabilities (:meth:`qing.ModelMeta.uncalibrated`), so the decisions do not change.
    """
    if spec.lower().endswith(".onnx"):
        return _load_onnx(spec, threshold, calibration)
    model, source = _create_from_spec(spec)
    model = model.eval().to(device)
    loaded = LoadedModel(model, spec, source, model_labels(model), model_task(model), [], "")
    loaded.image_config = resolve_image_config(model)
    meta = _set_calibration(loaded, get_meta(model), calibration)
    model.qing_meta = meta
    _set_thresholds(loaded, threshold, meta)
    return loaded


def _load_onnx(spec: str, threshold: Optional[str], calibration: bool) -> LoadedModel:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CLIError(f"ONNX model not found: {spec} (write one with `qing export MODEL {path.name}`)")
    onnx = OnnxModel(path)
    stored = onnx.metadata
    loaded = LoadedModel(None, spec, f"ONNX file {path}", stored.labels, stored.task, [], "", onnx=onnx)
    loaded.image_config = onnx.image_config
    meta = ModelMeta(
        task=stored.task,
        temperatures=stored.temperatures,
        thresholds=stored.thresholds,
        threshold_method=stored.threshold_method,
        negative_label=stored.negative_label,
    )
    _set_thresholds(loaded, threshold, _set_calibration(loaded, meta, calibration))
    return loaded


def _set_calibration(loaded: LoadedModel, meta: ModelMeta, calibration: bool) -> ModelMeta:
    """Set ``loaded``'s temperatures and calibration wording; the metadata the thresholds are read from."""
    if meta.temperatures is not None and len(meta.temperatures) != len(loaded.labels):
        raise CLIError(f"{loaded.name} stores {len(meta.temperatures)} temperatures for {len(loaded.labels)} outputs")
    if meta.temperatures is None:
        loaded.calibration_source = "none (the model has no stored temperatures)"
    elif calibration:
        loaded.calibration_source = "temperature scaling stored with the model (T = " + _few(meta.temperatures) + ")"
    else:
        meta = meta.uncalibrated()
        loaded.calibration_source = "off (--no-calibration; stored thresholds moved to the plain probabilities)"
    loaded.temperatures = list(meta.temperatures) if meta.temperatures is not None else None
    return meta


def _set_thresholds(loaded: LoadedModel, threshold: Optional[str], meta: ModelMeta) -> None:
    """``--threshold``, else the stored thresholds, else 0.5 (argmax for multiclass); the negative label."""
    labels, task = loaded.labels, loaded.task
    stored, method = meta.thresholds, meta.threshold_method
    override = parse_thresholds(threshold, len(labels))
    if task == "multiclass":
        if override is not None:
            raise CLIError("--threshold does not apply to a multiclass model (the decision is the argmax)")
        loaded.thresholds, loaded.threshold_source = [], "argmax (multiclass)"
    elif override is not None:
        loaded.thresholds, loaded.threshold_source = override, "--threshold"
    elif stored is not None and len(stored) == len(labels):
        loaded.thresholds = list(stored)
        loaded.threshold_source = "stored with the model" + (f", {method}" if method else "")
        loaded.threshold_method = method
    else:
        loaded.thresholds, loaded.threshold_source = [0.5] * len(labels), "default: the model has no stored thresholds"
    loaded.negative_label = meta.negative_label or (f"not {labels[0]}" if task == "binary" else "negative")


def _few(values: Sequence[float], n: int = 6) -> str:
    return ", ".join(f"{v:.3g}" for v in values[:n]) + (", ..." if len(values) > n else "")


# ---- outputs -------------------------------------------------------------------------------------


def check_new_file(path: Path, *, overwrite: bool, what: str = "output") -> None:
    """Refuse to replace an existing file unless ``overwrite``."""
    if path.is_dir():
        raise CLIError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise CLIError(f"{what} {path} already exists; pass --overwrite to replace it or choose another name")


def check_new_folder(path: Path, *, overwrite: bool, what: str = "output folder") -> None:
    """Refuse a non-empty existing folder (or a file in the way) unless ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"{what} {path} exists and is a file; give a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CLIError(f"{what} {path} already exists and is not empty; pass --overwrite or choose another folder")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, max_width: int = 60) -> str:
    """A plain-text table: left-aligned columns separated by two spaces, cells cut to ``max_width``."""

    def cut(value: Any) -> str:
        text = str(value)
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    cells = [[cut(h) for h in headers]] + [[cut(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def short_path(path: Path) -> str:
    """``path`` relative to the working directory when it is below it, else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
