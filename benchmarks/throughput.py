"""Throughput and peak memory of qing_densenet121_tr2 against its baselines, in one run.

Measures images/s and peak memory for an inference pass and a training step (AdamW, BCE) in three
modes -- ``fp32`` eager, ``bf16_cl`` (bf16 autocast + channels_last) and ``compile`` (the same under
``torch.compile``); ``--modes`` also takes ``fp32_cl`` (channels_last alone) and ``bf16`` (autocast
alone), which separate the two on a CPU -- for:

* ``qing_densenet121_tr2`` (and, for training, the same with backbone gradient checkpointing),
* timm's ``densenet121`` (the reference every ratio is taken against),
* ``original``: a faithful plain-PyTorch re-implementation of the original hybrid
  (``tests/reference/original_hybrid.py``: sequence-first ``nn.MultiheadAttention``, post-norm,
  the 5000-long sinusoidal buffer, sigmoid + ``BCELoss``).

Each measurement runs in a fresh subprocess (clean allocator and compile caches); within it the best
of several timing windows is kept, and each model is measured in ``--repeats`` fresh processes in
alternating order, reporting the median: shared or virtual machines drift by 10-20% between runs. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the growth of the process's peak RSS over the
step on CPU.

    python benchmarks/throughput.py --device cpu --batch 16 --out benchmarks/results/throughput_cpu.json
    python benchmarks/throughput.py --device cuda --batch 128 --out benchmarks/results/throughput_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "densenet121"
MODELS = ("qing_densenet121_tr2", BASELINE, "original")
MODES = ("fp32", "bf16_cl", "compile")
#: Further modes for the bf16-on-CPU question: channels_last alone, bf16 autocast alone.
EXTRA_MODES = ("fp32_cl", "bf16")
PHASES = ("infer", "train")
GRAD_CKPT = "qing_densenet121_tr2+grad_ckpt"
NUM_CLASSES = 14


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build(name: str):
    import timm

    import qing  # noqa: F401  (registers qing_*)

    if name == "original":
        sys.path.insert(0, str(REPO))
        from tests.reference.original_hybrid import OriginalHybrid

        return OriginalHybrid(num_classes=NUM_CLASSES), True
    base = name.removesuffix("+grad_ckpt")
    model = timm.create_model(base, num_classes=NUM_CLASSES)
    if name.endswith("+grad_ckpt"):
        model.set_grad_checkpointing(True)
    return model, False


def measure(args: argparse.Namespace) -> dict:
    """One (model, mode, phase) measurement in this process."""
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model, outputs_probs = _build(args.model)
    model.to(device)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 2, (args.batch, NUM_CLASSES), device=device).float()
    if args.mode in ("bf16_cl", "compile", "fp32_cl"):
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mode not in ("fp32", "fp32_cl"))
    train = args.phase == "train"
    model.train(train)
    runner = torch.compile(model) if args.mode == "compile" else model
    loss_fn = torch.nn.BCELoss() if outputs_probs else torch.nn.BCEWithLogitsLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None

    def step() -> None:
        if train:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                out = runner(x)
            loss_fn(out.float(), y).backward()
            optimizer.step()
        else:
            with torch.inference_mode(), autocast:
                runner(x)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated() / 2**20
    rss_before = _rss_mib()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0

    best = 0.0
    for _ in range(args.windows):
        sync()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        sync()
        best = max(best, args.iters * args.batch / (time.perf_counter() - t0))
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20 - mem_before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {
        "model": args.model,
        "mode": args.mode,
        "phase": args.phase,
        "batch": args.batch,
        "img_size": args.img_size,
        "images_per_s": round(best, 2),
        "peak_mem_mib": round(peak, 1),
        "warmup_s": round(warmup_s, 1),
    }


def _run_worker(args: argparse.Namespace, model: str, mode: str, phase: str) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", "--device", args.device, "--model", model, "--mode", mode,
        "--phase", phase, "--batch", str(args.batch), "--img-size", str(args.img_size), "--iters",
        str(args.iters), "--warmup", str(args.warmup), "--windows", str(args.windows),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"model": model, "mode": mode, "phase": phase, "batch": args.batch, "error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_row(runs: list[dict]) -> dict:
    """One row per model: the median run by images/s (its memory too), with every run's images/s."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    row = dict(sorted(ok, key=lambda r: r["images_per_s"])[len(ok) // 2])
    row["runs_images_per_s"] = [r["images_per_s"] for r in ok]
    return row


