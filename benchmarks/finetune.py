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

Control experiments change one thing for a whole benchmark and get a suffix in the results name:
``--early-stopping-metric val_auroc`` (both models), ``--hybrid-recipe baseline`` (the hybrid trained
with :data:`BASELINE_RECIPE`), ``--hybrid-arg KEY=VALUE`` (a hybrid model argument).

Results go to ``benchmarks/results/finetune_<name>.json`` (``{"config", "rows", ...}``; rows carry
a ``phase``: ``summary``, ``per_seed`` and ``per_label`` for the accuracy runs, ``summary`` and
``epochs`` for the cache timing), rendered by the docs site.
"""

from __future__ import annotations

import argparse
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

import torch
import yaml

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
    parser.add_argument("--cache-images", action="store_true", help="train with the in-memory image cache")
    parser.add_argument("--amp", default="none", help="TrainConfig.amp of every run (default none: float32)")
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
    if args.command == "cache":
        results = cache_timing(args)
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
        if row.get("phase") in ("summary", "per_label"):
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
