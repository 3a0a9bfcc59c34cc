"""``qing convert`` on each foreign format, through the installed command; the folder it writes loads in qing
and gives the outputs of the original implementation (torchvision CheXNet, the original hybrid, torchxrayvision)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import qing
from qing.weights import CXR14_LABELS, XRV_PATHOLOGIES
from tests.model_helpers import legacy_chexnet_state_dict, randomize_batchnorm
from tests.reference.original_hybrid import OriginalHybrid
from tests.test_cli import run_qing


def _loaded(folder):
    return qing.create_model(f"local-dir:{folder}", pretrained=True).eval()


def test_convert_chexnet(tmp_path):
    torch.manual_seed(11)
    reference = torchvision.models.densenet121(weights=None)
    reference.classifier = nn.Sequential(nn.Linear(1024, 14), nn.Sigmoid())
    randomize_batchnorm(reference)
    checkpoint = {"epoch": 9, "arch": "densenet121", "state_dict": legacy_chexnet_state_dict(reference.eval())}
    torch.save(checkpoint, tmp_path / "model.pth.tar", _use_new_zipfile_serialization=False)  # CheXNet's layout

    result = run_qing("convert", "model.pth.tar", "chexnet-qing", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("detected format: chexnet (CheXNet model.pth.tar")
    assert lines[1] == ("read: 606 tensors from model.pth.tar: module.densenet121.{features.* (604), classifier.* (2)}")
    assert lines[2] == "target: qing_chexnet_densenet121 (in_chans=3, num_classes=14)"
    assert lines[3] == "mapped: 606 tensors loaded and checked: features.* (604), classifier.* (2)"
    assert lines[4] == f"outputs: 14 ({', '.join(CXR14_LABELS)})"
    assert "saved: chexnet-qing (README.md, config.json, model.safetensors)" in lines

    model = _loaded(tmp_path / "chexnet-qing")
    assert tuple(model.pretrained_cfg["label_names"]) == CXR14_LABELS and model.pretrained_cfg["crop_pct"] == 0.875
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(model(x)), reference(x), rtol=1e-5, atol=1e-6)


def test_convert_original_hybrid(tmp_path):
    torch.manual_seed(5)
    reference = OriginalHybrid(num_classes=1)
    randomize_batchnorm(reference, affine=False)
    torch.save(reference.state_dict(), tmp_path / "best_model.pth")  # what the original script saved

    result = run_qing("convert", "best_model.pth", "pneumonia-qing", "--label-names", "Pneumonia", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("detected format: original_hybrid (the original single-script hybrid")
    assert lines[2] == "target: qing_densenet121_tr2 (num_classes=1, embed_dim=512, depth=2, mlp_dim=1024)"
    assert lines[3] == (
        "mapped: 758 tensors loaded and checked: cls_token, backbone.* (725), token_proj.* (4), blocks.* (24), "
        "pre_logits.* (2), head.* (2)"
    )
    assert "outputs: 1 (Pneumonia)" in lines
    assert "preprocessing: input 3x224x224, mean (0.485, 0.485, 0.485), std (0.229, 0.229, 0.229), " in result.stdout

    config = json.loads((tmp_path / "pneumonia-qing" / "config.json").read_text())
    assert config["label_names"] == ["Pneumonia"] and config["qing"]["task"] == "binary"
    model = _loaded(tmp_path / "pneumonia-qing")
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(model(x)), reference.eval()(x), rtol=1e-5, atol=1e-6)


def test_convert_torchxrayvision(tmp_path):
    xrv = pytest.importorskip("torchxrayvision")
    torch.manual_seed(8)
    reference = xrv.models.DenseNet(weights=None, op_threshs=torch.tensor(xrv.models.model_urls["all"]["op_threshs"]))
    randomize_batchnorm(reference, affine=False)
    torch.save(reference.eval().state_dict(), tmp_path / "xrv_all.pt")

    result = run_qing("convert", "xrv_all.pt", "xrv-qing", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert (
        lines[0]
        == "detected format: xrv_densenet (a torchxrayvision DenseNet121 (1 input channel, 18 outputs, op_threshs))"
    )
    assert lines[1] == "read: 728 tensors from xrv_all.pt: op_threshs, features.* (725), classifier.* (2)"
    assert lines[2] == "target: qing_xrv_densenet121 (in_chans=1, num_classes=18)"
    assert lines[3] == "mapped: 727 tensors loaded and checked: features.* (725), classifier.* (2)"
    assert lines[4] == f"outputs: 18 ({', '.join(XRV_PATHOLOGIES)})"

    model = _loaded(tmp_path / "xrv-qing")
    shown = ", ".join(f"{t:.3g}" for t in model.qing_meta.thresholds)  # the op_threshs as probabilities
    assert lines[5] == f"thresholds: {shown} (from the checkpoint)"
    assert tuple(model.pretrained_cfg["label_names"]) == XRV_PATHOLOGIES and model.in_chans == 1
    x = torch.rand(2, 1, 64, 64) * 2048 - 1024
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(logits, reference.classifier(reference.features2(x)), rtol=1e-5, atol=1e-5)
        # torchxrayvision's calibrated output >= 0.5 exactly where qing's probability >= its stored threshold
        thresholds = torch.tensor(model.qing_meta.thresholds)
        assert torch.equal(reference(x) >= 0.5, torch.sigmoid(logits) >= thresholds)
