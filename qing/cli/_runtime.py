"""How ``qing predict`` and ``qing eval`` run a model: PyTorch (with its fast paths) or onnxruntime.

Both commands take the same runtime flags and hand :func:`build_runner`'s :class:`qing.evaluate.Runner`
to the one inference loop (:func:`qing.evaluate.iter_logits`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from qing.cli._common import CLIError, LoadedModel
from qing.deploy import OnnxModel, OnnxParityError, export_onnx
from qing.evaluate import Runner, TorchRunner, TTAModel

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RUNTIMES = ("torch", "onnx")


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """``--runtime``, and the PyTorch fast paths ``--amp``, ``--channels-last`` and ``--compile``."""
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="torch, or onnx: export to ONNX (checked against PyTorch) and run onnxruntime "
        "(default: onnx for a .onnx MODEL, else torch)",
    )
    group.add_argument("--amp", choices=sorted(AMP_DTYPES), help="PyTorch: run under autocast in bf16 or fp16")
    group.add_argument(
        "--channels-last", action="store_true", help="PyTorch: weights and images in channels_last memory format"
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="PyTorch: torch.compile the model (mode reduce-overhead, i.e. CUDA graphs, on CUDA); "
        "the first batches pay for the compilation",
    )


def runtime_of(args: argparse.Namespace, loaded: LoadedModel) -> str:
    """The runtime asked for (``torch`` or ``onnx``), checked against the MODEL and the other flags."""
    runtime = args.runtime or ("onnx" if loaded.model is None else "torch")
    if runtime == "torch" and loaded.model is None:
        raise CLIError(f"--runtime torch needs a PyTorch model; {loaded.name} is an ONNX file (use --runtime onnx)")
    if runtime == "onnx":
        torch_only = [flag for flag, value in _torch_flags(args).items() if value]
        if torch_only:
            raise CLIError(
                f"{', '.join(torch_only)}: PyTorch runtime options, not onnxruntime's; drop them or use --runtime torch"
            )
    return runtime


def _torch_flags(args: argparse.Namespace) -> dict[str, object]:
    flags = {"--amp": args.amp, "--channels-last": args.channels_last, "--compile": args.compile}
    return {**flags, "--tta": getattr(args, "tta", False)}


def onnx_providers(device: torch.device) -> list[str]:
    """onnxruntime execution providers for ``--device`` (CUDA must be in the installed onnxruntime)."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    import onnxruntime  # the optional extra: imported only when an ONNX model runs on CUDA

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise CLIError(
            f"--device {device} with --runtime onnx needs onnxruntime with CUDA (pip install onnxruntime-gpu); "
            "this onnxruntime has only " + ", ".join(onnxruntime.get_available_providers())
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def build_runner(
    loaded: LoadedModel,
    args: argparse.Namespace,
    device: torch.device,
    *,
    check_images: Sequence[Path] = (),
) -> Runner:
    """The :class:`qing.evaluate.Runner` of ``loaded`` for the runtime flags in ``args``.

    ``--tta`` (where the command has it) wraps the PyTorch model in :class:`qing.evaluate.TTAModel`.

    ``--runtime onnx`` with a PyTorch model exports it to a temporary ONNX file first, checked
    against PyTorch on ``check_images`` (some of the inputs) and random inputs; the file is removed
    once onnxruntime has loaded it.
    """
    runtime = runtime_of(args, loaded)
    if runtime == "torch":
        assert loaded.model is not None
        model = TTAModel(loaded.model, task=loaded.task).eval() if getattr(args, "tta", False) else loaded.model
        return TorchRunner(
            model,
            device=device,
            amp_dtype=AMP_DTYPES.get(args.amp) if args.amp else None,
            channels_last=args.channels_last,
            compile=args.compile,
        )
    providers = onnx_providers(device)
    if loaded.onnx is not None:
        if device.type == "cuda":
            loaded.onnx = OnnxModel(loaded.onnx.path, providers=providers)
        return loaded.onnx
    assert loaded.model is not None
    with tempfile.TemporaryDirectory(prefix="qing-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        try:
            report = export_onnx(loaded.model, path, images=list(check_images), source=loaded.name)
        except OnnxParityError as err:
            raise CLIError(f"--runtime onnx: {err}; run it with --runtime torch") from err
        worst = max(report.max_abs_diff.values())
        print(
            f"qing: exported {loaded.name} to ONNX on the fly (opset {report.opset}, {report.spatial} input size, "
            f"max |logit difference| to PyTorch {worst:.2g})",
            file=sys.stderr,
        )
        onnx_model = OnnxModel(path, providers=providers)
    loaded.onnx = onnx_model
    return onnx_model


def heatmap_refusal(loaded: LoadedModel, runtime: str) -> Optional[str]:
    """Why ``--heatmaps`` cannot be drawn with this model and runtime, or ``None``."""
    if loaded.model is None:
        return (
            f"--heatmaps needs the PyTorch model: Grad-CAM and attention maps are not part of the ONNX graph of "
            f"{loaded.name}; "
            "give the model folder it was exported from"
        )
    if runtime == "onnx":
        return "--heatmaps runs on the PyTorch model; drop --runtime onnx to draw them"
    return None
