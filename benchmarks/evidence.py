"""Calibration, test-time augmentation and a paired comparison, on models trained as ``finetune.py`` trains them.

For each dataset (``pneumonia200``, ``nih14``) the script takes one run of ``qing_densenet121_tr2`` and one of
timm's ``densenet121`` trained by :mod:`finetune` (same split, recipe, epochs; one seed, 0 by default), reusing
runs already in ``--work-dir`` and training the missing ones. The trainer fits one temperature per output on the
validation split and chooses the thresholds after calibration; then on the **test** split, through the real
command line:

1. **Calibration**: ECE (15 equal-width bins), equal-mass ECE and Brier score before and after temperature
   scaling, from each run's ``report/metrics.json``.
2. **Test-time augmentation**: ``qing eval RUN test.csv`` and ``qing eval RUN test.csv --tta``; AUROC with its
   bootstrap interval, each, and ``qing compare`` of the two prediction files (DeLong's test of TTA against
   no TTA on the same images).
3. **Paired comparison**: ``qing compare HYBRID_RUN DENSENET121_RUN test.csv``: per label the AUROC difference
   with DeLong's interval and p-value, the paired-bootstrap interval, McNemar's test at each model's threshold.

    python benchmarks/evidence.py                      # both datasets, seed 0, runs in /tmp/qing-e-bench
    python benchmarks/evidence.py --datasets pneumonia200 --seed 1

Results go to ``benchmarks/results/evidence_<dataset>.json`` (rows with a ``phase``: ``calibration``, ``tta``,
``tta_per_label`` (multi-label), ``compare``), rendered by the docs site; every command run is recorded.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune  # the training protocol this benchmark reuses

REPO = finetune.REPO
_log = logging.getLogger("evidence")

#: ``finetune.py``'s protocol for each dataset: image size and epoch budget of its published runs.
PROTOCOL = {"pneumonia200": {"img_size": 128, "epochs": 15}, "nih14": {"img_size": 64, "epochs": 12}}


def _finetune_args(args: argparse.Namespace, dataset: str) -> argparse.Namespace:
    """The namespace ``finetune.run_one`` expects, for ``dataset`` with its published protocol."""
    return argparse.Namespace(
        dataset=dataset,
        data_dir=args.data_dir,
        data={},
        img_size=args.img_size or PROTOCOL[dataset]["img_size"],
        epochs=args.epochs or PROTOCOL[dataset]["epochs"],
        init="auto",
        early_stopping_metric=None,
        hybrid_recipe="default",
        hybrid_arg={},
        cache_images=False,
        amp="none",
        channels_last=False,
        model_arg={},
        device=args.device,
        n_bootstrap=args.n_bootstrap,
        work_dir=args.work_dir,
        reuse=True,
    )


def write_test_csv(data: dict[str, Any], path: Path) -> tuple[Path, int]:
    """The test split of ``finetune``'s data config as a labels CSV ``qing eval`` reads; returns ``(path, n)``."""
    from qing.data import DataConfig, load_splits

    splits = load_splits(DataConfig(**data))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if splits.task == "binary":
            writer.writerow(["path", "label"])
            for sample in splits.test:
                writer.writerow([str(Path(sample.path).resolve()), splits.class_names[int(sample.target)]])
        else:
            writer.writerow(["path", *splits.label_names])
            for sample in splits.test:
                writer.writerow([str(Path(sample.path).resolve()), *(int(v) for v in sample.target)])
    return path, len(splits.test)


def qing(arguments: list[str], log: list[str], threads: int) -> str:
    """Run ``qing ARGUMENTS`` in a fresh process (the installed command line); returns its stdout."""
    command = [sys.executable, "-m", "qing", *arguments]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    shown = "qing " + " ".join(arguments)
    log.append(shown)
    if done.returncode != 0:
        raise SystemExit(f"{shown} failed ({done.returncode}):\n{done.stderr}")
    _log.info("%s (%.0f s)", shown, time.perf_counter() - started)
    return done.stdout


def _r(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, list):
        return [_r(v, digits) for v in value]
    return value


