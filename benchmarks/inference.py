"""Inference on CPU: PyTorch fp32 eager against bf16 + channels_last, onnxruntime fp32 and int8; ``qing predict``
end to end; and what int8 quantization does to the test AUROC.

Three parts, each written as rows with a ``phase``:

* ``throughput``: images/s of ``qing_densenet121_tr2`` (224 px, 14 outputs) at batch 1 and 16 for
  ``torch_fp32`` (eager, the reference of every ratio), ``torch_bf16_cl`` (bf16 autocast +
  channels_last), ``ort_fp32`` (the file of ``qing export``) and ``ort_int8`` (that file quantized by
  :func:`quantize_int8` below; qing does not offer it). Protocol of ``benchmarks/throughput.py``: every measurement in a
  fresh process, the best of ``--windows`` timing windows kept; each backend measured in
  ``--repeats`` processes in alternating order, the median reported with every run's value.
* ``predict``: wall time of the whole ``qing predict MODEL cxr-pneumonia-200/ -o out.csv`` command
  (interpreter start, model load, JPEG decoding, the model, the CSV), 200 real X-rays, for today's
  default and the fast paths; same alternating fresh-process protocol; images/s = 200 / wall time.
  MODEL is the ``--trained`` run's model (and its ONNX export), else a random binary one at ``--img-size``.
* ``int8_accuracy``: a model trained on cxr-pneumonia-200 (``--trained RUN_DIR``, a ``qing train`` run
  folder; its ``config.yaml`` gives the patient-grouped split), evaluated on the test split (and on all
  200 images) in PyTorch fp32, onnxruntime fp32 and onnxruntime int8: AUROC and the largest probability
  change.

    python benchmarks/inference.py --trained /tmp/ft/pneumonia200/qing_densenet121_tr2_seed0

A run of some ``--parts`` keeps the other parts' rows of an existing ``--out`` file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Union

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cxr-pneumonia-200"
MODEL = "qing_densenet121_tr2"
NUM_CLASSES = 14
BASELINE = "torch_fp32"
BACKENDS = ("torch_fp32", "torch_bf16_cl", "ort_fp32", "ort_int8")
#: ``qing predict`` variants: name -> (MODEL kind, extra flags). ``default`` is what a plain command does today.
PREDICT = {
    "default": ("folder", []),
    "workers2": ("folder", ["--num-workers", "2"]),
    "bf16_cl_workers2": ("folder", ["--amp", "bf16", "--channels-last", "--num-workers", "2"]),
    "onnx": ("onnx", []),
    "onnx_workers2": ("onnx", ["--num-workers", "2"]),
}


# ---- int8: measured here, not offered by qing (its test AUROC drop is above 0.005, see benchmarks/README.md)


def quantize_int8(
    source: Union[str, os.PathLike],
    target: Union[str, os.PathLike],
    *,
    per_channel: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write an int8 dynamically quantized copy of an ONNX file written by :func:`~qing.deploy.export_onnx`.

    The graph is first optimized and shape-inferred (``quant_pre_process``, ONNX shape inference), then quantized with
    ``quantize_dynamic`` (int8 weights; ``MatMul``, ``Gemm`` and ``Conv``).

    Args:
        source: The fp32 ``.onnx`` file.
        target: The int8 ``.onnx`` file to write.
        per_channel: One scale per output channel of each weight instead of one per tensor.
        overwrite: Replace an existing ``target``.

    Returns:
        ``target`` as a ``Path``.

    Raises:
        FileExistsError: ``target`` exists and ``overwrite`` is false.
    """
    onnx = importlib.import_module("onnx")
    quantization = importlib.import_module("onnxruntime.quantization")
    shape_inference = importlib.import_module("onnxruntime.quantization.shape_inference")
    source, target = Path(source), Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) or choose another name")
    if source.resolve() == target.resolve():
        raise ValueError(f"the int8 file must not replace its source {source}")
    props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    with tempfile.TemporaryDirectory(prefix="qing-int8-") as work:
        tmp = Path(work) / "int8.onnx"
        prepared = Path(work) / "prepared.onnx"
        # symbolic shape inference cannot follow a dynamic height and width through the token count: skip it
        shape_inference.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_dynamic(
            str(prepared), str(tmp), weight_type=quantization.QuantType.QInt8, per_channel=per_channel
        )
        proto = onnx.load(str(tmp))
        props["quantization"] = json.dumps(f"int8 dynamic (onnxruntime quantize_dynamic, per_channel={per_channel})")
        onnx.helper.set_model_props(proto, props)
        onnx.save(proto, str(target))
    return target


