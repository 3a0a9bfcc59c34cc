"""``qing eval MODEL DATA``: metrics and the evaluation report of a model on labelled images."""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from qing._format import format_value
from qing._io import write_text_atomic
from qing.cli._common import (
    CLIError,
    HelpFormatter,
    LoadedModel,
    add_calibration_flags,
    add_common_flags,
    add_device_flags,
    add_model_argument,
    add_progress_flag,
    check_new_folder,
    load_model,
    resolve_device,
    short_path,
)
from qing.cli._inference import inference_loader
from qing.cli._runtime import add_runtime_flags, build_runner
from qing.data import (
    NEGATIVE_CLASS_NAMES,
    NIH_FINDINGS_COLUMN,
    BadFileLog,
    BadImage,
    CXRDataset,
    Sample,
    read_class_folders,
    read_label_csv,
    read_list_file,
)
from qing.data.split_record import SPLIT_RECORD, RecordedImage, read_split_record
from qing.evaluate import collect_logits, evaluate_logits
from qing.meta import default_label_names
from qing.train.run_folder import read_marker

EPILOG = """\
examples:
  qing eval runs/pneumonia data/chest_xray --split test    # exactly the run's test images (its splits.csv)
  qing eval runs/pneumonia data/chest_xray                 # DATA/test/<CLASS>/* (or DATA/<CLASS>/*)
  qing eval runs/pneumonia data/chest_xray --split val
  qing eval runs/pneumonia manifest.csv --label-column label --output reports/pneumonia
  qing eval runs/nih nih/labels.csv --split-column repo_split --split test   # 0/1 columns named like the outputs
  qing eval qing_chexnet_densenet121.chexnet test_list.txt --image-dir images/
  qing eval model.onnx data/chest_xray -o reports/onnx                # onnxruntime (an exported model)
  qing eval runs/pneumonia data/chest_xray --runtime onnx             # export on the fly, then onnxruntime
  qing eval runs/pneumonia data/chest_xray --tta --no-calibration

DATA is a folder of class folders, a CSV (a class-name column, one 0/1 column per model output, or
NIH's "Finding Labels" column of |-separated findings, "No Finding" = none) or a ChestX-ray14 list
file (image name, then one 0/1 per output). When MODEL is a qing train run (or its checkpoints/best)
and DATA is the data it trained on, --split takes the images of that split from the run's
splits.csv: the split qing made, patients kept apart. Images the run trained or validated on are
counted and warned about, whatever DATA is. Class names must match the model's labels (a binary
model: its positive class and one other). Probabilities are calibrated with the model's stored
temperatures (--no-calibration: plain sigmoid/softmax); decisions use the model's stored thresholds,
else 0.5. The output folder gets report.html/report.md (what every number means: the "Reading the
report" guide), metrics.json, figures and predictions.csv (the input of qing compare).
"""

_log = logging.getLogger("qing.cli")

