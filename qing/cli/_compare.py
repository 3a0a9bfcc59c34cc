"""``qing compare A B [DATA]``: two models (or two prediction CSVs) on the same labelled images, tested per label."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np

from qing._format import format_value
from qing.cli._common import (
    CLIError,
    HelpFormatter,
    add_calibration_flags,
    add_common_flags,
    add_device_flags,
    add_progress_flag,
    check_new_folder,
    load_model,
    resolve_device,
    short_path,
)
from qing.cli._eval import add_data_arguments, read_samples
from qing.cli._inference import inference_loader
from qing.data import CXRDataset, build_transforms
from qing.evaluate import TTAModel, collect_logits, compare

EPILOG = """\
examples:
  qing compare runs/hybrid runs/densenet121 data/chest_xray           # DATA/test/<CLASS>/*
  qing compare runs/nih-a runs/nih-b nih/labels.csv --split-column split --split test
  qing compare eval-a/predictions.csv eval-b/predictions.csv          # qing eval outputs: targets inside
  qing compare a.csv b.csv data/chest_xray --names hybrid,densenet    # qing predict outputs + labels

A and B are models (anything qing eval takes) or prediction CSVs written by qing predict or qing eval
(path, prob_<label> columns; positive_<label> or predicted decisions). DATA gives the labels, read as
qing eval reads it; it may be left out when both CSVs come from qing eval (they hold the targets).
Only images both A and B predicted are compared (the others are counted). Per label: AUROC of each,
the difference with DeLong's 95% interval and p-value, a paired-bootstrap interval, and McNemar's test
at each model's own threshold. The output folder gets report.html/report.md, comparison.json and
roc_comparison.png.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="paired comparison of two models on the same images (DeLong, bootstrap, McNemar)",
        description="Compare two models, or two prediction CSVs, on the same labelled images; write the report.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model_a", metavar="A", help="model (folder, hf-hub:, registered name) or predictions CSV")
    parser.add_argument("model_b", metavar="B", help="the other model or predictions CSV")
    parser.add_argument(
        "data", metavar="DATA", type=Path, nargs="?", help="labelled images (optional with two qing eval CSVs)"
    )
    add_data_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("-o", "--output", type=Path, metavar="DIR", help="report folder (default: compare-<A>-vs-<B>)")
    out.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty report folder")
    out.add_argument("--names", metavar="A,B", help="the two models' names in the report (default: from A and B)")
    out.add_argument("--n-bootstrap", type=int, default=1000, metavar="N", help="paired bootstrap resamples")
    out.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the bootstrap")
    add_calibration_flags(out)
    add_progress_flag(out)
    add_device_flags(parser)
    add_common_flags(parser)
    parser.set_defaults(func=run)


@dataclass
class Scored:
    """One side of the comparison: probabilities (and decisions) per image path."""

    name: str
    labels: list[str]
    task: str
    probs: dict[str, np.ndarray]
    decisions: Optional[dict[str, np.ndarray]] = None
    thresholds: Optional[list[float]] = None
    targets: Optional[dict[str, Any]] = None
    how: str = ""


