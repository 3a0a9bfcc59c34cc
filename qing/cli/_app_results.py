"""What ``qing app`` computes and shows, without the web framework: models by MODEL argument, predictions for
uploaded files through :func:`qing.cli._inference.iter_predictions` (the path ``qing predict`` runs), heatmaps,
the HTML of the result cards, the model summary and the CSV download.
"""

from __future__ import annotations

import base64
import html
import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from qing import explain
from qing.cli._common import CLIError, LoadedModel, load_model
from qing.cli._inference import iter_predictions
from qing.cli._predict import Prediction, decisions, predictions_csv
from qing.explain import class_token_heatmap, denormalize, overlay
from qing.meta import get_meta
from qing.model_card import model_card_summary

#: Default upload limits: DICOM chest films are 5-40 MB; more files than this belong to ``qing predict``.
DEFAULT_MAX_FILE_SIZE = 64 * 1024 * 1024
DEFAULT_MAX_FILES = 24


def parse_size(text: str) -> int:
    """``"64mb"``, ``"500kb"``, ``"1gb"`` or a byte count -> bytes (argparse type of ``--max-file-size``)."""
    value = text.strip().lower()
    unit = next((u for u in _UNITS if value.endswith(u)), "")
    try:
        size = float(value[: len(value) - len(unit)].strip()) * _UNITS.get(unit, 1)
    except ValueError:
        raise ValueError(f"expected a size such as 64mb, 500kb or 1000000, got {text!r}") from None
    if size < 1:
        raise ValueError(f"the size limit must be at least 1 byte, got {text!r}")
    return int(size)


_UNITS = {"gb": 1024**3, "mb": 1024**2, "kb": 1024, "b": 1}  # longest suffix first: "mb" before "b"


def size_text(size: int) -> str:
    """Bytes in words: ``"64 MB"``, ``"1.5 MB"``, ``"900 bytes"``."""
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{size} bytes"


class ModelStore:
    """Models by MODEL argument, loaded on first use and kept (the last ``capacity`` of them).

    Args:
        device: Where models run.
        allowed: Only these MODEL arguments may be loaded (a published page must not load whatever a
            visitor types); ``None`` allows any MODEL that ``qing predict`` accepts.
        capacity: Models kept in memory.
    """

    def __init__(self, device: torch.device, *, allowed: Optional[Sequence[str]] = None, capacity: int = 2) -> None:
        self.device = device
        self.allowed = list(allowed) if allowed is not None else None
        self.capacity = capacity
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: str) -> LoadedModel:
        """The loaded model; ``CLIError`` (or the loader's ``OSError``/``ValueError``) says why it cannot be."""
        spec = (spec or "").strip()
        if not spec:
            raise CLIError(
                "choose a model: a model or run folder, hf-hub:owner/name, or a registered name with weights"
            )
        if self.allowed is not None and spec not in self.allowed:
            raise CLIError(f"this page serves only {', '.join(self.allowed)}; {spec!r} is not one of them")
        with self._lock:
            if spec in self._models:
                self._models.move_to_end(spec)
                return self._models[spec]
            loaded = load_model(spec, device=self.device)
            self._models[spec] = loaded
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return loaded

    @property
    def lock(self) -> threading.Lock:
        """Held while a model runs: one request at a time uses the models."""
        return self._lock


def model_config(loaded: LoadedModel) -> dict[str, Any]:
    """The ``config.json`` fields the model card reads, from a loaded model (whatever it was loaded from)."""
    model = loaded.model
    cfg = dict(model.pretrained_cfg)
    real_labels = not all(name == f"output_{i}" for i, name in enumerate(loaded.labels))
    return {
        "architecture": cfg.get("architecture") or type(model).__name__,
        "num_classes": int(model.num_classes),
        "label_names": loaded.labels if real_labels else [],
        "pretrained_cfg": cfg,
        "qing": get_meta(model).to_dict(),
    }


