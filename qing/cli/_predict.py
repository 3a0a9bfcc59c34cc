"""``qing predict MODEL INPUT...``: probabilities and decisions for image files, as a table, CSV or JSON."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from qing._io import atomic_path, write_text_atomic
from qing.cli._common import (
    CLIError,
    HelpFormatter,
    LoadedModel,
    add_calibration_flags,
    add_common_flags,
    add_device_flags,
    add_model_argument,
    add_progress_flag,
    check_new_file,
    format_table,
    load_model,
    resolve_device,
)
from qing.cli._inference import expand_inputs, iter_predictions
from qing.cli._runtime import add_runtime_flags, build_runner, heatmap_refusal, runtime_of
from qing.data import ImageLoadError, ImageTransform, load_image
from qing.explain import heatmaps, overlay

EPILOG = """\
examples:
  qing predict runs/pneumonia chest.png
  qing predict runs/pneumonia scans/ 'more/**/*.dcm' --output predictions.csv
  qing predict hf-hub:me/cxr-pneumonia images/ --format json --output predictions.json --heatmaps heatmaps/
  qing predict qing_xrv_densenet121.all chest.dcm --threshold 0.6
  qing predict runs/nih scans/ --heatmaps heatmaps/ --heatmap-method gradcam --heatmap-label Effusion
  qing predict runs/pneumonia scans/ --tta --no-calibration -o predictions.csv
  qing predict model.onnx scans/ -o predictions.csv                  # onnxruntime, no PyTorch model needed
  qing predict runs/pneumonia scans/ --amp bf16 --channels-last --num-workers 2