_SPLITS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluation report of a model on labelled images",
        description="Evaluate a model on a labelled folder, CSV or list file and write the report.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_model_argument(parser)
    parser.add_argument("data", metavar="DATA", type=Path, help="class folders, labels CSV or list file")
    add_data_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("-o", "--output", type=Path, metavar="DIR", help="report folder (default: eval-<DATA name>)")
    out.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty report folder")
    out.add_argument("--threshold", metavar="P", help="decision threshold(s) instead of the model's (comma-separated)")
    out.add_argument(
        "--n-bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples of the AUROC and PR-AUC intervals",
    )
    out.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the bootstrap")
    add_calibration_flags(out)
    add_progress_flag(out)
    add_device_flags(parser)
    add_runtime_flags(parser)
    add_common_flags(parser)
    parser.set_defaults(func=run)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """How DATA is read (``qing eval`` and ``qing compare``): split, CSV columns, image folder."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--split",
        choices=sorted(_SPLITS),
        help="which split: the run's recorded one (splits.csv) for the data it trained on, else DATA's own "
        "train/val/test folders or split column (default: test where DATA has splits)",
    )
    data.add_argument("--split-column", metavar="COLUMN", help="CSV column assigning rows to train/val/test")
    data.add_argument(
        "--path-column", default="path", metavar="COLUMN", help="CSV column with the image path (default: path)"
    )
    data.add_argument(
        "--label-column", metavar="COLUMN", help="CSV column with a class name per row (default: 'label' if present)"
    )
    data.add_argument(
        "--label-separator",
        metavar="SEP",
        help="separator of several findings in --label-column, as in 'Effusion;Mass' "
        "(default: '|' where a value holds one, as NIH's 'Finding Labels')",
    )
    data.add_argument("--image-dir", type=Path, metavar="DIR", help="folder the CSV / list-file paths start from")


# ---- reading the labelled data ---------------------------------------------------------------------


def _match(name: str, choices: list[str]) -> Optional[str]:
    if name in choices:
        return name
    folded = [c for c in choices if c.lower() == name.lower()]
    return folded[0] if len(folded) == 1 else None


def _class_folder(data: Path, split: Optional[str]) -> Path:
    present = [name for names in _SPLITS.values() for name in names if (data / name).is_dir()]
    if not present:
        if split is not None:
            raise CLIError(f"--split {split}: {data} has no train/val/test folders, only class folders")
        return data
    wanted = split or "test"
    folder = next((data / n for n in _SPLITS[wanted] if (data / n).is_dir()), None)
    if folder is None:
        raise CLIError(f"{data} has no {wanted} folder (found {', '.join(present)}); choose one with --split")
    return folder


def _class_targets(
    items: list[tuple[Path, str]], classes: list[str], loaded: LoadedModel, source: str
) -> tuple[list[Any], Optional[str]]:
    """Targets of class-name data for the model's task, and the binary negative class name."""
    labels, task = loaded.labels, loaded.task
    if task == "multilabel":
        raise CLIError(
            f"{loaded.name} has {len(labels)} outputs (multilabel: {', '.join(labels[:4])}"
            f"{', ...' if len(labels) > 4 else ''}) but {source} has {len(classes)} classes ({', '.join(classes)}); "
            "evaluate it on a CSV or list file with one 0/1 column per output"
        )
    if task == "binary":
        if len(classes) > 2:
            raise CLIError(
                f"{loaded.name} is a binary model ({labels[0]} or not) but {source} has {len(classes)} classes "
                f"({', '.join(classes)}); give data with two classes"
            )
        positive = _match(labels[0], classes)
        if positive is None and labels[0] == default_label_names(1)[0] and len(classes) == 2:
            negatives = [c for c in classes if c.lower() in NEGATIVE_CLASS_NAMES]
            positive = next(c for c in classes if c not in negatives[:1]) if negatives else classes[1]
        if positive is None:
            raise CLIError(
                f"the positive class of {loaded.name}, {labels[0]!r}, is not a class of {source} "
                f"({', '.join(classes)}); rename the class folder or column value to {labels[0]!r}"
            )
        negative = next((c for c in classes if c != positive), None)
        return [int(name == positive) for _, name in items], negative
    unknown = [c for c in classes if _match(c, labels) is None]
    if unknown:
        raise CLIError(
            f"{source} has classes the model does not predict: {', '.join(unknown)}; "
            f"{loaded.name} has {len(labels)} outputs ({', '.join(labels)})"
        )
    return [labels.index(_match(name, labels)) for _, name in items], None