def model_summary(loaded: LoadedModel) -> str:
    """Markdown about the model: what was loaded, its task and decision rule, then the model card summary."""
    config = model_config(loaded)
    lines = [
        f"**Model:** `{loaded.name}` ({loaded.source}); architecture `{config['architecture']}`, "
        f"{config['num_classes']} output(s), task **{loaded.task}**.",
    ]
    if loaded.task == "binary":
        lines.append(
            f"**Decision:** {loaded.labels[0]} when its probability is at least the threshold, "
            f"otherwise {loaded.negative_label}. Thresholds: {loaded.threshold_source}."
        )
    elif loaded.task == "multilabel":
        lines.append(f"**Decision:** each label is positive at or above its threshold ({loaded.threshold_source}).")
    else:
        lines.append("**Decision:** the most probable class (argmax).")
    summary = model_card_summary(config).replace("\n## ", "\n### ")
    return "\n\n".join(lines) + "\n\n" + summary


# ---- one request: files -> predictions, pictures, HTML, CSV ------------------------------------------------


@dataclass
class ImageResult:
    """One uploaded file: its prediction (``path`` is the file's name) and its pictures as PNG bytes."""

    prediction: Prediction
    pictures: dict[str, bytes] = field(default_factory=dict)  #: caption -> PNG


