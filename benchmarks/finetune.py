"""Fine-tuning accuracy: qing_densenet121_tr2 (qing's default recipe) against timm's densenet121, one protocol.

Both models are trained by the same :class:`qing.train.Trainer` on the same patient-grouped
train/val/test split, at the same image size, with the same augmentation, batch size, epoch
budget, early stopping and preprocessing; only the model and the optimizer recipe differ:

* ``qing_densenet121_tr2`` with qing's default recipe: ``TrainConfig()``'s own values
  (AdamW, lr 1e-4, weight decay 0.01, cosine with one warmup epoch, nothing frozen).
* ``densenet121`` (timm) with a standard timm fine-tuning recipe, written out in
  :data:`BASELINE_RECIPE` (AdamW, lr 1e-4, weight decay 0.05, cosine with one warmup epoch).

Initialization: both start from the same DenseNet121 weights file. ``--init auto`` uses timm's
``densenet121.tv_in1k`` ImageNet weights when they are already in the Hugging Face cache (nothing
is downloaded), else a randomly initialized DenseNet121 (timm's init, seeded per run seed) saved
once per seed, so the hybrid's backbone and the plain DenseNet start from identical tensors.
The hybrid's token projection, encoder and head start from random init (seeded the same way).

The decision threshold is chosen on validation (Youden's J) and applied to test; the test AUROC
has a bootstrap 95% interval. Several seeds (weights init, data order, augmentation; the split
stays fixed) give mean and standard deviation. Each run is kept under ``--work-dir`` with its
``result.json``; ``--reuse`` skips runs already done (an interrupted benchmark continues).

    python benchmarks/finetune.py pneumonia200   # binary, cxr-pneumonia-200, 128 px
    python benchmarks/finetune.py nih14          # 14 labels, nih-cxr14-64px, 64 px
    python benchmarks/finetune.py cache          # epoch time with and without the in-memory cache
    python benchmarks/finetune.py pneumonia200 --compare-amp --models qing_densenet121_tr2   # bf16 vs fp32

``--compare-amp`` trains each (model, seed) twice, in float32 and under bf16 autocast, from the same
init, and reports the paired test-AUROC difference against the spread over seeds and the training
speed of each (results ``finetune_<name>_amp_<device>.json``). On a CPU without bfloat16 instructions
the bf16 runs are forced (``QING_CPU_BF16=1``): the numbers (bf16 rounding) are those of a CPU that has
them, the speed is not.

Cross-validation (``--cv K``) compares any of :data:`CV_MODELS` (default: the residual hybrid
``qing_densenet121_r2``, the original design ``qing_densenet121_tr2`` and timm's ``densenet121``) on K
patient-grouped folds: every image is tested exactly once, each fold trains every model with the same
recipe (``TrainConfig()``'s defaults), epochs, data and initial weights, with the fold index as seed.
Every model starts from one DenseNet121 file per fold *including its classifier*, so the residual hybrid
starts as exactly the same function as ``densenet121`` (its gate is 0). Out-of-fold test probabilities are
pooled for one AUROC per model, and models are compared on the same images with a paired bootstrap that
resamples patients::

    python benchmarks/finetune.py pneumonia200 --cv 5 --img-size 96 --epochs 10
    python benchmarks/finetune.py nih14 --cv 5 --img-size 64 --epochs 8

Control experiments change one thing for a whole benchmark and get a suffix in the results name:
``--early-stopping-metric val_auroc`` (both models), ``--hybrid-recipe baseline`` (the hybrid trained
with :data:`BASELINE_RECIPE`), ``--hybrid-arg KEY=VALUE`` (a hybrid model argument).

Results go to ``benchmarks/results/finetune_<name>.json`` (``{"config", "rows", ...}``; rows carry
a ``phase``: ``summary``, ``per_seed`` and ``per_label`` for the accuracy runs, ``summary`` and
``epochs`` for the cache timing), rendered by the docs site.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the benchmark never downloads weights

import numpy as np
import torch
import yaml

from qing.evaluate import delong_test

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
HYBRID = "qing_densenet121_tr2"
BASELINE = "densenet121"
IMAGENET_REPO = "timm/densenet121.tv_in1k"
CHEXNET_LABELS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]  # fmt: skip

#: Datasets: DataConfig fields (paths relative to the data folder) and the default image size.
DATASETS: dict[str, dict[str, Any]] = {
    "pneumonia200": {
        "img_size": 128,
        "data": {
            "labels_csv": "cxr-pneumonia-200/manifest.csv",
            "label_column": "label",
            "patient_column": "patient",
            "test_fraction": 0.2,
            "val_fraction": 0.2,
            "split_seed": 42,
        },
    },
    "nih14": {
        "img_size": 64,
        "data": {
            "labels_csv": "nih-cxr14-64px/labels.csv",
            "label_columns": CHEXNET_LABELS,
            "patient_column": "patient",
            # the file's repo_split column shares patients between its splits (8 train/test,
            # 15 train/valid, 9 valid/test): split by patient instead
            "test_fraction": 0.2,
            "val_fraction": 0.2,
            "split_seed": 42,
        },
    },
}

#: The baseline's recipe: a standard timm AdamW + cosine fine-tune. Everything not named here
#: (epochs, batch, augmentation, early stopping, thresholds) is shared with the hybrid's run.
BASELINE_RECIPE: dict[str, Any] = {
    "optimizer": "adamw",
    "lr": 1e-4,
    "backbone_lr": None,
    "weight_decay": 0.05,
    "scheduler": "cosine",
    "warmup_epochs": 1.0,
    "min_lr": 1e-6,
    "freeze_backbone": False,
    "grad_clip_norm": None,
    "ema": False,
}
#: Recipe fields reported for both models.
RECIPE_FIELDS = (
    *BASELINE_RECIPE,
    "batch_size",
    "epochs",
    "early_stopping_metric",
    "early_stopping_patience",
    "model_args",
)

#: Models the cross-validation can compare: (backbone architecture, weight tag naming its layout).
CV_MODELS: dict[str, tuple[str, str]] = {
    "qing_densenet121_r2": ("densenet121", "tv_in1k"),
    "qing_densenet121_tr2": ("densenet121", "tv_in1k"),
    "densenet121": ("densenet121", "tv_in1k"),
    "qing_resnet50_r2": ("resnet50", "a1_in1k"),
    "qing_resnet50_tr2": ("resnet50", "a1_in1k"),
    "resnet50": ("resnet50", "a1_in1k"),
    # tiny: a smoke test of the protocol in seconds
    "qing_test_r1": ("test_resnet", "r160_in1k"),
    "qing_test_tr1": ("test_resnet", "r160_in1k"),
    "test_resnet": ("test_resnet", "r160_in1k"),
}
CV_DEFAULT_MODELS = ["qing_densenet121_r2", "qing_densenet121_tr2", "densenet121"]
#: Paired comparisons reported (first minus second), when both models ran.
CV_PAIRS = [
    ("qing_densenet121_r2", "densenet121"),
    ("qing_densenet121_r2", "qing_densenet121_tr2"),
    ("qing_densenet121_tr2", "densenet121"),
    ("qing_resnet50_r2", "resnet50"),
    ("qing_resnet50_r2", "qing_resnet50_tr2"),
    ("qing_resnet50_tr2", "resnet50"),
    ("qing_test_r1", "test_resnet"),
    ("qing_test_r1", "qing_test_tr1"),
]
CV_SPLIT_COLUMN = "cv_split"

_log = logging.getLogger("finetune")


# ---- setup -----------------------------------------------------------------------------------------


def data_config(name: str, data_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """DataConfig fields of a named dataset (paths made absolute) with ``overrides`` applied."""
    if name not in DATASETS:
        raise SystemExit(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    data = dict(DATASETS[name]["data"])
    for key in ("labels_csv", "root", "train_dir", "val_dir", "test_dir"):
        if data.get(key):
            data[key] = str(data_dir / data[key])
    data.update(overrides)
    path = Path(data.get("labels_csv") or data.get("root") or data.get("train_dir"))
    if not path.exists():
        raise SystemExit(
            f"dataset {name!r} not found at {path}; pass --data-dir (the folder holding {path.parent.name}/)"
        )
    return data


def find_imagenet_weights() -> Optional[Path]:
    """timm's ``densenet121.tv_in1k`` weights if they are already in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(IMAGENET_REPO, filename)
        if isinstance(path, str):
            return Path(path)
    return None


