"""``qing push`` / ``qing pull`` through the installed command against the tests' loopback Hub.

The subprocesses find the Hub through ``HF_ENDPOINT`` and authenticate with ``HF_TOKEN``, as users do;
``HF_HUB_OFFLINE`` decides whether ``pull`` may ask the Hub or must use the local cache.
"""

from __future__ import annotations

import json

import safetensors.torch
import torch

import qing
from qing.cli import main
from qing.meta import set_meta
from tests.test_cli import qing_env, run_qing

pytest_plugins = ["tests.hub_server"]  # the loopback Hub fixtures: hub_server, hub

REPO = "qing-tester/cxr-pneumonia"


def _run_folder(tmp_path):
    """A run folder whose checkpoints/best holds a binary qing_test_tr1 with thresholds and metrics."""
    torch.manual_seed(3)
    model = qing.create_model("qing_test_tr1", num_classes=1).eval()
    set_meta(model, task="binary", thresholds=[0.42], threshold_method="youden", metrics={"test_roc_auc": 0.91})
    best = tmp_path / "run" / "checkpoints" / "best"
    qing.save_pretrained(model, best, label_names=["Pneumonia"], data_config={"input_size": (3, 64, 64)})
    return model, best


def _hub_env(hub, **overrides):
    values = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_TOKEN": hub.token,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_CACHE": str(hub.cache_dir),
        "HF_HOME": str(hub.cache_dir.parent / "hf-home"),
    }
    return qing_env(**{**values, **overrides})


def test_push_then_pull_online_and_offline(hub, tmp_path):
    model, best = _run_folder(tmp_path)
    pushed = run_qing("push", "run", REPO, "--message", "first model", cwd=tmp_path, env=_hub_env(hub))
    assert pushed.returncode == 0, pushed.stderr
    files = hub.files(REPO)
    assert {"README.md", "config.json", "model.safetensors"} <= set(files)
    weights = safetensors.torch.load(files["model.safetensors"])
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    config = json.loads(files["config.json"])
    assert config["label_names"] == ["Pneumonia"] and config["qing"]["thresholds"] == [0.42]
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    with hub.state.lock:
        oid = hub.state.repos[REPO].branches["main"]
        assert hub.state.repos[REPO].commits[oid].title == "first model"
    source = best.relative_to(tmp_path)
    assert pushed.stdout.splitlines()[0] == f"pushed model folder {source} to {REPO} on {hub.endpoint}"
    assert f"qing predict hf-hub:{REPO}@{oid} IMAGE.png" in pushed.stdout

    pulled = run_qing("pull", REPO, "pulled", cwd=tmp_path, env=_hub_env(hub))
    assert pulled.returncode == 0, pulled.stderr
    folder = tmp_path / "pulled"
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert (folder / "config.json").read_bytes() == files["config.json"]
    assert pulled.stdout.splitlines()[:3] == [
        f"pulled {REPO} from {hub.endpoint}",
        "model: qing_test_tr1, 1 output(s) (Pneumonia), task binary",
        "thresholds: 0.42 (youden)",
    ]

    # offline: the same files come from the Hub cache the online pull filled, without a single request
    before = len(hub.state.requests)
    offline = run_qing("pull", REPO, "pulled-offline", cwd=tmp_path, env=_hub_env(hub, HF_HUB_OFFLINE="1"))
    assert offline.returncode == 0, offline.stderr
    assert len(hub.state.requests) == before
    assert offline.stdout.splitlines()[0] == f"pulled {REPO} from the local Hub cache"
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "pulled-offline" / name).read_bytes() == files[name]


def test_pull_offline_without_a_cached_copy_fails_in_one_line(hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    assert main(["pull", "qing-tester/never-pushed", "out", "--cache-dir", str(hub.cache_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        "qing: error: Hub repo 'qing-tester/never-pushed' is not in the local Hub cache "
        f"({hub.cache_dir}) and offline mode is on (HF_HUB_OFFLINE=1); "
    )
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert hub.state.requests == []


def test_push_refuses_offline_mode_and_pull_refuses_a_used_folder(hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    _run_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", "run", REPO]) == 1
    assert capsys.readouterr().err == (
        "qing: error: pushing needs the network but HF_HUB_OFFLINE is set; unset it (or set HF_HUB_OFFLINE=0)\n"
    )
    assert main(["pull", REPO, "run"]) == 1
    assert capsys.readouterr().err == (
        "qing: error: DIR run already exists and is not empty; pass --overwrite or choose another folder\n"
    )
    assert hub.state.requests == []