@dataclass
class Analysis:
    """The answer to one upload: per-file results and the CSV of ``qing predict``."""

    loaded: LoadedModel
    results: list[ImageResult]
    csv: str
    notes: list[str] = field(default_factory=list)  #: model-level remarks (e.g. no attention maps)

    @property
    def n_failed(self) -> int:
        return sum(1 for r in self.results if r.prediction.error is not None)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _picture(image: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` in ``[0, 1]`` -> ``(H, W)`` or ``(H, W, 3)`` uint8."""
    array = np.round(image.numpy().transpose(1, 2, 0) * 255.0).astype(np.uint8)
    return array[:, :, 0] if array.shape[2] == 1 else array


def analyze(
    loaded: LoadedModel,
    files: Sequence[Path],
    *,
    names: Optional[Sequence[str]] = None,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    max_files: int = DEFAULT_MAX_FILES,
    heatmaps: bool = True,
    grad_cam_label: Optional[int] = None,
    batch_size: int = 8,
) -> Analysis:
    """Predict uploaded files the way ``qing predict`` does, with the model input and heatmaps of each.

    Args:
        loaded: The model.
        files: The uploaded files (in the upload's order).
        names: What to call them (default: the file names).
        max_file_size: Larger files are not read; their row says so.
        max_files: Files after the first ``max_files`` are not read; their row says so.
        heatmaps: Draw the attention-rollout overlay (qing CNN-Transformers).
        grad_cam_label: Also draw Grad-CAM for this output (models with a CNN stage, :func:`qing.explain.grad_cam`).
        batch_size: Images per forward pass.
    """
    names = list(names) if names is not None else [Path(f).name for f in files]
    results = [ImageResult(Prediction(name)) for name in names]
    readable: list[int] = []
    for i, path in enumerate(files):
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        if i >= max_files:
            why = f"not read: at most {max_files} files per upload (use qing predict for folders of images)"
        elif size > max_file_size:
            limit = size_text(max_file_size)
            why = f"file too large: {size_text(size)}, the limit is {limit} (qing app --max-file-size)"
        else:
            readable.append(i)
            continue
        results[i].prediction.error = why

    notes = []
    draw = heatmaps and loaded.has_attention
    if heatmaps and not loaded.has_attention:
        notes.append("This model has no attention maps (not a qing CNN-Transformer): no attention-rollout overlay.")
    cam_label = grad_cam_label if grad_cam_label is not None and loaded.has_cnn_stage else None
    transform = loaded.transform()
    device = next(loaded.model.parameters()).device if loaded.model is not None else None
    batches = iter_predictions(
        loaded, [Path(files[i]) for i in readable], device=device, batch_size=batch_size, transform=transform
    )
    for batch in batches:
        for bad in batch.bad:
            i = readable[bad.index]  # the reason names the file by its name, not by where the upload is kept
            results[i].prediction.error = bad.reason.replace(str(Path(files[i])), names[i])
        if not batch.indices:
            continue
        pictures = denormalize(batch.images, transform.mean, transform.std)
        rollout = class_token_heatmap(loaded.model, batch.images) if draw else None
        cams = None
        if cam_label is not None:
            try:
                cams = explain.grad_cam(loaded.model, batch.images, label=cam_label)
            except (TypeError, ValueError) as err:  # e.g. no CNN stage to take the gradients at
                notes.append(f"No Grad-CAM for this model: {err}")
                cam_label = None
        for j, (index, probs) in enumerate(zip(batch.indices, batch.probabilities)):
            result = results[readable[index]]
            result.prediction.probabilities = [float(p) for p in probs]
            height, width = pictures.shape[-2:]
            result.pictures[f"Model input ({width} × {height}, after preprocessing)"] = _png(_picture(pictures[j]))
            if rollout is not None:
                result.pictures["Attention rollout"] = _png(overlay(pictures[j], rollout[j]))
            if cams is not None:
                result.pictures[f"Grad-CAM: {loaded.labels[grad_cam_label]}"] = _png(overlay(pictures[j], cams[j]))
    csv = predictions_csv(loaded, [r.prediction for r in results])
    return Analysis(loaded, results, csv, notes)


# ---- HTML --------------------------------------------------------------------------------------------------


def _decision_text(loaded: LoadedModel, probs: list[float]) -> str:
    positive = decisions(loaded, probs)
    if loaded.task == "binary":
        return loaded.labels[0] if positive else loaded.negative_label
    if loaded.task == "multiclass":
        return positive[0]
    return ", ".join(positive) or "none above its threshold"


def _rows(loaded: LoadedModel, probs: list[float]) -> str:
    """One table row per output: label, probability, bar, threshold, call."""
    top = int(np.argmax(probs))
    rows = []
    for i, (label, p) in enumerate(zip(loaded.labels, probs)):
        if loaded.task == "multiclass":
            threshold, positive = "argmax", i == top
            call = "predicted" if positive else ""
        else:
            threshold, positive = f"{loaded.thresholds[i]:.4f}", p >= loaded.thresholds[i]
            if loaded.task == "binary":
                call = label if positive else loaded.negative_label
            else:
                call = "positive" if positive else "negative"
        rows.append(
            f'<tr class="qing-row{" qing-positive" if positive else ""}" data-label="{html.escape(label)}">'
            f"<td>{html.escape(label)}</td>"
            f'<td class="qing-prob">{p:.4f}</td>'
            f'<td class="qing-bar"><span style="width:{100 * p:.1f}%"></span></td>'
            f'<td class="qing-threshold">{threshold}</td>'
            f'<td class="qing-call">{html.escape(call)}</td></tr>'
        )
    return "".join(rows)


def results_html(analysis: Analysis) -> str:
    """One card per file: the pictures, the probability table and the decision; or why the file was not read."""
    loaded = analysis.loaded
    parts = ['<div class="qing-results">']
    for note in analysis.notes:
        parts.append(f'<p class="qing-note">{html.escape(note)}</p>')
    for result in analysis.results:
        p = result.prediction
        name = html.escape(p.path)
        if p.error is not None:
            parts.append(
                f'<div class="qing-card qing-failed" data-file="{name}"><h4>{name}</h4>'
                f'<p class="qing-error">Could not read this file: {html.escape(p.error)}</p></div>'
            )
            continue
        assert p.probabilities is not None
        figures = "".join(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}"><figcaption>{html.escape(caption)}</figcaption></figure>'
            for caption, png in result.pictures.items()
        )
        parts.append(
            f'<div class="qing-card" data-file="{name}"><h4>{name}</h4>'
            f'<p class="qing-decision">Decision: <strong>{html.escape(_decision_text(loaded, p.probabilities))}'
            f"</strong></p>"
            f'<div class="qing-figures">{figures}</div>'
            '<table class="qing-probs"><thead><tr><th>Label</th><th>Probability</th><th></th><th>Threshold</th>'
            f"<th>Call</th></tr></thead><tbody>{_rows(loaded, p.probabilities)}</tbody></table></div>"
        )
    parts.append("</div>")
    return "".join(parts)


def status_text(analysis: Analysis) -> str:
    """One line about the upload: how many files were predicted and how many could not be read."""
    ok = len(analysis.results) - analysis.n_failed
    text = f"{ok} image(s) predicted with {analysis.loaded.name}"
    if analysis.n_failed:
        text += f"; {analysis.n_failed} of {len(analysis.results)} file(s) could not be read (see below)"
    return text + "."