MODEL is a model folder (a run folder means its checkpoints/best), hf-hub:owner/name[@revision],
local-dir:PATH, a registered architecture.tag with weights, a checkpoint file (converted on the fly),
or an .onnx file written by qing export (heatmaps need the PyTorch model).
Probabilities are calibrated with the model's stored temperatures (--no-calibration: plain
sigmoid/softmax). The decision uses the thresholds stored with the model (chosen on validation data by
qing train, after calibration), else 0.5; a multiclass model predicts the most probable class. In folders,
DICOM files are found by their DICM preamble whatever their name; other files are listed as not read.
Unreadable images are reported and skipped; the exit code is then 1, and the other images are still
written. --heatmaps overlays have the input image's size.
"""


_NOT_AN_IMAGE = "not an image file (no image ending such as .png/.jpg/.dcm, no DICOM preamble)"
_NOT_IMAGES_SHOWN = 20
_NO_CUT = 10**6  # table cells are never cut: label names and paths must stay whole


@dataclass
class Prediction:
    """One input: its probabilities and decisions, or why it could not be read."""

    path: str
    probabilities: Optional[list[float]] = None
    error: Optional[str] = None
    heatmap: Optional[str] = None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="probabilities and decisions for image files (PNG, JPEG, DICOM)",
        description="Run a model on image files, folders or glob patterns; print a table, write CSV or JSON.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_model_argument(parser)
    parser.add_argument("inputs", metavar="INPUT", nargs="+", help="image files, folders (recursive) or glob patterns")
    out = parser.add_argument_group("output")
    out.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write the predictions to this file (CSV or JSON)"
    )
    out.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        help="output format (default: from the --output suffix, else a table on stdout)",
    )
    out.add_argument("--heatmaps", type=Path, metavar="DIR", help="save heatmap overlays as PNG here")
    out.add_argument(
        "--heatmap-method",
        choices=("rollout", "gradcam"),
        help="rollout: class-token attention (qing CNN-Transformers; the default for them); gradcam: Grad-CAM of "
        "one output at the last CNN stage (any CNN; the default for the others)",
    )
    out.add_argument(
        "--heatmap-label",
        metavar="NAME",
        help="the output Grad-CAM explains (default: each image's most probable output)",
    )
    out.add_argument("--overwrite", action="store_true", help="replace existing output and heatmap files")
    out.add_argument(
        "--threshold",
        metavar="P",
        help="decision threshold(s) instead of the model's: one probability, or one per output (comma-separated)",
    )
    add_calibration_flags(out)
    add_progress_flag(out)
    add_device_flags(parser)
    add_runtime_flags(parser)
    add_common_flags(parser)
    parser.set_defaults(func=run)


def _output_format(args: argparse.Namespace) -> str:
    if args.format is not None:
        if args.output is not None and args.format == "table":
            raise CLIError("--format table prints to stdout; use csv or json with --output")
        return args.format
    if args.output is None:
        return "table"
    suffix = args.output.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise CLIError(f"cannot tell the format of {args.output} from its suffix; use .csv or .json, or --format")
    return suffix[1:]


def _heatmap_names(paths: list[Path], folder: Path) -> list[Path]:
    """One distinct ``<stem>.png`` per input: ``<stem>-2.png``, ``-3``, ... where a name is taken already.

    Names are compared without case (macOS and Windows folders), so ``y/a.png``, ``z/a.png`` and
    ``z/a-2.png`` give ``a.png``, ``a-2.png`` and ``a-2-2.png``; the CSV/JSON output maps each input to its file.
    """
    used: set[str] = set()
    names = []
    for path in paths:
        stem = path.stem or path.name
        name, count = f"{stem}.png", 1
        while name.lower() in used:
            count += 1
            name = f"{stem}-{count}.png"
        used.add(name.lower())
        names.append(folder / name)
    return names


def _heatmap_at_source_size(path: Path, heatmap: np.ndarray, transform: ImageTransform) -> np.ndarray:
    """The overlay of ``heatmap`` (model input resolution) on the input image, at the image's own size.

    The heatmap is mapped back through the eval transform's resize and crop (``source_box``); parts of
    the image the model did not see (a center crop's margins) are left untinted.
    """
    picture = np.asarray(load_image(path, channels=3))  # decoded again: the batch holds the resized input only
    height, width = picture.shape[:2]
    left, top, right, bottom = transform.source_box(width, height)
    box_w, box_h = max(1, round(right - left)), max(1, round(bottom - top))
    heat = np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize((box_w, box_h), Image.Resampling.BILINEAR))
    x0, y0 = round(left), round(top)
    dx0, dy0, dx1, dy1 = max(0, x0), max(0, y0), min(width, x0 + box_w), min(height, y0 + box_h)
    canvas = np.zeros((height, width), dtype=np.float32)
    canvas[dy0:dy1, dx0:dx1] = heat[dy0 - y0 : dy1 - y0, dx0 - x0 : dx1 - x0]
    blended = overlay(picture, np.clip(canvas, 0.0, 1.0))
    seen = np.zeros((height, width), dtype=bool)
    seen[dy0:dy1, dx0:dx1] = True
    blended[~seen] = picture[~seen]
    return blended


def decisions(loaded: LoadedModel, probs: list[float]) -> list[str]:
    """Names of the positive outputs (sigmoid tasks) or of the predicted class (multiclass)."""
    if loaded.task == "multiclass":
        return [loaded.labels[int(np.argmax(probs))]]
    return [name for name, p, t in zip(loaded.labels, probs, loaded.thresholds) if p >= t]


def run(args: argparse.Namespace) -> int:
    fmt = _output_format(args)
    if args.output is not None:
        check_new_file(args.output, overwrite=args.overwrite)
    inputs = expand_inputs(args.inputs)
    heatmap_paths: list[Path] = []
    if args.heatmaps is not None:
        if args.heatmaps.exists() and not args.heatmaps.is_dir():
            raise CLIError(f"--heatmaps {args.heatmaps} is a file; give a folder")
        heatmap_paths = _heatmap_names(inputs.files, args.heatmaps)
        existing = [p for p in heatmap_paths if p.exists()]
        if existing and not args.overwrite:
            raise CLIError(
                f"{len(existing)} heatmap file(s) already exist (e.g. {existing[0]}); "
                "pass --overwrite or choose another --heatmaps folder"
            )
    if not inputs.files:
        reasons = "; ".join(f"{arg}: {why}" for arg, why in inputs.missing)
        raise CLIError(f"no images to predict ({reasons})")

    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device, threshold=args.threshold, calibration=args.calibration)
    runtime = runtime_of(args, loaded)
    if heatmap_paths and heatmap_refusal(loaded, runtime):
        raise CLIError(heatmap_refusal(loaded, runtime))
    method = args.heatmap_method or ("rollout" if loaded.has_attention else "gradcam")
    if heatmap_paths and method == "rollout" and not loaded.has_attention:
        raise CLIError(
            f"--heatmap-method rollout needs a qing CNN-Transformer with attention maps; {args.model} has none "
            "(use --heatmap-method gradcam)"
        )
    if heatmap_paths and method == "gradcam" and not loaded.has_cnn_stage:
        raise CLIError(f"--heatmap-method gradcam needs a model with a CNN backbone; {args.model} has none")
    if args.heatmap_label is not None:
        if method != "gradcam":
            raise CLIError("--heatmap-label chooses the output Grad-CAM explains; add --heatmap-method gradcam")
        if args.heatmap_label not in loaded.labels:
            raise CLIError(f"--heatmap-label {args.heatmap_label!r} is not one of {', '.join(loaded.labels)}")
    transform = loaded.transform()
    results = [Prediction(str(p)) for p in inputs.files]
    failed = [Prediction(arg, error=why) for arg, why in inputs.missing]
    for arg, why in inputs.missing:
        print(f"qing: skipped {arg}: {why}", file=sys.stderr)
    for path in inputs.not_images[:_NOT_IMAGES_SHOWN]:
        print(f"qing: not read {path}: {_NOT_AN_IMAGE}", file=sys.stderr)
    if len(inputs.not_images) > _NOT_IMAGES_SHOWN:
        print(f"qing: not read {len(inputs.not_images) - _NOT_IMAGES_SHOWN} more such file(s)", file=sys.stderr)

    label = loaded.labels.index(args.heatmap_label) if args.heatmap_label is not None else None
    batches = iter_predictions(
        loaded,
        inputs.files,
        runner=build_runner(loaded, args, device, check_images=inputs.files[:4]),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=args.progress,
        transform=transform,
    )
    for batch in batches:
        for bad in batch.bad:
            results[bad.index].error = bad.reason
            print(f"qing: skipped {bad.path}: {bad.reason}", file=sys.stderr)
        if not batch.indices:
            continue
        for index, row in zip(batch.indices, batch.probabilities):
            results[index].probabilities = [float(p) for p in row]
        if heatmap_paths:
            heat = heatmaps(loaded.model, batch.images, method=method, label=label)
            for index, heatmap in zip(batch.indices, heat):
                try:
                    blended = _heatmap_at_source_size(inputs.files[index], heatmap.numpy(), transform)
                except (ImageLoadError, OSError) as err:  # the file changed since its prediction
                    print(f"qing: no heatmap for {inputs.files[index]}: {err}", file=sys.stderr)
                    continue
                target = heatmap_paths[index]
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as tmp:
                    Image.fromarray(blended).save(tmp, format="PNG")
                results[index].heatmap = str(target)

    everything = failed + results
    n_bad = sum(1 for r in everything if r.error is not None)
    if fmt == "table":
        print(_table(loaded, results))
    else:
        if fmt == "csv":
            text = predictions_csv(loaded, everything, heatmaps=bool(heatmap_paths))
        else:
            text = _json(loaded, everything, inputs.not_images)
        if args.output is None:
            sys.stdout.write(text)
        else:
            write_text_atomic(args.output, text)
    ok = len(everything) - n_bad
    where = f" -> {args.output}" if args.output is not None else ""
    print(
        f"qing: {ok} image(s) predicted{where}; calibration: {loaded.calibration_source}; "
        f"thresholds: {_threshold_text(loaded)}"
        + (f"; heatmaps in {args.heatmaps}" if heatmap_paths else "")
        + (f"; {len(inputs.not_images)} other file(s) not read (listed above)" if inputs.not_images else ""),
        file=sys.stderr,
    )
    if n_bad:
        print(f"qing: error: {n_bad} of {len(everything)} input(s) could not be read (listed above)", file=sys.stderr)
        return 1
    return 0


def _threshold_text(loaded: LoadedModel) -> str:
    if loaded.task == "multiclass":
        return loaded.threshold_source
    values = ", ".join(f"{t:.6g}" for t in loaded.thresholds[:6]) + (", ..." if len(loaded.thresholds) > 6 else "")
    return f"{values} ({loaded.threshold_source})"


def _compared(p: float, t: float) -> str:
    """``"0.4986 >= 0.4985"``: a probability against its threshold, with as many decimals as the comparison needs."""
    sign = ">=" if p >= t else "<"
    for decimals in range(4, 17):
        shown_p, shown_t = f"{p:.{decimals}f}", f"{t:.{decimals}f}"
        if shown_p != shown_t or p == t:
            break
    return f"{shown_p} {sign} {shown_t}"


def _table(loaded: LoadedModel, results: list[Prediction]) -> str:
    if loaded.task == "multilabel":
        return _multilabel_table(loaded, results)
    few = len(loaded.labels) <= 4
    headers = ["image", *(loaded.labels if few else ["top output"]), "decision"]
    rows = []
    for r in results:
        if r.probabilities is None:
            rows.append([r.path, *(["-"] * (len(headers) - 2)), "unreadable"])
            continue
        decision = decisions(loaded, r.probabilities)
        shown = (loaded.labels[0] if decision else loaded.negative_label) if loaded.task == "binary" else decision[0]
        if few:
            probs = [f"{p:.4f}" for p in r.probabilities]
        else:
            top = int(np.argmax(r.probabilities))
            probs = [f"{loaded.labels[top]} {r.probabilities[top]:.4f}"]
        rows.append([r.path, *probs, shown])
    return format_table(headers, rows, max_width=_NO_CUT)


def _multilabel_table(loaded: LoadedModel, results: list[Prediction]) -> str:
    """Per image: the positive outputs, most probable first, each against its threshold; then the top negative."""
    headers = ["image", "positive (probability >= threshold)", "top negative"]
    rows = []
    for r in results:
        if r.probabilities is None:
            rows.append([r.path, "unreadable", "-"])
            continue
        ranked = sorted(zip(loaded.labels, r.probabilities, loaded.thresholds), key=lambda x: -x[1])
        positive = [f"{name} {_compared(p, t)}" for name, p, t in ranked if p >= t]
        negative = next((f"{name} {_compared(p, t)}" for name, p, t in ranked if p < t), "-")
        rows.append([r.path, "; ".join(positive) or "none", negative])
    return format_table(headers, rows, max_width=_NO_CUT)


def predictions_csv(loaded: LoadedModel, results: list[Prediction], *, heatmaps: bool = False) -> str:
    """The CSV of ``qing predict`` (also the download of ``qing app``): one row per input, failed ones included."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    prob_cols = [f"prob_{name}" for name in loaded.labels]
    decision_cols = ["predicted"] if loaded.task == "multiclass" else [f"positive_{name}" for name in loaded.labels]
    writer.writerow(["path", *prob_cols, *decision_cols, *(["heatmap"] if heatmaps else []), "error"])
    for r in results:
        if r.probabilities is None:
            cells: list[Any] = [""] * (len(prob_cols) + len(decision_cols))
        else:
            if loaded.task == "multiclass":
                decided: list[Any] = decisions(loaded, r.probabilities)
            else:
                decided = [int(p >= t) for p, t in zip(r.probabilities, loaded.thresholds)]
            cells = [repr(p) for p in r.probabilities] + decided
        writer.writerow([r.path, *cells, *([r.heatmap or ""] if heatmaps else []), r.error or ""])
    return buffer.getvalue()


def _json(loaded: LoadedModel, results: list[Prediction], not_images: list[Path]) -> str:
    predictions, failed = [], []
    for r in results:
        if r.probabilities is None:
            failed.append({"path": r.path, "error": r.error})
            continue
        entry: dict[str, Any] = {"path": r.path, "probabilities": dict(zip(loaded.labels, r.probabilities))}
        if loaded.task == "multiclass":
            entry["predicted"] = decisions(loaded, r.probabilities)[0]
        else:
            entry["positive"] = decisions(loaded, r.probabilities)
        if r.heatmap:
            entry["heatmap"] = r.heatmap
        predictions.append(entry)
    document = {
        "model": loaded.name,
        "task": loaded.task,
        "labels": loaded.labels,
        "thresholds": loaded.thresholds,
        "threshold_source": loaded.threshold_source,
        "temperatures": loaded.temperatures,
        "calibration": loaded.calibration_source,
        "predictions": predictions,
        "failed": failed,
        "not_read": [{"path": str(p), "reason": _NOT_AN_IMAGE} for p in not_images],
    }
    return json.dumps(document, indent=2) + "\n"