# ---- one measurement (a fresh process) ---------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict:
    """images/s of one backend at one batch size, in this process."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    if args.backend.startswith("torch"):
        import timm

        import qing  # noqa: F401  (registers qing_*)
        from qing.evaluate import TorchRunner

        model = timm.create_model(MODEL, num_classes=NUM_CLASSES)
        fast = args.backend == "torch_bf16_cl"
        runner = TorchRunner(model, amp_dtype=torch.bfloat16 if fast else None, channels_last=fast)

        def step() -> None:
            runner(x)

    else:
        from qing.deploy import OnnxModel

        onnx_model = OnnxModel(Path(args.work) / f"{args.backend}.onnx", threads=args.threads)
        array = x.numpy().astype(np.float32)
        session, names = onnx_model.session, onnx_model.metadata

        def step() -> None:
            session.run([names.output_name], {names.input_name: array})

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - t0
    best = 0.0
    for _ in range(args.windows):
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        best = max(best, args.iters * args.batch / (time.perf_counter() - t0))
    return {
        "backend": args.backend,
        "batch": args.batch,
        "images_per_s": round(best, 2),
        "warmup_s": round(warmup_s, 1),
    }


def _worker(args: argparse.Namespace, backend: str, batch: int) -> dict:
    iters = args.iters_b1 if batch == 1 else args.iters
    cmd = [
        sys.executable, __file__, "--worker", "--backend", backend, "--batch", str(batch), "--img-size",
        str(args.img_size), "--iters", str(iters), "--windows", str(args.windows), "--warmup", str(args.warmup),
        "--work", str(args.work), "--threads", str(args.threads),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0:
        return {"backend": backend, "batch": batch, "error": " | ".join(proc.stderr.strip().splitlines()[-3:])}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(runs: list[dict], key: str) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    row = dict(sorted(ok, key=lambda r: r[key])[len(ok) // 2])
    row[f"runs_{key}"] = [r[key] for r in ok]
    values = row[f"runs_{key}"]
    row["spread_pct"] = round(100 * (max(values) - min(values)) / statistics.median(values), 1)
    return row


# ---- parts -------------------------------------------------------------------------------------------


def prepare(work: Path, img_size: int) -> None:
    """The ONNX files of the throughput part (fp32 from qing.export_onnx, int8 from quantize_int8); kept in ``work``."""
    if (work / "ort_fp32.onnx").is_file() and (work / "ort_int8.onnx").is_file():
        return
    import timm
    import torch

    import qing  # noqa: F401
    from qing.deploy import export_onnx

    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=NUM_CLASSES, img_size=img_size).eval()
    report = export_onnx(model, work / "ort_fp32.onnx", overwrite=True)
    print(f"exported: {report.spatial} size, max |diff| {max(report.max_abs_diff.values()):.2g}", flush=True)
    quantize_int8(work / "ort_fp32.onnx", work / "ort_int8.onnx", overwrite=True)


def throughput(args: argparse.Namespace) -> list[dict]:
    rows = []
    for batch in args.batches:
        runs: dict[str, list[dict]] = {b: [] for b in args.backends}
        for repeat in range(args.repeats):  # alternate the order so drifting load hits every backend alike
            for backend in args.backends if repeat % 2 == 0 else args.backends[::-1]:
                row = _worker(args, backend, batch)
                runs[backend].append(row)
                print(json.dumps(row), flush=True)
        medians = [_median(r, "images_per_s") for r in runs.values()]
        base = next((r for r in medians if r["backend"] == BASELINE and "error" not in r), None)
        for r in medians:
            if base and "error" not in r:
                r["ratio_vs_torch_fp32"] = round(r["images_per_s"] / base["images_per_s"], 3)
            rows.append({"phase": "throughput", **r})
    return rows


def _predict_model(work: Path, img_size: int, trained: Path | None) -> tuple[Path, Path]:
    """The trained run's model folder (else a saved random binary qing_densenet121_tr2 at ``img_size``) and its ONNX."""
    import torch

    import qing
    from qing.deploy import export_onnx

    folder, onnx_path = work / "predict-model", work / "predict-model.onnx"
    if trained is not None:
        folder = trained / "checkpoints" / "best"
    if not folder.is_dir():
        torch.manual_seed(0)
        model = qing.create_model(MODEL, num_classes=1, img_size=img_size).eval()
        qing.save_pretrained(model, folder, label_names=["PNEUMONIA"])
    if not onnx_path.is_file():
        export_onnx(qing.from_pretrained(folder).eval(), onnx_path, images=[DATA / "NORMAL"])
    return folder, onnx_path