def read_samples(
    args: argparse.Namespace, loaded: LoadedModel, record: Optional[Path] = None
) -> tuple[list[Any], Optional[str], str]:
    """``(samples, binary negative class name, description)`` of DATA for the model's outputs.

    With ``--split`` and the split record of the model's run (``record``) that matches DATA, the
    samples are the images the run put in that split.
    """
    data: Path = args.data
    if not data.exists():
        raise CLIError(f"DATA {data} does not exist; give a folder of class folders, a labels CSV or a list file")
    if args.split is not None and record is not None:
        recorded = _recorded_split(record, args.split, _data_folder(args))
        if recorded is not None:
            return _recorded_samples(recorded, loaded, f"the {args.split} split of {short_path(record)}")
    if data.is_dir():
        folder = _class_folder(data, args.split)
        items, classes = read_class_folders(folder)
        targets, negative = _class_targets(items, classes, loaded, f"{folder}")
        return [Sample(p, t) for (p, _), t in zip(items, targets)], negative, f"{folder} ({len(items)} images)"
    if data.suffix.lower() == ".csv":
        return _read_csv(args, loaded)
    if loaded.task == "multiclass":
        raise CLIError(f"list file {data} holds 0/1 columns but {loaded.name} is a multiclass model")
    samples, _ = read_list_file(data, image_dir=args.image_dir, label_names=loaded.labels)
    if loaded.task == "binary":
        samples = [Sample(s.path, s.target[0], s.patient) for s in samples]
    return samples, None, f"{data} ({len(samples)} images)"


def _read_csv(args: argparse.Namespace, loaded: LoadedModel) -> tuple[list[Any], Optional[str], str]:
    data: Path = args.data
    with open(data, newline="", encoding="utf-8-sig") as f:
        header = [name.strip() for name in next(csv.reader(f), [])]
    label_column, label_columns = args.label_column, None
    if args.label_separator is not None and label_column is None:
        raise CLIError("--label-separator needs --label-column (the column holding the separated findings)")
    if label_column is None:
        if loaded.task != "multiclass" and all(name in header for name in loaded.labels):
            label_columns = list(loaded.labels)
        elif loaded.task == "multilabel" and NIH_FINDINGS_COLUMN in header:
            label_column = NIH_FINDINGS_COLUMN
        elif "label" in header:
            label_column = "label"
        else:
            raise CLIError(
                f"{data} has neither a 0/1 column per model output ({', '.join(loaded.labels[:4])}"
                f"{', ...' if len(loaded.labels) > 4 else ''}) nor a 'label' column; name the class column with "
                f"--label-column (columns: {', '.join(header)})"
            )
    if args.split is not None and args.split_column is None:
        raise CLIError("--split needs --split-column for a CSV (the column holding train/val/test)")
    rows, names = read_label_csv(
        data,
        image_dir=args.image_dir,
        path_column=args.path_column,
        label_column=label_column,
        label_columns=label_columns,
        label_separator=args.label_separator,
        split_column=args.split_column,
    )
    if args.split_column:
        wanted = _SPLITS[args.split or "test"]
        rows = [r for r in rows if (r.split or "").lower() in wanted]
        if not rows:
            raise CLIError(f"no rows of {data} have {args.split_column} in {', '.join(wanted)}")
    source = f"{data}" + (f" ({args.split_column} = {args.split or 'test'})" if args.split_column else "")
    if label_columns is not None:
        targets: list[Any] = [r.labels[0] if loaded.task == "binary" else r.labels for r in rows]
        negative = None
    elif rows and isinstance(rows[0].labels, tuple):  # separated findings ("Effusion|Mass"): by the model's names
        if loaded.task != "multilabel":
            raise CLIError(
                f"{label_column!r} of {data} holds several findings per image; {loaded.name} is {loaded.task}"
            )
        where = {name: i for i, name in enumerate(names)}
        targets = [tuple(r.labels[where[n]] if n in where else 0 for n in loaded.labels) for r in rows]
        negative = None
    else:
        classes = sorted({r.labels for r in rows})
        targets, negative = _class_targets([(r.path, r.labels) for r in rows], classes, loaded, source)
    return [Sample(r.path, t) for r, t in zip(rows, targets)], negative, f"{source} ({len(rows)} images)"


# ---- a run's recorded split ------------------------------------------------------------------------


def find_split_record(model: str) -> Optional[Path]:
    """The ``splits.csv`` of the run a MODEL argument comes from (a run folder or its checkpoints/best)."""
    path = Path(model.removeprefix("local-dir:")).expanduser()
    if not path.is_dir():
        return None
    for folder in (path, path.parent.parent):
        if (folder / SPLIT_RECORD).is_file():
            return folder / SPLIT_RECORD
    marker = read_marker(path.parent)  # a checkpoint folder outside the run folder (checkpoint_dir)
    if marker is not None and (Path(marker["run"]) / SPLIT_RECORD).is_file():
        return Path(marker["run"]) / SPLIT_RECORD
    return None