def _key(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _is_csv(spec: str) -> bool:
    return spec.lower().endswith(".csv") and Path(spec).is_file()


def read_predictions_csv(path: Path, name: str) -> Scored:
    """A predictions CSV of ``qing predict`` or ``qing eval``: probabilities, decisions and (eval) targets."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        header = list(rows[0]) if rows else []
    labels = [c[len("prob_") :] for c in header if c.startswith("prob_")]
    if "path" not in header or not labels:
        raise CLIError(
            f"{path} is not a qing predictions CSV: it needs a 'path' column and prob_<label> columns "
            f"(found {', '.join(header) or 'no header'})"
        )
    task = "multiclass" if ("predicted" in header or "target" in header) else "binary" if len(labels) == 1 else None
    task = task or "multilabel"
    probs, decisions, targets = {}, {}, {}
    has_decisions = "predicted" in header or all(f"positive_{n}" in header for n in labels)
    has_targets = "target" in header or all(f"target_{n}" in header for n in labels)
    for row in rows:
        if (row.get("error") or "").strip() or not all(row.get(f"prob_{n}") for n in labels):
            continue  # an unreadable image: no prediction
        key = _key(row["path"])
        probs[key] = np.array([float(row[f"prob_{n}"]) for n in labels])
        if has_decisions and task != "multiclass":
            decisions[key] = np.array([int(row[f"positive_{n}"]) for n in labels])
        if has_targets:
            if task == "multiclass":
                if row["target"] not in labels:
                    raise CLIError(f"{path}: target {row['target']!r} is not one of its labels {labels}")
                targets[key] = labels.index(row["target"])
            else:
                targets[key] = np.array([int(row[f"target_{n}"]) for n in labels])
    if not probs:
        raise CLIError(f"{path} holds no predictions")
    how = "positive_<label> columns of the CSV" if decisions else "0.5 (the CSV has no decisions)"
    return Scored(
        name, labels, task, probs, decisions or None, None, targets or None, "argmax" if task == "multiclass" else how
    )


def _default_name(spec: str) -> str:
    path = Path(spec)
    if spec.lower().endswith(".csv"):
        return path.parent.name or path.stem if path.stem == "predictions" else path.stem
    if path.name in ("best", "last") and path.parent.name == "checkpoints":
        return path.parent.parent.name
    return path.name or spec


def _score_model(spec: str, name: str, args: argparse.Namespace, samples: list[Any], device: Any) -> Scored:
    loaded = load_model(spec, device=device, calibration=args.calibration)
    transform = build_transforms(loaded.model, train=False)
    dataset = CXRDataset(samples, task=loaded.task, transform=transform)
    loader = inference_loader(dataset, device=device, batch_size=args.batch_size, num_workers=args.num_workers)
    model = TTAModel(loaded.model, task=loaded.task).eval() if args.tta else loaded.model
    outputs = collect_logits(model, loader, device=device, progress=args.progress, desc=name)
    for bad in outputs.bad:
        print(f"qing: skipped {bad.path} for {name}: {bad.reason}", file=sys.stderr)
    probs = loaded.probabilities(outputs.logits) if len(outputs.indices) else np.zeros((0, len(loaded.labels)))
    keys = [_key(str(samples[i].path)) for i in outputs.indices.tolist()]
    how = "argmax" if loaded.task == "multiclass" else f"thresholds {loaded.threshold_source}"
    return Scored(name, loaded.labels, loaded.task, dict(zip(keys, probs)), None, loaded.thresholds, None, how)


def _reference(spec_a: str, spec_b: str, args: argparse.Namespace, device: Any) -> SimpleNamespace:
    """Labels and task to read DATA with: the first model's, else the first CSV's."""
    for spec in (spec_a, spec_b):
        if not _is_csv(spec):
            loaded = load_model(spec, device=device, calibration=args.calibration)
            return SimpleNamespace(name=spec, labels=loaded.labels, task=loaded.task)
    table = read_predictions_csv(Path(spec_a), spec_a)
    return SimpleNamespace(name=spec_a, labels=table.labels, task=table.task)


def _align(side: Scored, labels: list[str], task: str) -> Scored:
    """``side`` with its columns in the order of ``labels``; an error if its outputs differ."""
    if side.task != task or sorted(side.labels) != sorted(labels):
        raise CLIError(
            f"{side.name} predicts {side.task} outputs ({', '.join(side.labels)}) but the comparison is of {task} "
            f"outputs ({', '.join(labels)}); both models must predict the same labels"
        )
    if side.labels == labels:
        return side
    order = [side.labels.index(n) for n in labels]
    side.probs = {k: v[order] for k, v in side.probs.items()}
    if side.decisions:
        side.decisions = {k: v[order] for k, v in side.decisions.items()}
    if side.targets and task != "multiclass":
        side.targets = {k: v[order] for k, v in side.targets.items()}
    if side.thresholds:
        side.thresholds = [side.thresholds[i] for i in order]
    side.labels = list(labels)
    return side


def run(args: argparse.Namespace) -> int:
    names = args.names.split(",") if args.names else [_default_name(args.model_a), _default_name(args.model_b)]
    if len(names) != 2 or not all(names):
        raise CLIError(f"--names takes two comma-separated names, got {args.names!r}")
    if names[0] == names[1]:
        names = [f"{names[0]} (A)", f"{names[1]} (B)"]
    out = args.output or Path(f"compare-{names[0]}-vs-{names[1]}".replace(" ", "_").replace("/", "_"))
    check_new_folder(out, overwrite=args.overwrite)
    for spec in (args.model_a, args.model_b):
        if spec.lower().endswith(".csv") and not Path(spec).is_file():
            raise CLIError(f"predictions CSV not found: {spec}")
    device = resolve_device(args.device)
    csvs = [_is_csv(s) for s in (args.model_a, args.model_b)]
    if args.data is None and not all(csvs):
        raise CLIError("give DATA (the labelled images) to run a model on; only two qing eval CSVs can do without")

    targets: dict[str, Any] = {}
    samples: list[Any] = []
    if args.data is not None:
        ref = _reference(args.model_a, args.model_b, args, device)
        samples, _, description = read_samples(args, ref)
        labels, task = list(ref.labels), ref.task
        targets = {_key(str(s.path)): s.target for s in samples}
    sides = []
    for spec, name, is_csv in zip((args.model_a, args.model_b), names, csvs):
        if is_csv:
            sides.append(read_predictions_csv(Path(spec), name))
        else:
            sides.append(_score_model(spec, name, args, samples, device))
    if args.data is None:
        labels, task = sides[0].labels, sides[0].task
        if not sides[0].targets:
            raise CLIError(f"{args.model_a} has no target_<label> columns (a qing predict CSV): give DATA")
        targets = dict(sides[0].targets)
        description = f"the targets of {args.model_a}"
    a, b = (_align(side, labels, task) for side in sides)

    common = sorted(k for k in targets if k in a.probs and k in b.probs)  # one order whatever the inputs
    missing = {side.name: sum(1 for k in targets if k not in side.probs) for side in (a, b)}
    if not common:
        raise CLIError(
            f"no image has predictions from both {a.name} and {b.name} and a label ({description}); "
            "check that the CSV paths name the same files as DATA"
        )
    for name, count in missing.items():
        if count:
            print(
                f"qing: warning: {name} has no prediction for {count} of {len(targets)} images; left out",
                file=sys.stderr,
            )
    t = [targets[k] for k in common]
    y = np.asarray(t, dtype=np.int64)
    result = compare(
        y,
        np.stack([a.probs[k] for k in common]),
        np.stack([b.probs[k] for k in common]),
        task=task,
        label_names=labels,
        thresholds_a=a.thresholds if a.decisions is None and task != "multiclass" else None,
        thresholds_b=b.thresholds if b.decisions is None and task != "multiclass" else None,
        decisions_a=np.stack([a.decisions[k] for k in common]) if a.decisions else None,
        decisions_b=np.stack([b.decisions[k] for k in common]) if b.decisions else None,
        names=(a.name, b.name),
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
    )
    result.settings["decisions_a"], result.settings["decisions_b"] = a.how, b.how
    if args.tta:
        result.settings["tta"] = "models run with test-time augmentation (7 views)"
    for name, count in missing.items():
        if count:
            result.notes.append(f"{name} had no prediction for {count} of {len(targets)} labelled images (left out).")
    report = result.write_report(out, title=f"{a.name} vs {b.name} on {len(common)} images")
    _print(result)
    print(f"report: {short_path(report)}")
    return 0


def _print(result: Any) -> None:
    a, b = result.names
    print(f"{a} (A) vs {b} (B) on {result.n_samples} images")
    for row in result.per_label:
        if row["delong"] is None:
            print(f"  {row['label']}: {row['note']}")
            continue
        d, boot = row["delong"], row["bootstrap"] or {}
        p = d["p_value"]
        p_text = format_value(p) if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")
        line = (
            f"  {row['label']}: AUROC {row['auroc_a']:.3f} vs {row['auroc_b']:.3f}, difference {row['difference']:+.3f}"
            f" (DeLong 95% CI {d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}, p {p_text}"
        )
        if boot.get("ci"):
            line += f"; bootstrap {boot['ci'][0]:+.3f} to {boot['ci'][1]:+.3f}"
        line += ")"
        if row.get("mcnemar"):
            m = row["mcnemar"]
            line += f"; McNemar {m['only_a_right']} vs {m['only_b_right']}, p {m['p_value']:.3f}"
        print(line)
    if result.mcnemar:
        m = result.mcnemar
        print(f"  argmax: McNemar {m['only_a_right']} vs {m['only_b_right']}, p {m['p_value']:.3f}")
