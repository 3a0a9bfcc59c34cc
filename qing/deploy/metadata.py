"""What an exported ONNX file carries besides the graph: outputs, decisions and preprocessing.

Every entry of the ONNX ``metadata_props`` that qing writes is a JSON document (a string is
``"\\"bicubic\\""``), so a runtime reads them all the same way::

    import json, onnxruntime as ort

    session = ort.InferenceSession("model.onnx")
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    meta["labels"], meta["activation"], meta["temperatures"], meta["thresholds"], meta["input_size"]

The keys (:data:`METADATA_KEYS`):

- ``labels``: one name per output column; ``task``: ``binary``, ``multilabel`` or ``multiclass``;
  ``activation``: ``sigmoid`` (binary, multilabel: one probability per output) or ``softmax``;
- ``temperatures``: per-output temperature scaling, probability = activation(logit / temperature)
  (``null``: not calibrated); the thresholds apply to these probabilities;
- ``thresholds``: per-output decision thresholds on the probability (``null`` for multiclass: argmax),
  ``threshold_method``: how they were chosen; ``negative_label``: binary only, the negative class name;
- ``input_name`` / ``output_name``: the graph's ``image`` ``(N, C, H, W)`` float32 input and its
  ``logits`` ``(N, num_classes)`` output;
- preprocessing, exactly what ``qing.data.build_transforms`` does: ``color_mode`` (``L`` or ``RGB``),
  ``input_size`` ``[C, H, W]``, ``interpolation``, ``crop_mode`` (``squash``: resize the whole image to
  ``H x W``; ``center``: resize the shorter side to ``floor(H / crop_pct)`` then crop the centre),
  ``crop_pct``, then pixel values ``/ 255``, minus ``mean``, divided by ``std`` (per channel);
- ``spatial``: ``fixed`` (only ``H x W``) or ``dynamic`` (other sizes that are multiples of
  ``spatial_multiple`` work too); ``preprocessing``: the same in words;
- provenance: ``architecture``, ``source``, ``qing_version``, ``exporter``, ``opset``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from qing.meta import TASKS

__all__ = ["METADATA_KEYS", "OnnxMetadata", "describe_preprocessing"]

#: Keys qing writes into ``metadata_props`` (every value is JSON).
METADATA_KEYS = (
    "architecture",
    "source",
    "qing_version",
    "exporter",
    "opset",
    "task",
    "labels",
    "activation",
    "temperatures",
    "thresholds",
    "threshold_method",
    "negative_label",
    "input_name",
    "output_name",
    "color_mode",
    "input_size",
    "interpolation",
    "crop_mode",
    "crop_pct",
    "mean",
    "std",
    "spatial",
    "spatial_multiple",
    "preprocessing",
)
#: The keys a file must have for qing to run it.
REQUIRED_KEYS = ("task", "labels", "input_name", "output_name", "input_size", "interpolation", "mean", "std")


def describe_preprocessing(image_config: Mapping[str, Any]) -> str:
    """The preprocessing of an image config (``qing.data.resolve_image_config``) in words."""
    channels, height, width = image_config["input_size"]
    color = "grayscale (L)" if channels == 1 else "RGB"
    interpolation = image_config["interpolation"]
    if image_config["crop_mode"] == "squash":
        resize = f"resize the whole image to {width}x{height} (width x height; {interpolation}, aspect ratio not kept)"
    else:
        resize = (
            f"{image_config['crop_mode']} crop: resize so the shorter side is floor({height} / "
            f"{image_config['crop_pct']}) ({interpolation}), then crop the centre {width}x{height}"
        )
    return (
        f"read as 8-bit {color}; {resize}; scale pixels to [0, 1] (/ 255); subtract mean {list(image_config['mean'])} "
        f"and divide by std {list(image_config['std'])} per channel; float32 NCHW"
    )


@dataclass
class OnnxMetadata:
    """The qing entries of an ONNX file's ``metadata_props``, decoded.

    Attributes:
        labels: One name per output.
        task: ``binary``, ``multilabel`` or ``multiclass``.
        temperatures: Per-output temperatures the logits are divided by (``None``: not calibrated).
        thresholds: Per-output decision thresholds (``None``: not stored, or multiclass).
        threshold_method: How the thresholds were chosen.
        negative_label: Binary: the negative class name.
        input_name: The graph's image input.
        output_name: The graph's logits output.
        image_config: Preprocessing as ``qing.data.resolve_image_config`` gives it (``input_size``,
            ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``); ``build_transforms`` takes it.
        spatial: ``fixed`` or ``dynamic``.
        spatial_multiple: Dynamic: the input side must be a multiple of this.
        extra: Every other entry (provenance, entries of other tools).
    """

    labels: list[str]
    task: str
    thresholds: Optional[list[float]]
    threshold_method: Optional[str]
    negative_label: Optional[str]
    input_name: str
    output_name: str
    image_config: dict[str, Any]
    temperatures: Optional[list[float]] = None
    spatial: str = "fixed"
    spatial_multiple: Optional[int] = None
    extra: Optional[dict[str, Any]] = None

    @classmethod
    def from_props(cls, props: Mapping[str, str], *, where: str = "the ONNX file") -> OnnxMetadata:
        """Decode ``metadata_props`` (``{key: JSON text}``), checking what qing needs to run the file.

        Raises:
            ValueError: A required key is missing (not a qing export), a value is not JSON, or values disagree.
        """
        missing = [key for key in REQUIRED_KEYS if key not in props]
        if missing:
            raise ValueError(
                f"{where} has no qing metadata ({', '.join(missing)} missing from its metadata_props), so its "
                "labels and preprocessing are unknown; export the model with `qing export` or qing.export_onnx"
            )
        values: dict[str, Any] = {}
        for key, text in props.items():
            try:
                values[key] = json.loads(text)
            except json.JSONDecodeError:
                if key in METADATA_KEYS:
                    raise ValueError(f"metadata entry {key!r} of {where} is not JSON: {text[:80]!r}") from None
                values[key] = text  # another tool's plain string
        labels = [str(v) for v in values["labels"]]
        if values["task"] not in TASKS:
            raise ValueError(f"metadata task {values['task']!r} of {where} is not one of {TASKS}")
        thresholds = values.get("thresholds")
        if thresholds is not None and len(thresholds) != len(labels):
            raise ValueError(f"{where} stores {len(thresholds)} thresholds for {len(labels)} labels")
        temperatures = values.get("temperatures")
        if temperatures is not None and len(temperatures) != len(labels):
            raise ValueError(f"{where} stores {len(temperatures)} temperatures for {len(labels)} labels")
        image_config = {
            "input_size": tuple(int(v) for v in values["input_size"]),
            "interpolation": str(values["interpolation"]),
            "mean": tuple(float(v) for v in values["mean"]),
            "std": tuple(float(v) for v in values["std"]),
            "crop_pct": float(values.get("crop_pct", 1.0)),
            "crop_mode": str(values.get("crop_mode", "squash")),
        }
        known = {
            "labels",
            "task",
            "temperatures",
            "thresholds",
            "threshold_method",
            "negative_label",
            "input_name",
            "output_name",
        }
        known |= set(image_config) | {"spatial", "spatial_multiple"}
        return cls(
            labels=labels,
            task=values["task"],
            thresholds=[float(t) for t in thresholds] if thresholds is not None else None,
            temperatures=[float(t) for t in temperatures] if temperatures is not None else None,
            threshold_method=values.get("threshold_method"),
            negative_label=values.get("negative_label"),
            input_name=str(values["input_name"]),
            output_name=str(values["output_name"]),
            image_config=image_config,
            spatial=str(values.get("spatial", "fixed")),
            spatial_multiple=values.get("spatial_multiple"),
            extra={k: v for k, v in values.items() if k not in known},
        )
