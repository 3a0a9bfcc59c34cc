"""torchxrayvision DenseNet121 weights in qing, checked against the real torchxrayvision package.

``xrv.models.DenseNet(weights=None)`` builds without downloading; its random weights (with random
BatchNorm statistics and the ``all`` operating points) stand in for a release file.
"""

import logging
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import qing
from qing.convert import load_xrv_file
from qing.weights import XRV_PATHOLOGIES, XRV_WEIGHTS
from qing.weights.xrv import thresholds_from_op_threshs
from tests.model_helpers import randomize_batchnorm

xrv = pytest.importorskip("torchxrayvision")


@pytest.fixture(scope="module")
def txv():
    torch.manual_seed(8)
    model = xrv.models.DenseNet(weights=None, op_threshs=torch.tensor(xrv.models.model_urls["all"]["op_threshs"]))
    randomize_batchnorm(model)
    return model.eval()


@pytest.fixture(scope="module")
def txv_file(txv, tmp_path_factory):
    path = tmp_path_factory.mktemp("xrv") / "xrv_all_state_dict.pt"
    torch.save(txv.state_dict(), path)  # tensors only, op_threshs included
    return path


def _xrv_input(batch: int, size: int) -> torch.Tensor:
    """Images scaled as torchxrayvision expects them: [-1024, 1024]."""
    return torch.rand(batch, 1, size, size) * 2048 - 1024


def test_weight_data_matches_torchxrayvision():
    assert XRV_PATHOLOGIES == tuple(xrv.models.DenseNet.targets) == tuple(xrv.datasets.default_pathologies)
    for tag, weights in XRV_WEIGHTS.items():
        upstream = xrv.models.model_urls[weights.name]
        assert upstream is xrv.models.model_urls[tag]
        assert weights.labels == tuple(upstream["labels"]) and weights.url == upstream["weights_url"]
        for ours, theirs in zip(weights.op_threshs, upstream["op_threshs"], strict=True):
            assert (math.isnan(ours) and math.isnan(theirs)) or ours == theirs


def test_state_dict_into_the_plain_classifier(txv, txv_file):
    converted = load_xrv_file(txv_file)
    assert (converted.format, converted.model_name) == ("xrv_densenet", "qing_xrv_densenet121")
    assert converted.model_kwargs == {"in_chans": 1, "num_classes": 18}
    assert converted.thresholds == thresholds_from_op_threshs(torch.tensor(XRV_WEIGHTS["all"].op_threshs))
    cfg = converted.pretrained_cfg
    assert (cfg["mean"], cfg["std"], cfg["input_size"]) == ((0.5,), (1 / 2048,), (1, 224, 224))
    assert cfg["label_names"] == XRV_PATHOLOGIES

    model = converted.create_model().eval()
    assert model.qing_meta.thresholds == converted.thresholds and model.qing_meta.task == "multilabel"
    x = _xrv_input(2, 128)
    with torch.no_grad():
        features = txv.features(x)
        assert torch.allclose(model.forward_features(x), F.relu(features), atol=1e-4)
        logits = model(x)
        assert torch.allclose(logits, txv.classifier(txv.features2(x)), atol=1e-5)
        # torchxrayvision's output rescales sigmoid(logits) so that each op_thresh maps to 0.5
        calibrated = txv(x)
        thresholds = torch.tensor(model.qing_meta.thresholds)
        assert torch.allclose(calibrated, xrv.models.op_norm(torch.sigmoid(logits), thresholds), atol=1e-5)
        assert torch.equal(calibrated >= 0.5, torch.sigmoid(logits) >= thresholds)


def test_one_channel_backbone_of_a_hybrid(txv, txv_file):
    model = qing.create_model(
        "qing_densenet121_tr2.xrv_all", pretrained=True, pretrained_cfg_overlay=dict(file=str(txv_file))
    ).eval()
    assert model.in_chans == 1 and model.qing_load_report.format == "xrv_densenet"
    assert sorted(model.qing_load_report.unused) == ["classifier.bias", "classifier.weight", "op_threshs"]
    x = _xrv_input(2, 96)
    with torch.no_grad():
        assert torch.allclose(model.backbone.forward_features(x), txv.features(x), atol=1e-4)

    # the recorded normalization on [0, 1] images is torchxrayvision's scaling to [-1024, 1024]
    cfg = model.pretrained_cfg
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32)).astype(np.float32)
    ours = (torch.from_numpy(image / 255.0) - cfg["mean"][0]) / cfg["std"][0]
    assert np.allclose(ours.numpy(), xrv.utils.normalize(image, 255), atol=1e-3)


def test_release_files_load_without_trust_or_torchxrayvision_code(txv, tmp_path, monkeypatch, caplog):
    """Release files are whole pickled modules: read through inert stand-ins, no trust flag, no warning."""
    monkeypatch.delenv("QING_TRUST_PICKLE", raising=False)
    monkeypatch.setenv("QING_WEIGHTS_DIR", str(tmp_path))
    release = xrv.models.DenseNet(weights=None).eval()  # release files: whole pickled modules, no op_threshs
    release.load_state_dict({k: v for k, v in txv.state_dict().items() if k != "op_threshs"}, strict=False)
    path = tmp_path / "xrv" / XRV_WEIGHTS["nih"].filename  # where qing keeps the nih tag's download
    path.parent.mkdir()
    torch.save(release, path, _use_new_zipfile_serialization=False)  # the pre-1.6 format of 2020's releases

    converted = load_xrv_file(path)
    assert converted.pretrained_cfg["label_names"] == XRV_PATHOLOGIES
    assert converted.thresholds is None  # the file has none; the registry tag does

    with caplog.at_level(logging.WARNING, logger="qing"):
        model = qing.create_model("qing_xrv_densenet121.nih", pretrained=True).eval()
    assert "Unpickling" not in caplog.text and model.qing_load_report.source == str(path)
    assert model.qing_meta.thresholds == thresholds_from_op_threshs(XRV_WEIGHTS["nih"].op_threshs)
    assert model.qing_meta.thresholds[14:] == [0.5] * 4  # untrained outputs (NaN upstream)
    assert model.pretrained_cfg["label_names"][14:] == ("", "", "", "")
    x = _xrv_input(1, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), release.classifier(release.features2(x)), atol=1e-5)
