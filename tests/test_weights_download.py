"""``pretrained=True`` downloads published weights on first use: from a file server on 127.0.0.1.

The server stands in for GitHub: it serves a CheXNet-layout legacy ``model.pth.tar`` and a real
``torch.save(torchxrayvision.models.DenseNet(weights=None))`` pickle, both written here with random
weights. The registry tags keep their names and destinations; only their URL points at the server.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torchvision
from timm.models import _registry
from torch import nn
from torch.nn import functional as F

import qing
from qing.weights import (
    UnsafeCheckpointError,
    WeightsDownloadError,
    WeightsIntegrityError,
    WeightsNotFoundError,
    integrity_record_path,
    read_state_dict,
)
from tests.model_helpers import legacy_chexnet_state_dict, randomize_batchnorm

pytest_plugins = ["tests.weights_server"]  # weights_server, online_weights

xrv = pytest.importorskip("torchxrayvision")

CHEXNET_TAGS = ("qing_densenet121_tr2.chexnet", "qing_chexnet_densenet121.chexnet")
XRV_TAG = "qing_xrv_densenet121.all"
XRV_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"


class Payload:
    """A class nobody allowed: a pickle holding it must be refused."""


@pytest.fixture(scope="module")
def chexnet_file(tmp_path_factory):
    """``(torchvision CheXNet reference, bytes of its model.pth.tar)``: the legacy format, DataParallel names."""
    torch.manual_seed(21)
    reference = torchvision.models.densenet121(weights=None)
    reference.classifier = nn.Sequential(nn.Linear(1024, 14), nn.Sigmoid())
    randomize_batchnorm(reference).eval()
    path = tmp_path_factory.mktemp("chexnet") / "model.pth.tar"
    checkpoint = {"epoch": 3, "arch": "densenet121", "state_dict": legacy_chexnet_state_dict(reference)}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    return reference, path.read_bytes()


@pytest.fixture(scope="module")
def xrv_file(tmp_path_factory):
    """``(torchxrayvision DenseNet, bytes of torch.save(model))``: a whole pickled module, as released."""
    torch.manual_seed(22)
    model = randomize_batchnorm(xrv.models.DenseNet(weights=None)).eval()
    path = tmp_path_factory.mktemp("xrv") / XRV_FILE
    torch.save(model, path)
    return model, path.read_bytes()


def point_tag_at(monkeypatch, name: str, url: str) -> None:
    """Make a registry tag's published URL ``url`` (the registry entry itself, as ``create_model`` reads it)."""
    monkeypatch.setattr(_registry._model_pretrained_cfgs[name], "url", url)
    assert timm.models.get_pretrained_cfg(name).url == url


def _serve_chexnet(server, monkeypatch, data: bytes, **kwargs) -> str:
    url = server.serve("arnoweng/CheXNet/master/model.pth.tar", data, **kwargs)
    for name in CHEXNET_TAGS:
        point_tag_at(monkeypatch, name, url)
    return url


def _weights_dir():
    return qing.weights.weights_dir()