def calibration_rows(dataset: str, model: str, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Before/after rows from a run's test ``metrics.json``."""
    calibration = metrics["calibration"]
    before = calibration["uncalibrated"]
    temperatures = calibration["temperatures"]
    return [
        {
            "phase": "calibration",
            "dataset": dataset,
            "model": model,
            "temperature": _r(temperatures[0]) if len(temperatures) == 1 else None,
            "temperature_range": None if len(temperatures) == 1 else [_r(min(temperatures)), _r(max(temperatures))],
            "ece_before": _r(before["ece"]),
            "ece_after": _r(metrics["ece"]),
            "ece_equal_mass_before": _r(before["ece_equal_mass"]),
            "ece_equal_mass_after": _r(metrics["ece_equal_mass"]),
            "brier_before": _r(before["brier"]),
            "brier_after": _r(metrics["brier"]),
            "auroc": _r(metrics["roc_auc"]),
            "n_test": metrics["n_samples"],
        }
    ]


def evidence(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or reuse) both runs of ``dataset`` and measure calibration, TTA and the paired comparison."""
    fargs = _finetune_args(args, dataset)
    data = finetune.data_config(dataset, args.data_dir, {})
    runs = {}
    for model in (finetune.HYBRID, finetune.BASELINE):
        record = finetune.run_one(model, args.seed, fargs, data)
        runs[model] = {"dir": finetune._run_dir(fargs, model, args.seed), "record": record}
    out = args.work_dir / f"evidence_{dataset}_seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    test_csv, n_test = write_test_csv(data, out / "test.csv")
    commands: list[str] = []
    rows: list[dict[str, Any]] = []
    common = ["--n-bootstrap", str(args.n_bootstrap), "--device", args.device, "--overwrite", "--no-progress"]

    for model, run in runs.items():
        metrics = json.loads((run["dir"] / "report" / "metrics.json").read_text())
        rows += calibration_rows(dataset, model, metrics)

    for model, run in runs.items():
        evaluated = {}
        for tta in (False, True):
            folder = out / f"eval_{model}{'_tta' if tta else ''}"
            qing(["eval", str(run["dir"]), str(test_csv), "-o", str(folder), *common, *(["--tta"] if tta else [])],
                 commands, args.threads)  # fmt: skip
            evaluated[tta] = json.loads((folder / "metrics.json").read_text())
        folder = out / f"compare_{model}_tta_vs_plain"
        qing(["compare", str(out / f"eval_{model}_tta" / "predictions.csv"),
              str(out / f"eval_{model}" / "predictions.csv"), "-o", str(folder), "--names", "tta,plain",
              "--n-bootstrap", str(args.n_bootstrap), "--overwrite"], commands, args.threads)  # fmt: skip
        paired = json.loads((folder / "comparison.json").read_text())
        plain, tta = evaluated[False], evaluated[True]
        tested = [row for row in paired["per_label"] if (row["delong"] or {}).get("p_value") is not None]
        better = sum(1 for r in tested if r["difference"] > 0 and r["delong"]["p_value"] < 0.05)
        worse = sum(1 for r in tested if r["difference"] < 0 and r["delong"]["p_value"] < 0.05)
        rows.append(
            {
                "phase": "tta",
                "dataset": dataset,
                "model": model,
                "auroc": _r(plain["roc_auc"]),
                "auroc_ci": _r(plain["roc_auc_ci"]),
                "auroc_tta": _r(tta["roc_auc"]),
                "auroc_tta_ci": _r(tta["roc_auc_ci"]),
                "difference": _r(tta["roc_auc"] - plain["roc_auc"]),
                "labels_tta_better_p05": better,
                "labels_tta_worse_p05": worse,
                "labels_tested": len(tested),
                "delong_p" if len(tested) == 1 else "delong_p_min": _r(min(r["delong"]["p_value"] for r in tested)),
                "ece": _r(plain["ece"]),
                "ece_tta": _r(tta["ece"]),
            }
        )  # fmt: skip
        if len(plain["per_label"]) > 1:
            for a, b, r in zip(plain["per_label"], tta["per_label"], paired["per_label"]):
                rows.append({
                    "phase": "tta_per_label", "dataset": dataset, "model": model, "label": a["label"],
                    "auroc": _r(a["roc_auc"]), "auroc_tta": _r(b["roc_auc"]),
                    "delong_p": _r((r["delong"] or {}).get("p_value")),
                })  # fmt: skip

    folder = out / "compare_hybrid_vs_densenet121"
    hybrid, baseline = (str(runs[m]["dir"]) for m in (finetune.HYBRID, finetune.BASELINE))
    printed = qing(["compare", hybrid, baseline, str(test_csv), "-o", str(folder), *common], commands, args.threads)
    comparison = json.loads((folder / "comparison.json").read_text())
    for row in comparison["per_label"]:
        delong, boot, mcnemar = row["delong"] or {}, row["bootstrap"] or {}, row.get("mcnemar") or {}
        rows.append({
            "phase": "compare", "dataset": dataset, "label": row["label"], "n_positive": row["n_positive"],
            "auroc_hybrid": _r(row["auroc_a"]), "auroc_densenet121": _r(row["auroc_b"]),
            "difference": _r(row["difference"]), "delong_ci": _r(delong.get("ci")),
            "delong_p": _r(delong.get("p_value")), "bootstrap_ci": _r(boot.get("ci")),
            "mcnemar_hybrid_only_right": mcnemar.get("only_a_right"),
            "mcnemar_densenet_only_right": mcnemar.get("only_b_right"), "mcnemar_p": _r(mcnemar.get("p_value")),
        })  # fmt: skip

    config = {
        "dataset": dataset,
        "models": f"{finetune.HYBRID} (qing default recipe) and {finetune.BASELINE} (BASELINE_RECIPE), "
        f"trained by benchmarks/finetune.py: {args.img_size or PROTOCOL[dataset]['img_size']} px, at most "
        f"{args.epochs or PROTOCOL[dataset]['epochs']} epochs, seed {args.seed}",
        "init": runs[finetune.HYBRID]["record"]["init"],
        "runs": {m: str(r["dir"]) for m, r in runs.items()},
        "n_test": n_test,
        "calibration": "one temperature per output, fitted on the validation split (NLL, bounded Brent search) "
        "by the trainer; thresholds (Youden) chosen on the calibrated validation probabilities",
        "ece_bins": 15,
        "tta": "7 views: identity, 4% shifts left/right/up/down, zooms 0.95 and 1.05; no flip",
        "n_bootstrap": args.n_bootstrap,
        "commands": commands,
        "compare_output": printed.strip().splitlines(),
        **finetune.environment(argparse.Namespace(threads=args.threads, device=args.device)),
        "command": "python benchmarks/evidence.py " + " ".join(sys.argv[1:]),
    }
    return {"config": config, "rows": rows}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(PROTOCOL), choices=list(PROTOCOL))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--img-size", type=int, default=None, help="instead of the dataset's published protocol")
    parser.add_argument("--epochs", type=int, default=None, help="instead of the dataset's published protocol")
    parser.add_argument("--data-dir", type=Path, default=finetune.DATA)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/qing-e-bench"), help="finetune run folders")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("qing").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    for dataset in args.datasets:
        results = evidence(dataset, args)
        out = args.out_dir / f"evidence_{dataset}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(out)
        for row in results["rows"]:
            if row["phase"] != "tta_per_label":
                print(json.dumps(row))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
