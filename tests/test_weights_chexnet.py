"""CheXNet ``model.pth.tar``: exact against torchvision's DenseNet121, into the plain model and the hybrids.

The file is written the way the arnoweng/CheXNet checkpoint is laid out: a legacy (pre-1.6,
non-zip) ``torch.save`` of a training-checkpoint dict whose ``state_dict`` comes from a
DataParallel-wrapped ``DenseNet121`` module (``module.densenet121.``), with torchvision's old
``norm.1``/``conv.1`` dense-layer names, no ``num_batches_tracked`` buffers and a
``classifier.0`` Linear(1024, 14) followed by a Sigmoid.
"""

import logging
import shutil

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import qing
from qing.convert import load_checkpoint_file, load_chexnet_file
from qing.models import checkpoint_filter_fn
from qing.weights import CXR14_LABELS, CheckpointError, convert_chexnet
from tests.model_helpers import legacy_chexnet_state_dict, randomize_batchnorm


@pytest.fixture(scope="module")
def chexnet(tmp_path_factory):
    """``(torchvision CheXNet, path of its model.pth.tar)`` with random weights and BN statistics."""
    torch.manual_seed(11)
    reference = torchvision.models.densenet121(weights=None)
    reference.classifier = nn.Sequential(nn.Linear(1024, 14), nn.Sigmoid())
    randomize_batchnorm(reference)
    reference.eval()
    state_dict = legacy_chexnet_state_dict(reference)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3, betas=(0.9, 0.999))
    path = tmp_path_factory.mktemp("chexnet") / "model.pth.tar"
    checkpoint = {"epoch": 9, "arch": "densenet121", "state_dict": state_dict, "best_loss": 0.1523,
                  "optimizer": optimizer.state_dict()}  # fmt: skip
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    return reference, path


def _torchvision_logits(reference: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """CheXNet's logits from torchvision's ``features`` output: ReLU, average pool, ``classifier[0]``."""
    return reference.classifier[0](F.adaptive_avg_pool2d(F.relu(features), 1).flatten(1))


def test_the_file_is_chexnet_layout(chexnet):
    _, path = chexnet
    checkpoint = torch.load(path, weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in keys
    assert "module.densenet121.classifier.0.weight" in keys
    assert not any(k.endswith("num_batches_tracked") for k in keys)
    assert not path.read_bytes().startswith(b"PK")  # the legacy format, not a zip archive


def test_chexnet_file_equals_torchvision(chexnet, caplog):
    reference, path = chexnet
    with caplog.at_level(logging.INFO, logger="qing"):
        converted = load_chexnet_file(path)
    assert f"{path}: detected chexnet (CheXNet model.pth.tar" in caplog.text
    assert (converted.format, converted.model_name) == ("chexnet", "qing_chexnet_densenet121")
    assert converted.model_kwargs == {"in_chans": 3, "num_classes": 14}
    cfg = converted.pretrained_cfg
    assert cfg["label_names"] == CXR14_LABELS and cfg["file"] == str(path)
    assert (cfg["mean"], cfg["std"]) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    model = converted.create_model().eval()
    assert model.qing_meta.task == "multilabel"
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        features = reference.features(x)
        assert torch.allclose(model.forward_features(x), F.relu(features), atol=1e-5)  # timm: norm5 + ReLU
        logits = model(x)
        assert torch.allclose(logits, _torchvision_logits(reference, features), atol=1e-5)
        assert torch.allclose(torch.sigmoid(logits), reference(x), atol=1e-5)
        x = torch.randn(1, 3, 224, 224)
        assert torch.allclose(torch.sigmoid(model(x)), reference(x), atol=1e-5)


def test_chexnet_backbone_in_the_hybrids(chexnet, tmp_path, monkeypatch):
    reference, path = chexnet
    monkeypatch.setenv("QING_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "chexnet").mkdir()
    shutil.copy(path, tmp_path / "chexnet" / "model.pth.tar")  # the documented place
    model = qing.create_model("qing_densenet121_tr2.chexnet", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(model.backbone.forward_features(x), reference.features(x), atol=1e-5)  # no final ReLU
    report = model.qing_load_report
    assert report.format == "chexnet" and report.source == str(tmp_path / "chexnet" / "model.pth.tar")
    assert report.unused == ["densenet121.classifier.0.weight", "densenet121.classifier.0.bias"]
    assert {k.split(".")[0] for k in report.filled if not k.endswith("num_batches_tracked")} == {
        "cls_token", "token_proj", "blocks", "pre_logits", "head"
    }  # fmt: skip
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)  # CheXNet's normalization

    converted = convert_chexnet(torch.load(path, weights_only=True)["state_dict"])
    for name in ("qing_densenet121_tr2", "qing_densenet121_tr4"):
        hybrid = qing.create_model(name, device="meta")
        backbone = {k for k in hybrid.state_dict() if k.startswith("backbone.") and "num_batches" not in k}
        assert set(converted) == backbone


def test_num_batches_tracked_is_accepted(chexnet):
    reference, _ = chexnet
    state_dict = legacy_chexnet_state_dict(reference, batches_tracked=True)
    model = qing.create_model("qing_chexnet_densenet121").eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))  # strict
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(model(x)), reference(x), atol=1e-5)


def test_other_class_count_reinitializes_only_the_classifier(chexnet, caplog):
    reference, path = chexnet
    with caplog.at_level(logging.WARNING, logger="qing"):
        model = qing.create_model(
            "qing_chexnet_densenet121", pretrained=True, num_classes=2, pretrained_cfg_overlay=dict(file=str(path))
        ).eval()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "qing_chexnet_densenet121.chexnet: randomly initialized (not in the checkpoint): classifier.* (2); "
        "the checkpoint's classifier does not fit the model's 2 outputs (classifier.weight (14, 1024) vs model "
        "(2, 1024); classifier.bias (14,) vs model (2,)): dropped classifier.weight, classifier.bias; label names: "
        "class_0..class_1 (the source's 14 label names do not apply); no thresholds: fine-tune the model before "
        "reading its predictions"
    ]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), F.relu(reference.features(x)), atol=1e-5)
    assert model(x).shape == (1, 2) and model.qing_load_report.dropped == ["classifier.weight", "classifier.bias"]


def test_a_torchvision_densenet_file_is_not_chexnet(chexnet, tmp_path):
    reference, _ = chexnet
    path = tmp_path / "densenet121.pth"
    torch.save(reference.state_dict(), path)  # today's torchvision names, no wrapper prefix
    with pytest.raises(CheckpointError) as err:
        load_chexnet_file(path)
    assert str(err.value) == (
        f"{path}: found a torchvision/timm DenseNet121 (features.*, classifier.*), expected CheXNet model.pth.tar "
        "(module.densenet121.*, legacy norm.1 names, classifier.0)"
    )
    converted = load_checkpoint_file(path, model_name="qing_chexnet_densenet121", label_names=list(CXR14_LABELS))
    assert converted.format == "densenet121" and converted.pretrained_cfg["label_names"] == CXR14_LABELS
    model = converted.create_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(model(x)), reference(x), atol=1e-5)