def predict_end_to_end(args: argparse.Namespace) -> list[dict]:
    folder, onnx_path = _predict_model(args.work, args.img_size, args.trained)
    qing_cmd = str(Path(sys.executable).with_name("qing"))
    n_images = sum(1 for _ in DATA.rglob("*.jpeg"))
    runs: dict[str, list[dict]] = {name: [] for name in args.predict}
    for repeat in range(args.repeats):
        for name in args.predict if repeat % 2 == 0 else args.predict[::-1]:
            kind, flags = PREDICT[name]
            out = args.work / f"predict-{name}.csv"
            model = str(onnx_path if kind == "onnx" else folder)
            cmd = [qing_cmd, "predict", model, str(DATA), "-o", str(out), "--overwrite", "--no-progress", *flags]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
            wall = time.perf_counter() - t0
            row = {"variant": name, "command": " ".join(["qing predict", kind.upper(), "DATA", *flags])}
            if proc.returncode != 0:
                row["error"] = " | ".join(proc.stderr.strip().splitlines()[-3:])
            else:
                row.update(wall_s=round(wall, 2), images_per_s=round(n_images / wall, 2))
            runs[name].append(row)
            print(json.dumps(row), flush=True)
    rows = [_median(r, "images_per_s") for r in runs.values()]
    base = next((r for r in rows if r["variant"] == "default" and "error" not in r), None)
    for r in rows:
        if base and "error" not in r:
            r["ratio_vs_default"] = round(r["images_per_s"] / base["images_per_s"], 3)
    return [{"phase": "predict", **r} for r in rows]


def int8_accuracy(args: argparse.Namespace) -> list[dict]:
    """Test AUROC of the trained run in PyTorch fp32, onnxruntime fp32 and int8 (same images, same order)."""
    import numpy as np
    import torch
    import yaml
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader

    import qing
    from qing.data import CXRDataset, DataConfig, collate_skip_bad, load_splits
    from qing.deploy import OnnxModel, export_onnx
    from qing.evaluate import collect_logits

    run = Path(args.trained)
    data_cfg = yaml.safe_load((run / "config.yaml").read_text())["data"]
    splits = load_splits(DataConfig(**data_cfg))
    model = qing.from_pretrained(run / "checkpoints" / "best").eval()
    fp32, int8 = args.work / "trained.onnx", args.work / "trained-int8.onnx"
    export_onnx(model, fp32, images=[DATA / "NORMAL"], overwrite=True)
    quantize_int8(fp32, int8, overwrite=True)
    transform = qing.build_transforms(model, train=False)
    rows = []
    for split_name, samples in (("test", splits.test), ("all 200", splits.train + splits.val + splits.test)):
        dataset = CXRDataset(samples, task="binary", transform=transform)
        targets = dataset.targets.numpy().ravel()
        probs = {}
        for name, runner in (("torch_fp32", model), ("ort_fp32", OnnxModel(fp32)), ("ort_int8", OnnxModel(int8))):
            loader = DataLoader(dataset, batch_size=16, collate_fn=collate_skip_bad)
            out = collect_logits(runner, loader)
            assert out.indices.tolist() == list(range(len(dataset)))
            probs[name] = torch.sigmoid(out.logits).numpy().ravel()
        reference = roc_auc_score(targets, probs["torch_fp32"])
        for name, p in probs.items():
            auroc = roc_auc_score(targets, p)
            rows.append({
                "phase": "int8_accuracy", "images": f"{split_name} ({len(samples)})", "backend": name,
                "auroc": round(auroc, 4), "auroc_change_vs_torch_fp32": round(auroc - reference, 4),
                "max_abs_prob_change": float(f"{np.abs(p - probs['torch_fp32']).max():.3g}"),
                "decisions_changed_at_0.5": int(((p >= 0.5) != (probs["torch_fp32"] >= 0.5)).sum()),
            })  # fmt: skip
    return rows


