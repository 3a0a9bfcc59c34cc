"""Migrating the original single-script hybrid: its saved file -> qing, outputs equal to the original.

``tests/reference/original_hybrid.py`` is the plain-PyTorch original; the script saved
``torch.save(model.state_dict(), path)``. Everything here goes through the file and the public API.
"""

import pytest
import torch
from timm.data import resolve_data_config

import qing
from qing.convert import load_checkpoint_file, load_chexnet_file, load_original_hybrid_file
from qing.weights import CheckpointError
from tests.model_helpers import randomize_batchnorm
from tests.reference.original_hybrid import OriginalHybrid


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """``(original model, path of its saved state_dict)``, random weights and BatchNorm statistics."""
    torch.manual_seed(5)
    model = OriginalHybrid(num_classes=1)
    randomize_batchnorm(model, affine=False)
    path = tmp_path_factory.mktemp("original") / "best_model.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_converted_file_gives_the_original_outputs(original):
    reference, path = original
    converted = load_original_hybrid_file(path)
    assert (converted.format, converted.model_name, converted.task) == (
        "original_hybrid",
        "qing_densenet121_tr2",
        "binary",
    )
    assert converted.model_kwargs == {"num_classes": 1, "embed_dim": 512, "depth": 2, "mlp_dim": 1024}
    model = converted.create_model().eval()
    config = resolve_data_config(model=model)
    assert config == {
        "input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (0.485,) * 3, "std": (0.229,) * 3,
        "crop_pct": 1.0, "crop_mode": "squash",
    }  # fmt: skip  # Resize((224, 224)), ToTensor, Normalize(red-channel ImageNet statistics)
    assert model.pretrained_cfg["label_names"] == ("PNEUMONIA",) and model.qing_meta.task == "binary"
    for batch, height, width in [(1, 224, 224), (3, 224, 224), (2, 128, 160)]:
        x = torch.randn(batch, 3, height, width) * 1.5
        with torch.no_grad():
            expected = reference(x)
            probs = torch.sigmoid(model(x))
        assert probs.shape == expected.shape == (batch, 1)
        assert torch.allclose(probs, expected, atol=1e-5)
    assert expected.std() > 0


def test_pretrained_cfg_overlay_file_path(original):
    reference, path = original
    model = qing.create_model(
        "qing_densenet121_tr2",
        pretrained=True,
        num_classes=1,
        pretrained_cfg_overlay=dict(file=str(path), label_names=("PNEUMONIA",)),
    ).eval()
    assert model.qing_load_report.format == "original_hybrid" and model.qing_load_report.filled == []
    assert model.qing_load_report.unused == ["base_model.classifier.weight", "base_model.classifier.bias"]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(model(x)), reference(x), atol=1e-5)
    assert model.pretrained_cfg["num_classes"] == 1 and model.pretrained_cfg["label_names"] == ("PNEUMONIA",)


def test_overlay_file_switches_to_the_original_preprocessing(original, caplog):
    """The default tag is CheXNet's (ImageNet normalization); original weights need the original transform."""
    _, path = original
    with caplog.at_level("WARNING", logger="qing"):
        model = qing.create_model("qing_densenet121_tr2", pretrained=True, num_classes=1,
                                  pretrained_cfg_overlay=dict(file=str(path)))  # fmt: skip
    assert resolve_data_config(model=model)["mean"] == (0.485,) * 3
    assert resolve_data_config(model=model)["std"] == (0.229,) * 3
    assert "the weights are an original-hybrid checkpoint; preprocessing set to the original script's" in caplog.text
    chosen = qing.create_model("qing_densenet121_tr2", pretrained=True, num_classes=1,
                               pretrained_cfg_overlay=dict(file=str(path), mean=(0.5,) * 3))  # fmt: skip
    assert chosen.pretrained_cfg["mean"] == (0.5,) * 3  # the caller's explicit choice wins


@pytest.mark.parametrize("key", ["model_state_dict", "state_dict"])
def test_training_checkpoints_nesting_the_state_dict(original, tmp_path, key):
    reference, path = original
    nested = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 4, key: reference.state_dict(), "val_loss": 0.31}, nested)
    direct, wrapped = load_checkpoint_file(path), load_checkpoint_file(nested)
    assert wrapped.format == "original_hybrid" and wrapped.state_dict.keys() == direct.state_dict.keys()
    assert all(torch.equal(wrapped.state_dict[k], v) for k, v in direct.state_dict.items())


def test_label_names_are_overridable(original):
    _, path = original
    assert load_original_hybrid_file(path, label_names=["Pneumonia"]).pretrained_cfg["label_names"] == ("Pneumonia",)
    with pytest.raises(ValueError, match="2 label_names for a checkpoint with 1 outputs"):
        load_original_hybrid_file(path, label_names=["NORMAL", "PNEUMONIA"])


def test_an_original_file_is_not_chexnet(original):
    _, path = original
    with pytest.raises(CheckpointError) as err:
        load_chexnet_file(path)
    assert str(err.value) == (
        f"{path}: found the original single-script hybrid (cnn_features.*, class_token, transformer_encoder.*), "
        "expected CheXNet model.pth.tar (module.densenet121.*, legacy norm.1 names, classifier.0)"
    )
    with pytest.raises(CheckpointError, match="expected a DenseNet121 classifier: create qing_densenet121_tr2"):
        qing.create_model("qing_chexnet_densenet121", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
