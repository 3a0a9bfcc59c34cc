"""Mixed precision: which autocast dtype a run uses on its device.

- CUDA: ``bf16`` where the GPU supports it (``amp="auto"`` picks it), ``fp16`` with a gradient scaler.
- CPU: ``bf16`` autocast where the CPU has bfloat16 instructions (AVX512-BF16 or AMX on x86, BF16 on
  Arm: oneDNN's own check). Elsewhere PyTorch emulates bfloat16 and trains several times *slower*
  than float32, so ``amp="bf16"`` is refused there with a message saying so. ``amp="auto"`` picks bf16
  on CPUs with the instructions (see :data:`CPU_AUTO_BF16`) and float32 elsewhere. ``fp16`` on CPU is
  refused (no scaler, no speed-up).

The environment variable ``QING_CPU_BF16`` overrides the CPU check (``1``: treat the CPU as
supporting bf16, e.g. to test the bf16 path on any machine; ``0``: as not supporting it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from qing.train.wording import option

__all__ = ["CPU_AUTO_BF16", "CPU_BF16_ENV", "CPUBF16Support", "cpu_bf16_support", "resolve_amp"]

#: Environment variable overriding the CPU bf16 check: ``1`` (supported) or ``0`` (not supported).
CPU_BF16_ENV = "QING_CPU_BF16"

#: Whether ``amp="auto"`` trains in bf16 on a CPU with bfloat16 instructions. Decided by the bf16-vs-fp32
#: fine-tuning benchmark (``benchmarks/finetune.py pneumonia200 --compare-amp``, results in
#: ``benchmarks/results/finetune_pneumonia200_amp_cpu.json``): only if the test AUROC difference is within
#: the spread over seeds. Three seeds on cxr-pneumonia-200: bf16 - fp32 = +0.006, -0.010, +0.005, mean +0.0004
#: against a float32 spread (sd) of 0.006 over the seeds, so bf16 is chosen.
CPU_AUTO_BF16 = True

_AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags in /proc/cpuinfo
_ARM_FEATURES = ("bf16",)  # "Features" in /proc/cpuinfo on Arm


@dataclass(frozen=True)
class CPUBF16Support:
    """Whether bf16 autocast pays on this CPU.

    Attributes:
        native: The CPU has bfloat16 instructions.
        forced: The ``QING_CPU_BF16`` override (``None`` when unset).
        capability: PyTorch's name of the CPU's vector instructions (``AVX2``, ``AVX512``, ...).
    """

    native: bool
    forced: Optional[bool]
    capability: str

    @property
    def usable(self) -> bool:
        """bf16 autocast is allowed: the CPU has the instructions, or the override says so."""
        return self.native if self.forced is None else self.forced


def _native_cpu_bf16() -> bool:
    try:  # oneDNN's check, the one PyTorch's own bf16 paths use
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = set(text.split())
    return any(flag in words for flag in (*_CPU_FLAGS, *_ARM_FEATURES))


def cpu_bf16_support() -> CPUBF16Support:
    """Detect bfloat16 support of this CPU (and the ``QING_CPU_BF16`` override)."""
    raw = os.environ.get(CPU_BF16_ENV, "").strip()
    forced = None if raw == "" else raw.lower() not in ("0", "false", "no", "off")
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return CPUBF16Support(native=_native_cpu_bf16(), forced=forced, capability=capability)


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a run (``None``: float32).

    Args:
        amp: ``"auto"``, ``"none"``, ``"bf16"`` or ``"fp16"`` (``TrainConfig.amp``).
        device: Where the model trains.

    Raises:
        ValueError: The dtype cannot be used on this device; the message says why and what to set.
    """
    if amp not in ("auto", *_AMP_DTYPES):
        raise ValueError(f"amp must be one of auto, none, bf16, fp16; got {amp!r}")
    if amp == "none":
        return None
    if device.type == "cuda":
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"amp='bf16' but this GPU does not support bfloat16; use {option('amp', 'fp16')} "
                f"or {option('amp', 'none')}"
            )
        return _AMP_DTYPES[amp]
    if device.type != "cpu":
        if amp == "auto":
            return None
        raise ValueError(f"amp={amp!r} is supported on CUDA and CPU, not on {device.type}; use {option('amp', 'none')}")
    if amp == "fp16":
        raise ValueError(
            "amp='fp16' needs CUDA (float16 autocast with a gradient scaler); on a CPU use "
            f"{option('amp', 'bf16')} where the CPU has bfloat16 instructions, or {option('amp', 'none')}"
        )
    support = cpu_bf16_support()
    if amp == "auto":
        return torch.bfloat16 if CPU_AUTO_BF16 and support.usable else None
    if not support.usable:
        raise ValueError(
            f"amp='bf16' on this CPU ({support.capability}) would emulate bfloat16: it has no bfloat16 "
            "instructions (AVX512-BF16 or AMX on x86, BF16 on Arm), and emulated bf16 trains several times "
            f"slower than float32. Use {option('amp', 'none')}, or set {CPU_BF16_ENV}=1 to force bf16 anyway"
        )
    return torch.bfloat16