# ---- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="throughput,predict,int8_accuracy")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--predict", default=",".join(PREDICT), help="qing predict variants")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads of the throughput part")
    parser.add_argument("--iters", type=int, default=3, help="batches per timing window at batch > 1")
    parser.add_argument("--iters-b1", type=int, default=16, help="batches per timing window at batch 1")
    parser.add_argument("--windows", type=int, default=3, help="timing windows; the best is kept")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per variant, alternating; median")
    parser.add_argument("--trained", type=Path, help="a qing train run folder on cxr-pneumonia-200 (int8 accuracy)")
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the ONNX files, reused when present (default: temporary)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "inference_cpu.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return 0

    args.backends = args.backends.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.predict = args.predict.split(",")
    parts = args.parts.split(",")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="qing-inference-bench-") as tmp:
        args.work = args.work or Path(tmp)
        args.work.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        if "throughput" in parts:
            prepare(args.work, args.img_size)
            rows += throughput(args)
        if "predict" in parts:
            rows += predict_end_to_end(args)
        if "int8_accuracy" in parts and args.trained:
            rows += int8_accuracy(args)
    config = _environment(args, parts, time.time() - started)
    if args.out.is_file():  # keep the rows (and the command) of the parts not run this time
        previous = json.loads(args.out.read_text())
        ran = {row["phase"] for row in rows}
        rows = [row for row in previous.get("rows", []) if row.get("phase") not in ran] + rows
        commands = {**previous.get("config", {}).get("commands", {}), **config["commands"]}
        config = {**previous.get("config", {}), **config, "commands": commands}
    result = {"config": config, "rows": rows, "targets": _targets(rows)}
    print(json.dumps(result["targets"], indent=2))
    for row in rows:
        print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")
    return 0


def _targets(rows: list[dict]) -> dict:
    def ratio(phase: str, key: str, value: str, batch: int | None = None) -> float | None:
        for r in rows:
            if r["phase"] == phase and r.get(key) == value and (batch is None or r.get("batch") == batch):
                return r.get("ratio_vs_torch_fp32" if phase == "throughput" else "ratio_vs_default")
        return None

    ort_b1 = ratio("throughput", "backend", "ort_fp32", 1)
    predict = {r["variant"]: r.get("ratio_vs_default") for r in rows if r["phase"] == "predict"}
    best = max(((v, k) for k, v in predict.items() if v is not None and k != "default"), default=(None, None))
    int8 = [r for r in rows if r["phase"] == "int8_accuracy" and r["backend"] == "ort_int8"]
    drop = -min((r["auroc_change_vs_torch_fp32"] for r in int8), default=float("nan"))
    return {
        "onnxruntime fp32 >= 2x PyTorch fp32 eager at batch 1": {"ratio": ort_b1, "met": bool(ort_b1 and ort_b1 >= 2)},
        "qing predict end to end >= 1.5x today's default": {
            "best_variant": best[1],
            "ratio": best[0],
            "met": bool(best[0] and best[0] >= 1.5),
        },
        "int8 offered only if the test AUROC drops <= 0.005": {
            "auroc_drop": None if drop != drop else round(drop, 4),
            "offered": bool(int8) and drop <= 0.005,
        },
    }


def _environment(args: argparse.Namespace, parts: list[str], wall_s: float) -> dict:
    import onnxruntime
    import timm
    import torch

    return {
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": f"{args.threads} per throughput process (torch and onnxruntime); qing predict: its defaults",
        "model": f"throughput: {MODEL} ({NUM_CLASSES} outputs, random weights); predict: "
        + ("the trained run's model" if args.trained else "a random binary one"),
        "img_size": args.img_size,
        "parts": parts,
        "iters_per_window": {"batch 1": args.iters_b1, "batch > 1": args.iters},
        "windows": args.windows,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "predict_data": f"{DATA.name} (200 JPEG, 224x224)",
        "trained_run": str(args.trained) if args.trained else None,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "timm": timm.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average_at_end": [round(v, 1) for v in os.getloadavg()],
        "wall_s": round(wall_s),
        "commands": {part: "python benchmarks/inference.py " + " ".join(sys.argv[1:]) for part in parts},
    }


if __name__ == "__main__":
    sys.exit(main())