def _data_folder(args: argparse.Namespace) -> Path:
    """The folder DATA's image paths start from: DATA itself, --image-dir, or the CSV / list file's folder."""
    if args.data.is_dir():
        return args.data
    return args.image_dir if args.image_dir is not None else args.data.parent


def _recorded_split(record: Path, split: str, base: Path) -> Optional[list[tuple[Path, RecordedImage]]]:
    """The recorded images of ``split`` found under ``base``; ``None`` when DATA is other data than the run's."""
    rows = read_split_record(record, splits=(split,))
    if not rows:
        raise CLIError(f"{record} lists no {split} images")
    found, missing = [], []
    for row in rows:
        path = base / row.relative_path if row.relative_path else None
        if path is not None and path.is_file():
            found.append((path, row))
        else:
            missing.append(row.relative_path or str(row.path))
    if not found:
        return None  # other data: DATA's own splits apply
    if missing:
        raise CLIError(
            f"{len(missing)} of the {len(rows)} {split} images recorded in {record} are not under {base} "
            f"(e.g. {missing[0]}); give the data the run trained on, as it was"
        )
    return found


def _recorded_samples(
    found: list[tuple[Path, RecordedImage]], loaded: LoadedModel, source: str
) -> tuple[list[Any], Optional[str], str]:
    if loaded.task == "multilabel":
        unknown = sorted({name for _, r in found for name in r.labels} - set(loaded.labels))
        if unknown:
            raise CLIError(f"{source} has labels the model does not predict: {', '.join(unknown)}")
        targets: list[Any] = [tuple(int(name in r.labels) for name in loaded.labels) for _, r in found]
        negative = None
    else:
        classes = sorted({r.label for _, r in found})
        targets, negative = _class_targets([(p, r.label) for p, r in found], classes, loaded, source)
    samples = [Sample(p, t, r.patient) for (p, r), t in zip(found, targets)]
    return samples, negative, f"{source} ({len(samples)} images)"


def _seen_in_training(record: Path, paths: list[Path], base: Path) -> dict[str, int]:
    """How many of ``paths`` the run trained and validated on (``{"train": n, "val": m}``)."""
    seen: dict[Path, str] = {}
    for row in read_split_record(record, splits=("train", "val")):
        seen[_real(row.path)] = row.split
        if row.relative_path:
            seen[_real(base / row.relative_path)] = row.split
    counts = {"train": 0, "val": 0}
    for path in paths:
        split = seen.get(_real(path))
        if split is not None:
            counts[split] += 1
    return counts


