"""Shared test setup: offline Hub, deterministic torch, paths to the real CXR images."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may touch the network
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QING_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
PNEUMONIA_200 = SHARED_DATA / "cxr-pneumonia-200"
NIH_64 = SHARED_DATA / "nih-cxr14-64px"

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one core per xdist worker


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def pneumonia_200() -> Path:
    """The 200 real pediatric CXRs (NORMAL/PNEUMONIA); skips where ../shared/data is absent."""
    if not PNEUMONIA_200.is_dir():
        pytest.skip(f"real CXR data not found at {PNEUMONIA_200} (set QING_SHARED_DATA)")
    return PNEUMONIA_200


@pytest.fixture
def nih_64() -> Path:
    """The 1000 NIH ChestX-ray14 images at 64 px with labels.csv; skips where absent."""
    if not NIH_64.is_dir():
        pytest.skip(f"real CXR data not found at {NIH_64} (set QING_SHARED_DATA)")
    return NIH_64
