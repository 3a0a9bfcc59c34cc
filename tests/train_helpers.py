"""Shared pieces of the trainer tests: tiny configs on synthetic data, weight comparison, thread pinning."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from qing.data import PATIENT_REGEX_SYNTHETIC, make_synthetic_cxr
from qing.train import TrainConfig

TIMING_KEYS = ("epoch_time_s", "train_images_per_s")


def synthetic_root(base: Path, **kwargs: Any) -> Path:
    """16 train (8 patients) and 8 test images at 64 px."""
    options = dict(train_patients_per_class=4, test_patients_per_class=2, images_per_patient=2, size=64, seed=0)
    options.update(kwargs)
    return make_synthetic_cxr(base, **options)


def tiny_config(data_root: Path, output_dir: Path, **overrides: Any) -> TrainConfig:
    """qing_test_tr1 at 64 px on the synthetic data; no report unless asked, CPU, no progress bars."""
    values: dict[str, Any] = dict(
        model="qing_test_tr1",
        img_size=64,
        batch_size=4,
        epochs=2,
        lr=1e-3,
        warmup_epochs=0.5,
        device="cpu",
        progress=False,
        report=False,
        n_bootstrap=20,
        log_images=2,
        output_dir=str(output_dir),
        data={"root": str(data_root), "patient_regex": PATIENT_REGEX_SYNTHETIC, "val_fraction": 0.25},
    )
    data = {**values["data"], **overrides.pop("data", {})}
    values.update(overrides)
    values["data"] = data
    return TrainConfig.from_dict(values)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The ``model.safetensors`` of a checkpoint folder."""
    return load_file(Path(folder) / "model.safetensors")


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def without_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Pin torch to one thread (as the subprocess runs are), so CPU arithmetic is identical."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