def _chexnet_logits(reference: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return reference.classifier[0](F.adaptive_avg_pool2d(F.relu(reference.features(x)), 1).flatten(1))


def test_chexnet_downloads_once_then_loads_without_a_request(online_weights, chexnet_file, monkeypatch):
    reference, data = chexnet_file
    url = _serve_chexnet(online_weights, monkeypatch, data)

    hybrid = qing.create_model("qing_densenet121_tr2", pretrained=True).eval()  # the README's first line
    target = _weights_dir() / "chexnet" / "model.pth.tar"
    assert online_weights.requests == ["/arnoweng/CheXNet/master/model.pth.tar"]
    assert target.read_bytes() == data and hybrid.qing_load_report.source == str(target)
    record = json.loads(integrity_record_path(target).read_text())
    assert record == {"url": url, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pth.tar", "model.pth.tar.integrity.json"]
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(hybrid.backbone.forward_features(x), reference.features(x), atol=1e-5)

    plain = qing.create_model("qing_chexnet_densenet121", pretrained=True).eval()  # the same file, no request
    again = qing.create_model("qing_densenet121_tr2.chexnet", pretrained=True)
    assert len(online_weights.requests) == 1
    with torch.no_grad():
        assert torch.allclose(plain(x), _chexnet_logits(reference, x), atol=1e-5)
    assert plain.pretrained_cfg["label_names"][6] == "Pneumonia" and again.qing_load_report.format == "chexnet"


def test_torchxrayvision_pickle_downloads_and_loads_without_torchxrayvision(online_weights, xrv_file, monkeypatch):
    txv, data = xrv_file
    point_tag_at(monkeypatch, XRV_TAG, online_weights.serve(f"releases/download/v1/{XRV_FILE}", data))
    model = qing.create_model(XRV_TAG, pretrained=True).eval()  # no trust flag, no QING_TRUST_PICKLE
    target = _weights_dir() / "xrv" / XRV_FILE
    assert online_weights.requests == [f"/releases/download/v1/{XRV_FILE}"] and target.read_bytes() == data
    assert model.qing_load_report.format == "xrv_densenet" and model.qing_meta.thresholds[0] == pytest.approx(
        0.0742, abs=1e-4
    )
    x = torch.rand(2, 1, 64, 64) * 2048 - 1024
    with torch.no_grad():
        expected = txv.classifier(txv.features2(x))
        assert torch.allclose(model(x), expected, atol=1e-5)

    # a fresh process: the file is read without importing torchxrayvision, and without the network
    script = textwrap.dedent(
        f"""
        import sys, torch, qing
        model = qing.create_model({XRV_TAG!r}, pretrained=True).eval()
        torch.manual_seed(0)
        x = torch.rand(2, 1, 64, 64) * 2048 - 1024
        with torch.no_grad():
            torch.save(model(x), sys.argv[1])
        print("torchxrayvision" in sys.modules, model.qing_load_report.source)
        """
    )
    out = target.parent / "logits.pt"
    env = dict(os.environ, QING_OFFLINE="1", PYTHONPATH=os.getcwd())
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", str(target)]
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64) * 2048 - 1024
    with torch.no_grad():
        expected = txv.classifier(txv.features2(x))
        assert torch.allclose(torch.load(out, weights_only=True), expected, rtol=1e-5, atol=1e-3)
    assert len(online_weights.requests) == 1


def test_legacy_format_module_pickles_read_the_same(xrv_file, tmp_path):
    """Release files written before PyTorch 1.6 use the legacy format: the same stand-ins read them."""
    txv, data = xrv_file
    legacy = tmp_path / "legacy.pt"
    torch.save(txv, legacy, _use_new_zipfile_serialization=False)
    zipped = tmp_path / "zip.pt"
    zipped.write_bytes(data)
    for path in (legacy, zipped):
        state = read_state_dict(path)
        assert state.keys() == txv.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in txv.state_dict().items())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_module_pickle_with_an_unknown_global_is_refused(xrv_file, tmp_path, monkeypatch, legacy):
    monkeypatch.setenv("QING_TRUST_PICKLE", "1")  # not even trust helps a registry file; here: read_checkpoint
    txv, _ = xrv_file
    planted = xrv.models.DenseNet(weights=None)
    planted.load_state_dict(txv.state_dict())
    planted.payload = Payload()
    path = tmp_path / "planted.pt"
    torch.save(planted, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as err:
        read_state_dict(path, trust_pickle=False)
    assert str(err.value).startswith(
        f"refusing to unpickle {path}: unsafe pickle: it contains tests.test_weights_download.Payload. "
    )


def test_a_connection_cut_mid_file_leaves_nothing(online_weights, chexnet_file, monkeypatch):
    _, data = chexnet_file
    url = _serve_chexnet(online_weights, monkeypatch, data, cut=True)
    with pytest.raises(WeightsDownloadError) as err:
        qing.create_model("qing_chexnet_densenet121", pretrained=True)
    target = _weights_dir() / "chexnet" / "model.pth.tar"
    assert str(err.value) == (
        f"could not download {url}: the connection closed after {len(data) // 2} of {len(data)} bytes; "
        f"try again, or put the file at {target} yourself (download {url} on a machine with network access)"
    )
    assert list(target.parent.iterdir()) == []  # no partial file, no temporary file, no record


def test_a_tampered_file_is_refused_with_how_to_refetch(online_weights, chexnet_file, monkeypatch):
    _, data = chexnet_file
    _serve_chexnet(online_weights, monkeypatch, data)
    qing.create_model("qing_chexnet_densenet121", pretrained=True)
    target = _weights_dir() / "chexnet" / "model.pth.tar"
    record = integrity_record_path(target)
    tampered = bytearray(data)
    tampered[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(tampered))
    with pytest.raises(WeightsIntegrityError) as err:
        qing.create_model("qing_chexnet_densenet121", pretrained=True)
    actual = hashlib.sha256(tampered).hexdigest()
    assert str(err.value) == (
        f"{target} has sha256 {actual}, but {hashlib.sha256(data).hexdigest()} was recorded in {record} when it was "
        f"downloaded from {online_weights.url('arnoweng/CheXNet/master/model.pth.tar')}: the file was changed or "
        f"damaged; to fetch the file again, delete {target} and {record} and load the model again (it downloads anew)"
    )
    target.write_bytes(data[:-10])
    with pytest.raises(WeightsIntegrityError, match=f"{target} has {len(data) - 10} bytes, but {len(data)} were"):
        qing.create_model("qing_chexnet_densenet121", pretrained=True)
    assert len(online_weights.requests) == 1  # refused, never silently re-fetched


def test_http_404_and_offline_mode_say_where_to_put_the_file(online_weights, monkeypatch):
    url = online_weights.url("arnoweng/CheXNet/master/model.pth.tar")  # nothing served there
    point_tag_at(monkeypatch, "qing_chexnet_densenet121.chexnet", url)
    target = _weights_dir() / "chexnet" / "model.pth.tar"
    with pytest.raises(WeightsDownloadError) as err:
        qing.create_model("qing_chexnet_densenet121", pretrained=True)
    assert str(err.value) == (
        f"could not download {url}: HTTP 404 Not Found; put the file at {target} yourself "
        f"(download {url} on a machine with network access)"
    )
    assert isinstance(err.value, WeightsNotFoundError) and not target.exists()

    online_weights.reset()
    for variable in ("QING_OFFLINE", "HF_HUB_OFFLINE"):
        if variable == "QING_OFFLINE":
            monkeypatch.setenv("QING_OFFLINE", "1")
        else:
            monkeypatch.delenv("QING_OFFLINE")
            monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        with pytest.raises(WeightsNotFoundError) as err:
            qing.create_model("qing_chexnet_densenet121", pretrained=True)
        lines = str(err.value).splitlines()
        assert lines[0] == (
            f"pretrained weights for qing_chexnet_densenet121.chexnet not found (offline mode is on: {variable}=1). "
            "Looked in:"
        )
        assert lines[3] == (
            f"  1. the download: qing fetches {url} on first use; offline mode is on ({variable}=1): fetch it where "
            "the network is reachable"
        )
        assert lines[-1].startswith(f"  3. the qing weights directory: put the file at {target} ")
    assert online_weights.requests == []


def test_a_network_error_is_one_line(online_weights, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model.pth.tar"
    with pytest.raises(WeightsDownloadError) as err:
        qing.create_model("qing_test_tr1", pretrained=True, pretrained_cfg_overlay=dict(url=url))
    message = str(err.value)
    assert message.startswith(f"could not download {url}: network error (") and "\n" not in message
    assert f"put the file at {_weights_dir() / 'downloads'}" in message


def test_any_url_through_the_overlay_and_a_pinned_sha256(online_weights, tmp_path):
    torch.manual_seed(5)
    source = qing.create_model("qing_test_tr1", num_classes=2).eval()
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 4}, path)
    data = path.read_bytes()
    url = online_weights.serve("files/tiny.pth", data)
    sha256 = hashlib.sha256(data).hexdigest()

    wrong = "0" * 64
    with pytest.raises(WeightsIntegrityError) as err:
        qing.create_model(
            "qing_test_tr1", pretrained=True, num_classes=2, pretrained_cfg_overlay=dict(url=f"{url}#sha256={wrong}")
        )
    assert str(err.value) == (
        f"the file downloaded from {url} has sha256 {sha256}, but qing's registry pins {wrong}; it was not kept. "
        "The server holds other bytes than the published weights"
    )
    assert not (_weights_dir() / "downloads").exists() or not any((_weights_dir() / "downloads").rglob("*.pth"))

    x = torch.randn(1, 3, 64, 64)
    for _ in range(2):
        model = qing.create_model(
            "qing_test_tr1", pretrained=True, num_classes=2, pretrained_cfg_overlay=dict(url=f"{url}#sha256={sha256}")
        ).eval()
        with torch.no_grad():
            assert torch.equal(model(x), source(x))
    target = _weights_dir() / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16] / "tiny.pth"
    assert model.qing_load_report.source == str(target) and target.read_bytes() == data
    assert online_weights.requests == ["/files/tiny.pth"] * 2  # the refused download, then one that was kept