def _add_ratios(rows: list[dict]) -> None:
    base = {(r["mode"], r["phase"]): r for r in rows if r["model"] == BASELINE and "error" not in r}
    plain = {(r["mode"], r["phase"]): r for r in rows if r["model"] == MODELS[0] and "error" not in r}
    for r in rows:
        ref = base.get((r["mode"], r["phase"]))
        if ref and "error" not in r:
            r["ratio_vs_densenet121"] = round(r["images_per_s"] / ref["images_per_s"], 3)
        no_ckpt = plain.get((r["mode"], r["phase"]))
        if r["model"] == GRAD_CKPT and no_ckpt and "error" not in r and no_ckpt["peak_mem_mib"] > 0:
            r["mem_ratio_vs_no_ckpt"] = round(r["peak_mem_mib"] / no_ckpt["peak_mem_mib"], 3)


def _targets(rows: list[dict]) -> dict:
    qing_rows = [r for r in rows if r["model"] == MODELS[0] and "ratio_vs_densenet121" in r]
    ckpt_rows = [r for r in rows if "mem_ratio_vs_no_ckpt" in r]
    return {
        "throughput >= 0.95x densenet121 (every mode and phase)": {
            "min_ratio": min((r["ratio_vs_densenet121"] for r in qing_rows), default=None),
            "met": bool(qing_rows) and all(r["ratio_vs_densenet121"] >= 0.95 for r in qing_rows),
        },
        "grad checkpointing cuts training peak memory >= 40%": {
            "max_mem_ratio": max((r["mem_ratio_vs_no_ckpt"] for r in ckpt_rows), default=None),
            "met": bool(ckpt_rows) and all(r["mem_ratio_vs_no_ckpt"] <= 0.60 for r in ckpt_rows),
        },
    }


def _print_table(rows: list[dict]) -> None:
    head = f"{'model':<32} {'mode':<8} {'phase':<6} {'img/s':>9} {'x dn121':>8} {'peak MiB':>9} {'mem x':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<32} {r['mode']:<8} {r['phase']:<6} ERROR {r['error']}")
            continue
        ratio = r.get("ratio_vs_densenet121", "")
        mem = r.get("mem_ratio_vs_no_ckpt", "")
        print(
            f"{r['model']:<32} {r['mode']:<8} {r['phase']:<6} {r['images_per_s']:>9.1f} {ratio!s:>8} "
            f"{r['peak_mem_mib']:>9.1f} {mem!s:>6}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--no-grad-ckpt", action="store_true", help="skip the gradient-checkpointing rows")
    parser.add_argument("--iters", type=int, default=5, help="steps per timing window")
    parser.add_argument("--windows", type=int, default=3, help="timing windows; the best is kept")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per model, alternating order; median")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(measure(args)))
        return 0

    rows = []
    for mode in args.modes.split(","):
        for phase in args.phases.split(","):
            models = list(args.models.split(","))
            if phase == "train" and not args.no_grad_ckpt and MODELS[0] in models:
                models.append(GRAD_CKPT)
            runs: dict[str, list[dict]] = {m: [] for m in models}
            for repeat in range(args.repeats):  # alternate the order so drifting load hits every model alike
                for model in models if repeat % 2 == 0 else models[::-1]:
                    row = _run_worker(args, model, mode, phase)
                    runs[model].append(row)
                    print(json.dumps(row), flush=True)
            rows.extend(_median_row(r) for r in runs.values())
    _add_ratios(rows)
    print()
    _print_table(rows)
    result = {"config": _environment(args), "rows": rows, "targets": _targets(rows)}
    print(json.dumps(result["targets"], indent=2))
    out = args.out or REPO / "benchmarks" / "results" / f"throughput_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _environment(args: argparse.Namespace) -> dict:
    import timm
    import torch

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    return {
        "device": args.device,
        "device_name": device_name or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "batch": args.batch,
        "img_size": args.img_size,
        "iters_per_window": args.iters,
        "windows": args.windows,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "memory": "cuda max_memory_allocated" if args.device.startswith("cuda") else "peak RSS growth over the run",
    }


if __name__ == "__main__":
    sys.exit(main())