def init_weights(init: str, seed: int, work_dir: Path) -> tuple[Path, str]:
    """The DenseNet121 weights file both models start from, and what it is, in words."""
    if init in ("auto", "imagenet"):
        found = find_imagenet_weights()
        if found is not None:
            return found, f"ImageNet ({IMAGENET_REPO}, from the local Hugging Face cache)"
        if init == "imagenet":
            raise SystemExit(f"--init imagenet: {IMAGENET_REPO} is not in the Hugging Face cache (offline)")
    if init not in ("auto", "random"):
        path = Path(init)
        if not path.is_file():
            raise SystemExit(f"--init {init}: no such weights file")
        return path, f"weights file {path}"
    import timm
    from safetensors.torch import save_file
    from timm.utils import random_seed

    path = work_dir / "init" / f"densenet121_random_seed{seed}.safetensors"
    if not path.is_file():
        random_seed(seed, 0)
        model = timm.create_model(BASELINE, pretrained=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, "random (timm's DenseNet121 init; the same tensors for both models' DenseNet121 per seed)"


def train_config(
    model: str, *, seed: int, args: argparse.Namespace, data: dict[str, Any], init_file: Path, amp: Optional[str] = None
):
    """The TrainConfig of one run: qing's defaults for the hybrid, :data:`BASELINE_RECIPE` for DenseNet121."""
    from qing.train import TrainConfig

    shared = {
        "amp": amp or args.amp,
        "channels_last": args.channels_last,
        "img_size": args.img_size,
        "epochs": args.epochs,
        "seed": seed,
        "pretrained": True,
        "pretrained_file": str(init_file),
        "data": dict(data, cache_images=args.cache_images),
        "output_dir": str(_run_dir(args, model, seed, amp)),
        "overwrite": True,
        "tensorboard": False,
        "progress": False,
        "log_images": 0,
        "n_bootstrap": args.n_bootstrap,
        "device": args.device,
    }
    if args.early_stopping_metric:
        shared["early_stopping_metric"] = args.early_stopping_metric
    if model == HYBRID:
        recipe = BASELINE_RECIPE if args.hybrid_recipe == "baseline" else {}
        return TrainConfig(model=f"{HYBRID}.tv_in1k", model_args=dict(args.hybrid_arg), **recipe, **shared)
    # timm's densenet121.tv_in1k cfg center-crops 87.5%; give it the hybrid's squash resize of the whole image.
    same_preprocessing = dict(pretrained_cfg_overlay=dict(crop_pct=1.0, crop_mode="squash"))
    return TrainConfig(model=f"{BASELINE}.tv_in1k", model_args=same_preprocessing, **BASELINE_RECIPE, **shared)


def _variant(args: argparse.Namespace) -> str:
    """Suffix naming a protocol change from the defaults (run folders and the results file)."""
    suffix = f"_stop_{args.early_stopping_metric}" if args.early_stopping_metric else ""
    suffix += "_hybrid_baseline_recipe" if args.hybrid_recipe == "baseline" else ""
    return suffix + "".join(f"_hybrid_{k}_{v}" for k, v in args.hybrid_arg.items())


def _run_dir(args: argparse.Namespace, model: str, seed: int, amp: Optional[str] = None) -> Path:
    return args.work_dir / f"{args.dataset}{_variant(args)}" / f"{model}_seed{seed}{f'_amp_{amp}' if amp else ''}"


# ---- one run -------------------------------------------------------------------------------------


def run_one(
    model: str, seed: int, args: argparse.Namespace, data: dict[str, Any], amp: Optional[str] = None
) -> dict[str, Any]:
    """Train and test one (model, seed); the result is cached in the run folder's ``result.json``."""
    cached = _run_dir(args, model, seed, amp) / "result.json"
    if args.reuse and cached.is_file():
        _log.info("reusing %s", cached)
        return json.loads(cached.read_text())
    from qing.train import Trainer

    init_file, init_text = init_weights(args.init, seed, args.work_dir)
    config = train_config(model, seed=seed, args=args, data=data, init_file=init_file, amp=amp)
    trainer = Trainer(config)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    metrics = result.test_metrics
    epoch_times = [h["epoch_time_s"] for h in result.history]
    record = {
        "model": model,
        "seed": seed,
        "amp": config.amp,
        "amp_dtype": str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype else "float32",
        "channels_last": config.channels_last,
        "init": init_text,
        "init_file": str(init_file),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_completed,
        "stopped_early": result.stopped_early,
        "best_val_loss": result.best_value,
        "thresholds": result.thresholds,
        "test": {k: metrics.get(k) for k in ("roc_auc", "roc_auc_ci", "accuracy", "sensitivity", "specificity",
                                             "f1", "pr_auc", "n_samples")},
        "per_label": [
            {k: row[k] for k in ("label", "n_positive", "roc_auc", "roc_auc_ci", "threshold")}
            for row in metrics["per_label"]
        ],
        "history": result.history,
        "wall_s": wall,
        "epoch_s_median": statistics.median(epoch_times),
        "epoch_s_min": min(epoch_times),
        "train_images_per_s_median": statistics.median(h["train_images_per_s"] for h in result.history),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "recipe": {k: getattr(config, k) for k in RECIPE_FIELDS},
        "model_name": config.model,
        "recipe_name": _recipe_name(model, args.hybrid_recipe),
    }  # fmt: skip
    cached.write_text(json.dumps(record, indent=2))
    return record


# ---- aggregation -----------------------------------------------------------------------------------


def _mean_sd(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return round(statistics.fmean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else None


def _r(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def summary_rows(records: list[dict[str, Any]], multilabel: bool) -> list[dict[str, Any]]:
    """Mean and sd over seeds per model, plus one row per seed."""
    rows = []
    for model in _models(records):
        runs = [r for r in records if r["model"] == model]
        row: dict[str, Any] = {"phase": "summary", "model": model, "recipe": _recipe_of(runs), "seeds": len(runs)}
        auroc = "mean_auroc" if multilabel else "auroc"
        for key, name in (("roc_auc", auroc), ("accuracy", "accuracy"), ("sensitivity", "sensitivity"),
                          ("specificity", "specificity")):  # fmt: skip
            row[f"{name}_mean"], row[f"{name}_sd"] = _mean_sd([r["test"][key] for r in runs])
        row["epochs_run_mean"] = _mean_sd([r["epochs_run"] for r in runs])[0]
        row["wall_s_mean"] = round(statistics.fmean(r["wall_s"] for r in runs), 1)
        rows.append(row)
    for r in records:
        ci = r["test"]["roc_auc_ci"] or [None, None]
        rows.append({
            "phase": "per_seed",
            "model": r["model"],
            "seed": r["seed"],
            "auroc": _r(r["test"]["roc_auc"]),
            "auroc_ci_low": _r(ci[0]),
            "auroc_ci_high": _r(ci[1]),
            "accuracy": _r(r["test"]["accuracy"]),
            "sensitivity": _r(r["test"]["sensitivity"]),
            "specificity": _r(r["test"]["specificity"]),
            "threshold": _r(r["thresholds"][0]) if r["thresholds"] and not multilabel else None,
            "best_epoch": r["best_epoch"],
            "epochs_run": r["epochs_run"],
            "epoch_s_median": round(r["epoch_s_median"], 1),
            "wall_s": round(r["wall_s"], 1),
        })  # fmt: skip
    return rows


def per_label_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The CheXNet table: test AUROC per label, mean and sd over seeds, both models."""
    labels = [row["label"] for row in records[0]["per_label"]]
    rows = []
    for j, label in enumerate(labels):
        row: dict[str, Any] = {
            "phase": "per_label",
            "label": label,
            "n_test_positive": records[0]["per_label"][j]["n_positive"],
        }
        for model in (HYBRID, BASELINE):
            values = [r["per_label"][j]["roc_auc"] for r in records if r["model"] == model]
            row[f"{model}_auroc"], row[f"{model}_sd"] = _mean_sd(values)
        a, b = row[f"{HYBRID}_auroc"], row[f"{BASELINE}_auroc"]
        row["difference"] = round(a - b, 4) if a is not None and b is not None else None
        rows.append(row)
    return rows


def comparison(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Hybrid minus baseline test AUROC, paired by seed."""
    by_seed = {}
    for r in records:
        by_seed.setdefault(r["seed"], {})[r["model"]] = r["test"]["roc_auc"]
    diffs = [
        v[HYBRID] - v[BASELINE] for v in by_seed.values() if v.get(HYBRID) is not None and v.get(BASELINE) is not None
    ]
    mean, sd = _mean_sd(diffs)
    return {
        "auroc_difference_per_seed": [round(d, 4) for d in diffs],
        "auroc_difference_mean": mean,
        "auroc_difference_sd": sd,
        "hybrid_wins": sum(d > 0 for d in diffs),
        "seeds": len(diffs),
        "hybrid_at_least_as_good (mean)": None if mean is None else mean >= 0,
    }


# ---- cross-validation ------------------------------------------------------------------------------


def _read_rows(data: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """The dataset CSV's rows and the fieldnames."""
    with open(data["labels_csv"], newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames or [])


def _strata(row: dict[str, str], data: dict[str, Any]) -> str:
    """What the folds are stratified by: the class, or for multi-label data whether any label is positive."""
    if data.get("label_column"):
        return row[data["label_column"]]
    return str(int(any(row[c] == "1" for c in data["label_columns"])))


def make_folds(rows: list[dict[str, str]], data: dict[str, Any], k: int, seed: int) -> list[dict[str, str]]:
    """Patient-grouped, stratified ``k``-fold assignment: ``[{row path: "train"|"val"|"test"}, ...]``.

    Fold ``i`` tests one ``k``-th of the patients; of the rest, one in ``k`` patient groups (again
    stratified) validates, the others train. Every image is in exactly one test fold.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    paths = [r[data.get("path_column", "path")] for r in rows]
    groups = [r[data["patient_column"]] for r in rows]
    strata = [_strata(r, data) for r in rows]
    outer = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for fold, (rest, test) in enumerate(outer.split(paths, strata, groups)):
        inner = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + 1 + fold)
        _, val = next(inner.split(rest, [strata[i] for i in rest], [groups[i] for i in rest]))
        assign = {paths[i]: "train" for i in rest}
        assign.update({paths[rest[i]]: "val" for i in val})
        assign.update({paths[i]: "test" for i in test})
        folds.append(assign)
    return folds


def _fold_csv(args: argparse.Namespace, fieldnames: list[str], rows: list[dict[str, str]], assign: dict[str, str],
              fold: int, data: dict[str, Any]) -> Path:  # fmt: skip
    """The dataset CSV with a ``cv_split`` column for one fold, under the work folder."""
    path = _cv_dir(args) / f"fold{fold}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    column = data.get("path_column", "path")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*fieldnames, CV_SPLIT_COLUMN])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, CV_SPLIT_COLUMN: assign[row[column]]})
    return path


def _cv_dir(args: argparse.Namespace) -> Path:
    """The work folder of one cross-validation protocol (a changed setting never reuses another's runs)."""
    name = f"{args.dataset}_cv{args.cv}_seed{args.fold_seed}_{args.img_size}px_{args.epochs}ep"
    if args.early_stopping_metric:
        name += f"_stop_{args.early_stopping_metric}"
    if args.amp != "auto" or args.channels_last:
        name += f"_amp_{args.amp}{'_cl' if args.channels_last else ''}"
    return args.work_dir / name


def _run_name(args: argparse.Namespace, model: str) -> str:
    """A model's run-folder name: the model and its ``--model-arg`` settings."""
    return model + "".join(f"_{k}_{v}" for k, v in sorted(args.model_arg.get(model, {}).items()))


def cv_init_weights(arch: str, fold: int, num_classes: int, work_dir: Path) -> Path:
    """One randomly initialized timm CNN (with a ``num_classes`` classifier) per fold, shared by every model."""
    import timm
    from safetensors.torch import save_file
    from timm.utils import random_seed

    path = work_dir / "init" / f"{arch}_random_seed{fold}_classes{num_classes}.safetensors"
    if not path.is_file():
        random_seed(fold, 0)
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def cv_train_config(model: str, fold: int, args: argparse.Namespace, data: dict[str, Any], init_file: Path,
                    num_classes: int):  # fmt: skip
    """The TrainConfig of one (model, fold): ``TrainConfig()``'s recipe for every model."""
    from qing.train import TrainConfig

    tag = CV_MODELS[model][1]
    model_args: dict[str, Any] = {}
    overlay: dict[str, Any] = {}
    if not model.startswith("qing_"):
        # a plain timm CNN: the hybrids' squash resize, and keep the init file's classifier (timm would
        # drop it because its cfg says 1000 classes)
        overlay = dict(crop_pct=1.0, crop_mode="squash", num_classes=num_classes)
    if overlay:
        model_args["pretrained_cfg_overlay"] = overlay
    model_args.update(args.model_arg.get(model, {}))
    values = {
        "model": f"{model}.{tag}",
        "model_args": model_args,
        "img_size": args.img_size,
        "epochs": args.epochs,
        "seed": fold,
        "pretrained": True,
        "pretrained_file": str(init_file),
        "data": dict(data, cache_images=args.cache_images),
        "output_dir": str(_cv_dir(args) / f"{_run_name(args, model)}_fold{fold}"),
        "overwrite": True,
        "tensorboard": False,
        "progress": False,
        "log_images": 0,
        "n_bootstrap": 0,
        "device": args.device,
        "amp": args.amp,
        "channels_last": args.channels_last,
    }
    if args.early_stopping_metric:
        values["early_stopping_metric"] = args.early_stopping_metric
    return TrainConfig(**values)


def cv_run_one(model: str, fold: int, args: argparse.Namespace, data: dict[str, Any], num_classes: int):
    """Train and test one (model, fold); result (with the test probabilities) cached as ``result.json``."""
    config_dir = _cv_dir(args) / f"{_run_name(args, model)}_fold{fold}"
    cached = config_dir / "result.json"
    if args.reuse and cached.is_file():
        _log.info("reusing %s", cached)
        return json.loads(cached.read_text())
    from qing.evaluate import probabilities
    from qing.train import Trainer

    init_file = cv_init_weights(CV_MODELS[model][0], fold, num_classes, args.work_dir)
    config = cv_train_config(model, fold, args, data, init_file, num_classes)
    started = time.perf_counter()
    trainer = Trainer(config)
    result = trainer.fit()
    wall = time.perf_counter() - started
    logits, targets = trainer.predict("test", trainer.eval_model)
    probs = probabilities(logits.numpy(), trainer.splits.task)
    if len(probs) != len(trainer.splits.test):
        raise RuntimeError(f"{len(trainer.splits.test) - len(probs)} unreadable test images: the folds would not pool")
    record = {
        "model": model,
        "fold": fold,
        "seed": fold,
        "init_file": str(init_file),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_completed,
        "monitor": result.monitor,
        "best_value": result.best_value,
        "encoder_share": encoder_share(trainer),
        "test_auroc": result.test_metrics.get("roc_auc"),
        "test_paths": [str(s.path) for s in trainer.splits.test],
        "test_patients": [s.patient for s in trainer.splits.test],
        "test_targets": targets.reshape(len(probs), -1).tolist(),
        "test_probs": probs.reshape(len(probs), -1).tolist(),
        "label_names": list(trainer.splits.label_names),
        "task": trainer.splits.task,
        "n_train": len(trainer.splits.train),
        "n_val": len(trainer.splits.val),
        "history": result.history,
        "wall_s": wall,
        "epoch_s_median": statistics.median(h["epoch_time_s"] for h in result.history),
        "load_avg_1min": os.getloadavg()[0],
        "recipe": {k: getattr(config, k) for k in RECIPE_FIELDS},
        "model_name": config.model,
    }  # fmt: skip
    cached.write_text(json.dumps(record))
    return record


def encoder_share(trainer: Any) -> Optional[float]:
    """Residual hybrids: how much the encoder's branch moves the test logits, relative to the backbone's.

    The standard deviation over test images of the encoder's term of the logits divided by that of
    the pooled classifier's term, averaged over outputs (0: the branch is still closed). ``None`` for
    other models.
    """
    from qing.layers import ResidualHead

    model = trainer.eval_model
    if not isinstance(getattr(model, "head", None), ResidualHead):
        return None
    backbone, encoder = [], []
    model.eval()
    with torch.no_grad():
        for batch in trainer.loaders["test"]:
            if batch["image"] is None:
                continue
            images = batch["image"].to(trainer.device)
            b, e = model.head.branches(model.forward_head(model.forward_features(images), pre_logits=True))
            backbone.append(b)
            encoder.append(e)
    b_sd, e_sd = torch.cat(backbone).std(dim=0), torch.cat(encoder).std(dim=0)
    return round(float((e_sd / b_sd.clamp_min(1e-12)).mean()), 4)


def mean_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC (binary: ``(n, 1)`` arrays) or the mean over the labels with both classes present (multi-label)."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(y[:, j], p[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def paired_bootstrap(y, p_a, p_b, patients, *, n: int, seed: int) -> dict[str, Any]:
    """``AUROC(a) - AUROC(b)`` on the same images, with a bootstrap over patients (clusters).

    Each resample draws patients with replacement and keeps all their images, so images of one
    patient are never treated as independent. Returns the observed difference, the 95% percentile
    interval and a two-sided bootstrap p-value (twice the smaller tail of the difference around 0).
    """
    rng = np.random.default_rng(seed)
    ids, inverse = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(ids))]
    observed = mean_auroc(y, p_a) - mean_auroc(y, p_b)
    diffs = []
    for _ in range(n):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])
        diffs.append(mean_auroc(y[rows], p_a[rows]) - mean_auroc(y[rows], p_b[rows]))
    diffs = np.asarray(diffs)
    diffs = diffs[np.isfinite(diffs)]
    low, high = np.percentile(diffs, [2.5, 97.5])
    p_value = min(1.0, 2 * min(float((diffs <= 0).mean()), float((diffs >= 0).mean())))
    return {
        "difference": round(observed, 4),
        "ci95_low": round(float(low), 4),
        "ci95_high": round(float(high), 4),
        "p_value": round(p_value, 4),
        "n_bootstrap": len(diffs),
        "clusters": len(ids),
    }


def _pooled(records: list[dict[str, Any]], model: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Out-of-fold (paths, targets, probabilities, patients) of a model, sorted by path."""
    items = []
    for r in records:
        if r["model"] == model:
            items += list(zip(r["test_paths"], r["test_targets"], r["test_probs"], r["test_patients"]))
    items.sort(key=lambda item: item[0])
    paths, y, p, patients = zip(*items)
    return list(paths), np.asarray(y, dtype=float), np.asarray(p, dtype=float), list(patients)


def crossval(args: argparse.Namespace) -> dict[str, Any]:
    """Every model on every fold (fold by fold, models interleaved), pooled and compared."""
    data = data_config(args.dataset, args.data_dir, args.data)
    rows, fieldnames = _read_rows(data)
    folds = make_folds(rows, data, args.cv, args.fold_seed)
    num_classes = 1 if data.get("label_column") else len(data["label_columns"])
    fold_data = dict(data, image_dir=str(Path(data["labels_csv"]).parent), split_column=CV_SPLIT_COLUMN)
    for key in ("test_fraction", "val_fraction", "split_seed"):
        fold_data.pop(key, None)
    records = []
    for fold, assign in enumerate(folds):
        if args.folds is not None and fold not in args.folds:
            continue
        csv_path = _fold_csv(args, fieldnames, rows, assign, fold, data)
        for model in args.models:
            record = cv_run_one(model, fold, args, dict(fold_data, labels_csv=str(csv_path)), num_classes)
            records.append(record)
            _log.info("%s fold %d: test AUROC %.4f (best epoch %d of %d, encoder share %s, %.0f s)", model, fold,
                      record["test_auroc"], record["best_epoch"], record["epochs_run"], record["encoder_share"],
                      record["wall_s"])  # fmt: skip

    rows_out: list[dict[str, Any]] = []
    pooled = {m: _pooled(records, m) for m in args.models if any(r["model"] == m for r in records)}
    paths0 = next(iter(pooled.values()))[0]
    for model, (paths, y, p, _) in pooled.items():
        if paths != paths0:
            raise RuntimeError(f"{model} was tested on other images than {args.models[0]}")
        runs = [r for r in records if r["model"] == model]
        fold_aurocs = [r["test_auroc"] for r in runs]
        mean, sd = _mean_sd(fold_aurocs)
        rows_out.append({
            "phase": "summary",
            "model": model,
            "folds": len(runs),
            "oof_auroc": round(mean_auroc(y, p), 4),
            "fold_auroc_mean": mean,
            "fold_auroc_sd": sd,
            "epochs_run_mean": round(statistics.fmean(r["epochs_run"] for r in runs), 1),
            "best_epoch_mean": round(statistics.fmean(r["best_epoch"] for r in runs), 1),
            "encoder_share_mean": _mean_sd([r["encoder_share"] for r in runs])[0],
            "wall_s_mean": round(statistics.fmean(r["wall_s"] for r in runs), 1),
        })  # fmt: skip
    comparisons = []
    for a, b in CV_PAIRS:
        if a not in pooled or b not in pooled:
            continue
        _, y, p_a, patients = pooled[a]
        _, _, p_b, _ = pooled[b]
        stats = paired_bootstrap(y, p_a, p_b, patients, n=args.n_bootstrap, seed=0)
        per_fold = {}
        for r in records:
            per_fold.setdefault(r["fold"], {})[r["model"]] = r["test_auroc"]
        fold_diffs = [v[a] - v[b] for _, v in sorted(per_fold.items()) if a in v and b in v]
        row = {"phase": "comparison", "model": a, "baseline": b, **stats}
        if y.shape[1] == 1:  # binary: DeLong's test on the pooled out-of-fold probabilities, beside the bootstrap
            delong = delong_test(y[:, 0], p_a[:, 0], p_b[:, 0])
            row["delong_ci95"] = [_r(v) for v in delong["ci"]]
            row["delong_p"] = _r(delong["p_value"])
        row["fold_differences"] = [round(d, 4) for d in fold_diffs]
        row["fold_difference_mean"] = round(statistics.fmean(fold_diffs), 4)
        row["folds_won"] = f"{sum(d > 0 for d in fold_diffs)}/{len(fold_diffs)}"
        row["goal_met"] = bool(row["fold_difference_mean"] >= 0 and stats["ci95_low"] > -0.01)
        comparisons.append(row)
    for r in records:
        rows_out.append({
            "phase": "per_fold",
            "model": r["model"],
            "fold": r["fold"],
            "n_train": r["n_train"],
            "n_val": r["n_val"],
            "n_test": len(r["test_paths"]),
            "test_auroc": _r(r["test_auroc"]),
            "best_epoch": r["best_epoch"],
            "epochs_run": r["epochs_run"],
            "encoder_share": _r(r["encoder_share"]),
            "epoch_s_median": round(r["epoch_s_median"], 1),
            "wall_s": round(r["wall_s"], 1),
        })  # fmt: skip
    if records[0]["task"] == "multilabel":
        labels = records[0]["label_names"]
        for j, label in enumerate(labels):
            row = {"phase": "per_label", "label": label}
            for model, (_, y, p, patients) in pooled.items():
                row["n_positive"] = int(y[:, j].sum())
                row["positive_patients"] = len({patients[i] for i in np.flatnonzero(y[:, j])})
                row[f"{model}_auroc"] = round(mean_auroc(y[:, [j]], p[:, [j]]), 4)
            first, second = CV_PAIRS[0]
            if first in pooled and second in pooled and 2 <= row["n_positive"] <= len(y) - 2:
                delong = delong_test(y[:, j], pooled[first][2][:, j], pooled[second][2][:, j])
                row[f"delong_p_{first}_vs_{second}"] = _r(delong["p_value"])
            rows_out.append(row)
    first = records[0]
    config = {
        "dataset": args.dataset,
        "source": _relative_source(data["labels_csv"], args.data_dir),
        "task": first["task"],
        "outputs": len(first["label_names"]),
        "protocol": f"{args.cv}-fold cross-validation, grouped by patient, stratified "
        f"({'by class' if data.get('label_column') else 'by any finding'}); in each fold one in {args.cv} of "
        "the remaining patient groups validates; every image is tested exactly once",
        "images": len(rows),
        "patients": len({r[data["patient_column"]] for r in rows}),
        "fold_seed": args.fold_seed,
        "models": list(pooled),
        "img_size": args.img_size,
        "epochs_max": args.epochs,
        "precision": f"amp={args.amp}, channels_last={args.channels_last}",
        "recipe": "TrainConfig() defaults for every model (AdamW lr 1e-4, weight decay 0.01, cosine, 1 warmup epoch)",
        "best_checkpoint": f"best {first['monitor']} on validation (early stopping patience "
        f"{first['recipe']['early_stopping_patience']})",
        "seed": "the fold index (weights init, data order, augmentation, dropout)",
        "init": "random (timm's init): one file per fold and backbone, classifier included, loaded by every model; "
        "the residual hybrid's pooled classifier takes the file's classifier, so at step 0 it computes exactly "
        "what the plain CNN computes",
        "pooled_auroc": "out-of-fold probabilities of all folds pooled; multi-label: mean over labels",
        "paired_test": f"bootstrap over patients ({args.n_bootstrap} resamples), same images for both models",
        "goal": "mean fold AUROC difference >= 0 and the paired 95% interval's lower bound > -0.01",
        "runs_wall_s_total": round(sum(r["wall_s"] for r in records), 1),
        **environment(args),
        "command": "python benchmarks/finetune.py " + " ".join(sys.argv[1:]),
    }
    return {"config": config, "rows": rows_out[: len(pooled)] + comparisons + rows_out[len(pooled) :]}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _relative_source(source: str, data_dir: Path) -> str:
    """The data source with the data folder written as ``../shared/data`` when it is the default one."""
    return source.replace(str(data_dir), "../shared/data") if data_dir == DATA else source


def _models(records: list[dict[str, Any]]) -> list[str]:
    """The models that have runs, hybrid first."""
    return [m for m in (HYBRID, BASELINE) if any(r["model"] == m for r in records)]


def _recipe_of(runs: list[dict[str, Any]]) -> str:
    return runs[0].get("recipe_name") or _recipe_name(runs[0]["model"])


def _recipe_name(model: str, hybrid_recipe: str = "default") -> str:
    if model == HYBRID and hybrid_recipe == "default":
        return "qing default (TrainConfig())"
    return "timm standard (BASELINE_RECIPE)"


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Where and how the benchmark ran."""
    import timm

    import qing

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = None
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "qing": getattr(qing, "__version__", None),
        "git_commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


# ---- commands --------------------------------------------------------------------------------------


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Both models x seeds (interleaved), aggregated into the results dict."""
    from qing.data import DataConfig, load_splits

    data = data_config(args.dataset, args.data_dir, args.data)
    splits = load_splits(DataConfig(**data))
    multilabel = splits.task == "multilabel"
    records = []
    for seed in args.seeds:
        for model in (HYBRID, BASELINE):
            if model in args.models:
                records.append(run_one(model, seed, args, data))
                r = records[-1]
                _log.info("%s seed %d: test AUROC %.4f (best epoch %d of %d, %.0f s)", model, seed,
                          r["test"]["roc_auc"], r["best_epoch"], r["epochs_run"], r["wall_s"])  # fmt: skip
    init = records[0]["init"]
    config = {
        "dataset": args.dataset,
        "source": _relative_source(splits.source, args.data_dir),
        "task": splits.task,
        "outputs": len(splits.label_names),
        "split": "patient-grouped (patient column), class-stratified; fixed split_seed for every run seed",
        "n_train": len(splits.train),
        "n_val": len(splits.val),
        "n_test": len(splits.test),
        "img_size": args.img_size,
        "epochs_max": args.epochs,
        "seeds": list(args.seeds),
        "init": init,
        "augmentation": {
            k: data.get(k, getattr(DataConfig, k, None)) for k in ("rotation", "translate", "scale", "hflip_prob")
        },
        "preprocessing": "squash resize to img_size (whole image), bicubic, ImageNet mean/std, for both models",
        "threshold": "Youden's J on validation, applied to test",
        "best_checkpoint": f"best {records[0]['recipe']['early_stopping_metric']} on validation "
        f"(early stopping patience {records[0]['recipe']['early_stopping_patience']})",
        "n_bootstrap": args.n_bootstrap,
        "init_loading": "pretrained_file through the .tv_in1k tags (the tag names the timm DenseNet121 weight "
        "format, not where the tensors come from)",
        "runs_wall_s_total": round(sum(r["wall_s"] for r in records), 1),
        **environment(args),
        "command": "python benchmarks/finetune.py " + " ".join(sys.argv[1:]),
    }
    config["augmentation"] = json.loads(json.dumps(config["augmentation"]))
    recipes = {model: records_recipe(records, model) for model in _models(records)}
    rows = summary_rows(records, multilabel)
    if multilabel:
        rows += per_label_rows(records)
    return {
        "config": config,
        "recipes": recipes,
        "comparison": comparison(records),
        "note": (
            f"Both models start from {init}. From random init on a few hundred images the absolute "
            "numbers are low and noisy (see the AUROC intervals and the spread over seeds); they compare "
            "the two models under one protocol, not what either reaches from ImageNet or CheXNet weights."
        ),
        "rows": rows,
    }


def amp_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Each (model, seed) in float32 and under bf16 autocast (interleaved), paired by seed."""
    from qing.data import DataConfig, load_splits
    from qing.train.amp import CPU_BF16_ENV, cpu_bf16_support

    data = data_config(args.dataset, args.data_dir, args.data)
    splits = load_splits(DataConfig(**data))
    support = cpu_bf16_support() if args.device != "cuda" else None
    forced = False
    if support is not None and not support.usable:
        os.environ[CPU_BF16_ENV] = "1"  # emulated bf16: the numbers of bf16 training, not its speed
        forced = True
    records = []
    runs_amp = ("none", "bf16")
    for seed in args.seeds:
        for model in args.models:
            for amp in runs_amp:
                records.append(run_one(model, seed, args, data, amp=amp))
                r = records[-1]
                _log.info("%s seed %d amp=%s: test AUROC %.4f (best epoch %d of %d, %.1f train img/s, %.0f s)",
                          model, seed, amp, r["test"]["roc_auc"], r["best_epoch"], r["epochs_run"],
                          r["train_images_per_s_median"], r["wall_s"])  # fmt: skip
    rows: list[dict[str, Any]] = []
    comparisons: dict[str, Any] = {}
    for model in args.models:
        runs = {(r["seed"], r["amp"]): r for r in records if r["model"] == model}
        for amp in ("none", "bf16"):
            aurocs = [runs[(seed, amp)]["test"]["roc_auc"] for seed in args.seeds]
            speeds = [runs[(seed, amp)]["train_images_per_s_median"] for seed in args.seeds]
            mean, sd = _mean_sd(aurocs)
            rows.append({
                "phase": "summary", "model": model, "amp": amp, "seeds": len(aurocs), "auroc_mean": mean,
                "auroc_sd": sd, "auroc_range": round(max(aurocs) - min(aurocs), 4),
                "train_images_per_s_median": round(statistics.median(speeds), 2),
                "epochs_run_mean": _mean_sd([runs[(seed, amp)]["epochs_run"] for seed in args.seeds])[0],
            })  # fmt: skip
        for seed in args.seeds:
            fp32, bf16 = runs[(seed, "none")], runs[(seed, "bf16")]
            rows.append({
                "phase": "per_seed", "model": model, "seed": seed,
                "auroc_fp32": _r(fp32["test"]["roc_auc"]), "auroc_bf16": _r(bf16["test"]["roc_auc"]),
                "difference": _r(bf16["test"]["roc_auc"] - fp32["test"]["roc_auc"]),
                "best_epoch_fp32": fp32["best_epoch"], "best_epoch_bf16": bf16["best_epoch"],
                "train_img_s_fp32": round(fp32["train_images_per_s_median"], 2),
                "train_img_s_bf16": round(bf16["train_images_per_s_median"], 2),
            })  # fmt: skip
        diffs = [runs[(s, "bf16")]["test"]["roc_auc"] - runs[(s, "none")]["test"]["roc_auc"] for s in args.seeds]
        diff_mean, diff_sd = _mean_sd(diffs)
        spread = _mean_sd([runs[(s, "none")]["test"]["roc_auc"] for s in args.seeds])[1]
        speeds = {a: statistics.median(runs[(s, a)]["train_images_per_s_median"] for s in args.seeds) for a in runs_amp}
        speed = speeds["bf16"] / speeds["none"]
        comparisons[model] = {
            "auroc_difference_bf16_minus_fp32_per_seed": [round(d, 4) for d in diffs],
            "auroc_difference_mean": diff_mean,
            "auroc_difference_sd": diff_sd,
            "fp32_auroc_sd_over_seeds": spread,
            "within_seed_spread": None if spread is None else abs(diff_mean) <= spread,
            "train_speed_bf16_over_fp32": round(speed, 3),
        }
    config = {
        "dataset": args.dataset,
        "source": _relative_source(splits.source, args.data_dir),
        "n_train": len(splits.train),
        "n_val": len(splits.val),
        "n_test": len(splits.test),
        "img_size": args.img_size,
        "epochs_max": args.epochs,
        "seeds": list(args.seeds),
        "models": list(args.models),
        "init": records[0]["init"],
        "channels_last": args.channels_last,
        "amp": "each seed trained twice from the same init: amp='none' (float32) and amp='bf16' (bf16 autocast)",
        "cpu_bf16_native": None if support is None else support.native,
        "cpu_capability": None if support is None else support.capability,
        "bf16_forced": forced,
        "decision_rule": "amp='auto' may pick bf16 on CPUs with bfloat16 instructions only if |mean paired "
        "difference| <= the float32 AUROC sd over seeds",
        "runs_wall_s_total": round(sum(r["wall_s"] for r in records), 1),
        **environment(args),
        "command": "python benchmarks/finetune.py " + " ".join(sys.argv[1:]),
    }
    return {"config": config, "comparison": comparisons, "rows": rows}


def records_recipe(records: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """The recipe a model was trained with (from its first run)."""
    run = next(r for r in records if r["model"] == model)
    return {"model_name": run["model_name"], **{k: v for k, v in run["recipe"].items()}}


def cache_timing(args: argparse.Namespace) -> dict[str, Any]:
    """Epoch time with and without the in-memory cache: same model and data, runs interleaved.

    Two measurements: full Trainer epochs (train + validation, the model dominates) and a data-only
    pass over the training DataLoader (decoding + transforms, what the cache removes). Best of the
    repeats is kept (the machine is shared).
    """
    from torch.utils.data import DataLoader

    from qing.data import DataConfig, build_datasets, build_transforms, collate_skip_bad, load_splits
    from qing.train import Trainer

    data = data_config(args.dataset, args.data_dir, args.data)
    splits = load_splits(DataConfig(**data))
    init_file, init_text = init_weights(args.init, 0, args.work_dir)
    rows = []
    loader_best: dict[bool, float] = {}
    preload_s = None
    for repeat in range(args.repeats):
        for cache in (False, True):
            # data only: a fresh dataset each time (so the cached pass pays no decoding, as in epochs 2+)
            import qing

            model = qing.create_model(f"{HYBRID}.tv_in1k", num_classes=splits.num_outputs, img_size=args.img_size)
            t0 = time.perf_counter()
            datasets = build_datasets(
                splits,
                train_transform=build_transforms(model, train=True, img_size=args.img_size),
                eval_transform=build_transforms(model, train=False, img_size=args.img_size),
                cache=cache,
            )
            if cache:
                preload_s = time.perf_counter() - t0
            loader = DataLoader(datasets["train"], batch_size=16, shuffle=True, collate_fn=collate_skip_bad)
            for _ in range(3):
                t0 = time.perf_counter()
                for _batch in loader:
                    pass
                loader_best[cache] = min(loader_best.get(cache, float("inf")), time.perf_counter() - t0)
            # full epochs through the Trainer
            config = train_config(HYBRID, seed=0, args=args, data=data, init_file=init_file).replace(
                epochs=args.cache_epochs, report=False, data={"cache_images": cache},
                output_dir=str(args.work_dir / "cache" / f"cache{int(cache)}_rep{repeat}"),
                early_stopping_patience=None,
            )  # fmt: skip
            load = os.getloadavg()[0]
            result = Trainer(config).fit()
            for h in result.history:
                rows.append({
                    "phase": "epochs", "cache_images": cache, "repeat": repeat, "epoch": h["epoch"],
                    "epoch_s": round(h["epoch_time_s"], 2), "train_images_per_s": round(h["train_images_per_s"], 2),
                    "load_avg_1min": round(load, 2),
                })  # fmt: skip
            _log.info("cache=%s repeat %d: epochs %s s", cache, repeat,
                      [round(h["epoch_time_s"], 1) for h in result.history])  # fmt: skip
    summary = []
    for cache in (False, True):
        epochs = [r["epoch_s"] for r in rows if r["cache_images"] == cache]
        later = [r["epoch_s"] for r in rows if r["cache_images"] == cache and r["epoch"] > 1]
        summary.append({
            "phase": "summary",
            "cache_images": cache,
            "epoch_s_best": min(epochs),
            "epoch_s_median": round(statistics.median(epochs), 2),
            "epoch_s_best_after_first": min(later) if later else None,
            "train_loader_pass_s_best": round(loader_best[cache], 3),
            "cache_fill_s": round(preload_s, 2) if cache else None,
        })  # fmt: skip
    speedup = {
        "full epoch (train + val), best": round(summary[0]["epoch_s_best"] / summary[1]["epoch_s_best"], 3),
        "train DataLoader pass only, best": round(
            summary[0]["train_loader_pass_s_best"] / summary[1]["train_loader_pass_s_best"], 2
        ),
    }
    config = {
        "dataset": args.dataset,
        "model": HYBRID,
        "init": init_text,
        "img_size": args.img_size,
        "batch_size": 16,
        "num_workers": 0,
        "n_train": len(splits.train),
        "n_val": len(splits.val),
        "epochs_per_run": args.cache_epochs,
        "repeats": args.repeats,
        "order": "interleaved: no cache, cache, no cache, cache, ...",
        **environment(args),
        "command": "python benchmarks/finetune.py " + " ".join(sys.argv[1:]),
    }
    return {"config": config, "speedup (no cache / cache)": speedup, "rows": summary + rows}


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(raw)
    return out


def _parse_model_args(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        model, sep, rest = item.partition(":")
        if not sep:
            raise SystemExit(f"expected MODEL:KEY=VALUE, got {item!r}")
        out.setdefault(model, {}).update(_parse_overrides([rest]))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*DATASETS, "cache"], help="a dataset to benchmark, or the cache timing")
    parser.add_argument("--dataset", default=None, help="dataset of the cache timing (default pneumonia200)")
    parser.add_argument(
        "--data-dir", type=Path, default=DATA, help="folder holding the datasets (default ../shared/data)"
    )
    parser.add_argument(
        "--data", action="append", default=[], metavar="KEY=VALUE", help="DataConfig override (YAML value)"
    )
    parser.add_argument("--img-size", type=int, default=None, help="image side (default: the dataset's)")
    parser.add_argument("--epochs", type=int, default=20, help="maximum epochs (early stopping may end sooner)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=[HYBRID, BASELINE], choices=[HYBRID, BASELINE])
    parser.add_argument("--init", default="auto", help="auto, imagenet, random or a DenseNet121 weights file")
    parser.add_argument(
        "--early-stopping-metric",
        default=None,
        help="for both models instead of the recipe's val_loss (e.g. val_auroc); results get a _stop_<metric> suffix",
    )
    parser.add_argument(
        "--hybrid-recipe",
        choices=["default", "baseline"],
        default="default",
        help="train the hybrid with qing's default recipe or with BASELINE_RECIPE (a control experiment)",
    )
    parser.add_argument(
        "--hybrid-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hybrid model argument (YAML value), e.g. backbone_final_act=true (a control experiment)",
    )
    parser.add_argument("--cv", type=int, default=None, metavar="K", help="patient-grouped K-fold cross-validation")
    parser.add_argument(
        "--cv-models", nargs="+", default=CV_DEFAULT_MODELS, choices=list(CV_MODELS), help="models of --cv"
    )
    parser.add_argument("--folds", type=int, nargs="+", default=None, help="--cv: run only these folds (0-based)")
    parser.add_argument("--fold-seed", type=int, default=0, help="--cv: seed of the fold assignment")
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="MODEL:KEY=VALUE",
        help="--cv: a model argument for one model (YAML value), e.g. qing_densenet121_r2:token_drop_rate=0.2",
    )
    parser.add_argument("--cache-images", action="store_true", help="train with the in-memory image cache")
    parser.add_argument(
        "--amp", default=None, help="TrainConfig.amp of every run (default: none, i.e. float32; auto with --cv)"
    )
    parser.add_argument("--channels-last", action="store_true", help="TrainConfig.channels_last of every run")
    parser.add_argument(
        "--compare-amp", action="store_true", help="train every (model, seed) in float32 and in bf16; compare"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="cache timing: interleaved repeats")
    parser.add_argument("--cache-epochs", type=int, default=2, help="cache timing: epochs per run")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/qing-finetune-bench"), help="run folders")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs found in --work-dir")
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default benchmarks/results/finetune_<name>.json)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("qing").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    args.data = _parse_overrides(args.data)
    args.hybrid_arg = _parse_overrides(args.hybrid_arg)
    if args.command == "cache":
        args.dataset = args.dataset or "pneumonia200"
    else:
        args.dataset = args.command
    args.img_size = args.img_size or DATASETS[args.dataset]["img_size"]
    args.model_arg = _parse_model_args(args.model_arg)
    args.amp = args.amp or ("auto" if args.cv else "none")
    if args.cv:
        args.models = args.cv_models
        results = crossval(args)
        size = f"_{args.img_size}px" if args.img_size != DATASETS[args.dataset]["img_size"] else ""
        tweaks = "".join(f"_{_run_name(args, m)}" for m in args.models if args.model_arg.get(m))
        name = f"{args.command}_cv{args.cv}{size}{tweaks}"
    elif args.command == "cache":
        results = cache_timing(args)
        name = args.command + _variant(args)
    else:
        results = amp_benchmark(args) if args.compare_amp else benchmark(args)
        name = args.command + _variant(args)
        if args.compare_amp:
            name += "_amp_" + results["config"]["device"]
    out = args.out or REPO / "benchmarks" / "results" / f"finetune_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
    tmp.replace(out)
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=2, default=_jsonable))
    for row in results["rows"]:
        if row.get("phase") in ("summary", "per_label", "comparison"):
            print(json.dumps(row))
    print(f"wrote {out}")
    return 0


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