def _real(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except OSError:
        return Path(path).absolute()


# ---- running -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    out = args.output or Path(f"eval-{args.data.stem or 'data'}")
    check_new_folder(out, overwrite=args.overwrite)
    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device, threshold=args.threshold, calibration=args.calibration)
    record = find_split_record(args.model)
    samples, negative, description = read_samples(args, loaded, record)
    if record is not None:
        seen = _seen_in_training(record, [s.path for s in samples], _data_folder(args))
        if seen["train"] or seen["val"]:
            _log.warning(
                "%d of the %d images were used to train (%d) or validate (%d) this model, so its metrics on "
                "them are optimistic; evaluate on held-out images (qing eval %s DATA --split test takes the "
                "run's test split)",
                seen["train"] + seen["val"], len(samples), seen["train"], seen["val"], args.model,
            )  # fmt: skip
    transform = loaded.transform()
    dataset = CXRDataset(samples, task=loaded.task, transform=transform)

    runner = build_runner(loaded, args, device, check_images=[s.path for s in samples[:4]])
    loader = inference_loader(dataset, device=runner.device, batch_size=args.batch_size, num_workers=args.num_workers)
    outputs = collect_logits(runner, loader, progress=args.progress, desc="eval")
    bad_files = BadFileLog()
    for bad in outputs.bad:
        bad_files.add(bad.path, bad.reason)
    if not len(outputs.indices):
        raise CLIError(f"none of the {len(dataset)} images of {description} could be read")
    method = loaded.threshold_method
    if loaded.threshold_source == "--threshold":
        method = "given (--threshold)"
    evaluation = evaluate_logits(
        outputs.logits,
        dataset.targets[outputs.indices],
        task=loaded.task,
        label_names=loaded.labels,
        thresholds=loaded.thresholds or None,
        threshold_method=method,
        temperatures=loaded.temperatures,
        temperature_source="stored with the model",
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
        negative_label=negative,
    )
    if args.tta:
        evaluation.metrics["notes"].append(
            "Test-time augmentation: probabilities averaged over 7 views (identity, 4% shifts, zooms 0.95 and 1.05)."
        )
    shown = None
    if loaded.model is None:
        note = "qing: note: the report has no Grad-CAM, attention or feature-map figures: they need the PyTorch model"
        print(note, file=sys.stderr)
    explainable = loaded.has_attention or loaded.has_cnn_stage
    if explainable:  # the report's Grad-CAM and attention figures: the first readable images
        items = [dataset[i] for i in outputs.indices[:4].tolist()]
        images = [item["image"] for item in items if not isinstance(item, BadImage)]
        shown = torch.stack(images) if images else None
    report = evaluation.write_report(
        out,
        model=loaded.model if explainable else None,
        images=shown,
        mean=transform.mean,
        std=transform.std,
        bad_files=bad_files,
        title=f"{args.model} on {args.data.name}",
    )
    paths = [str(dataset.samples[i].path) for i in outputs.indices.tolist()]
    write_text_atomic(out / "predictions.csv", _predictions_csv(paths, evaluation.targets, evaluation.probs, loaded))
    _print_summary(evaluation.metrics, loaded, description, len(bad_files))
    print(f"report: {short_path(report)}")
    if bad_files:
        print(f"qing: error: {len(bad_files)} image(s) could not be read (listed in the report)", file=sys.stderr)
        return 1
    return 0


def _predictions_csv(paths: list[str], targets: np.ndarray, probs: np.ndarray, loaded: LoadedModel) -> str:
    """``path``, the targets, the probabilities and the decisions (the columns ``qing compare`` reads)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if loaded.task == "multiclass":
        writer.writerow(["path", "target", *(f"prob_{n}" for n in loaded.labels), "predicted"])
        for path, t, p in zip(paths, targets, probs):
            predicted = loaded.labels[int(np.argmax(p))]
            writer.writerow([path, loaded.labels[int(t)], *(repr(float(v)) for v in p), predicted])
    else:
        writer.writerow([
            "path", *(f"target_{n}" for n in loaded.labels), *(f"prob_{n}" for n in loaded.labels),
            *(f"positive_{n}" for n in loaded.labels),
        ])  # fmt: skip
        for path, t, p in zip(paths, targets, probs):
            decisions = [int(v >= th) for v, th in zip(p, loaded.thresholds)]
            writer.writerow([path, *(int(v) for v in np.atleast_1d(t)), *(repr(float(v)) for v in p), *decisions])
    return buffer.getvalue()


def _print_summary(metrics: dict[str, Any], loaded: LoadedModel, description: str, n_bad: int) -> None:
    ci = metrics.get("roc_auc_ci")
    interval = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    print(f"{loaded.name} on {description}" + (f", {n_bad} unreadable" if n_bad else ""))
    print(f"  AUROC {format_value(metrics.get('roc_auc'))}{interval}, PR-AUC {format_value(metrics.get('pr_auc'))}")
    print(
        f"  accuracy {format_value(metrics.get('accuracy'))}, sensitivity {format_value(metrics.get('sensitivity'))}, "
        f"specificity {format_value(metrics.get('specificity'))}, F1 {format_value(metrics.get('f1'))}"
    )
    print(
        f"  calibration: ECE {format_value(metrics.get('ece'))}, Brier {format_value(metrics.get('brier'))}"
        f" ({loaded.calibration_source})"
    )
    print(f"  thresholds: {loaded.threshold_source}")
