"""pretrained=True: where weights are found, the errors when they are not, safe reading, checked loading.

All weights are written by the tests (tiny ``qing_test_tr1`` / timm ``test_resnet``); the Hugging
Face cache is a real cache layout in ``tmp_path`` read by the real huggingface_hub client offline.
"""

import logging
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

import qing
from qing.convert import load_checkpoint_file
from qing.models import CheckpointFilter
from qing.weights import (
    FORMATS,
    CheckpointError,
    UnsafeCheckpointError,
    WeightsNotFoundError,
    convert_for_hybrid,
    read_checkpoint,
    read_state_dict,
)

TAG = "qing_test_tr1.r160_in1k"
HUB_REPO = "timm/test_resnet.r160_in1k"


class Payload:
    """A custom class: pickling it makes a checkpoint that needs arbitrary unpickling."""

    def __init__(self) -> None:
        self.note = "training state"


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    path = tmp_path / "qing-weights"
    monkeypatch.setenv("QING_WEIGHTS_DIR", str(path))
    monkeypatch.delenv("QING_TRUST_PICKLE", raising=False)
    return path


@pytest.fixture(scope="module")
def resnet_weights():
    """Random weights of timm's test_resnet (the backbone of qing_test_tr1), as the Hub repo has them."""
    torch.manual_seed(3)
    return {k: v.clone() for k, v in timm.create_model("test_resnet").state_dict().items()}


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A qing_test_tr1 with random weights everywhere (a stand-in for a trained model), saved as safetensors."""
    torch.manual_seed(4)
    model = qing.create_model("qing_test_tr1").eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_file(model.state_dict(), path)
    return model, path


def _backbone_equal(model, weights):
    return all(
        torch.equal(model.state_dict()[f"backbone.{k}"], v) for k, v in weights.items() if not k.startswith("fc.")
    )


# ---- reading files safely ----------------------------------------------------------------------


def test_custom_class_pickle_is_refused_unless_trusted(tmp_path, monkeypatch):
    monkeypatch.delenv("QING_TRUST_PICKLE", raising=False)
    path = tmp_path / "checkpoint.pth"
    weights = {"w": torch.arange(4.0)}
    torch.save({"state_dict": weights, "extra": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert message.startswith(
        f"refusing to unpickle {path}: unsafe pickle: it contains tests.test_weights_pretrained.Payload."
    )
    assert "trust_pickle=True" in message and "QING_TRUST_PICKLE=1" in message
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(path)  # the dispatcher reads through the same gate

    assert torch.equal(read_state_dict(path, trust_pickle=True)["w"], weights["w"])
    monkeypatch.setenv("QING_TRUST_PICKLE", "1")
    assert isinstance(read_checkpoint(path)["extra"], Payload)
    with pytest.raises(UnsafeCheckpointError):
        read_state_dict(path, trust_pickle=False)  # an explicit False beats the environment
    monkeypatch.setenv("QING_TRUST_PICKLE", "0")
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(path)


def test_plain_training_checkpoints_need_no_trust(tmp_path):
    path = tmp_path / "legacy.pth.tar"
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    checkpoint = {"epoch": 3, "arch": "x", "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    assert read_state_dict(path).keys() == {"weight", "bias"}
    torch.save({"model_state_dict": model.state_dict(), "epoch": 1}, path)
    assert torch.equal(read_state_dict(path)["weight"], model.weight.detach())


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "garbage"])
def test_corrupt_files_are_named(tmp_path, kind):
    path = tmp_path / f"weights.{kind}"
    weights = {"w": torch.randn(64, 64)}
    if kind == "safetensors":
        save_file(weights, path)
    elif kind == "garbage":
        path.write_text("<html>404 Not Found</html>" * 10)
    else:
        torch.save(weights, path, _use_new_zipfile_serialization=kind == "zip")
    if kind != "garbage":
        _truncate(path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(err.value).startswith(f"cannot read checkpoint {path}: the file looks truncated or corrupt (")
    assert "download or copy it again" in str(err.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(CheckpointError, match=r"the file is empty \(0 bytes\)"):
        read_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match=f"checkpoint file {tmp_path / 'nope.pth'} does not exist"):
        read_checkpoint(tmp_path / "nope.pth")


def test_unknown_layout_lists_the_formats(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}: unrecognized checkpoint layout (keys like encoder.weight); known formats: ")
    assert all(f"{name}: {text}" in message for name, text in FORMATS.items())


# ---- weights that cannot be found ----------------------------------------------------------------


def test_missing_file_weights_say_where_and_how(weights_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError) as err:
        qing.create_model("qing_densenet121_tr2.chexnet", pretrained=True)
    (tmp_path / "chexnet").mkdir()
    (tmp_path / "chexnet" / "model.pth.tar").write_bytes(b"never read: registry files are not searched here")
    with pytest.raises(WeightsNotFoundError) as err:  # offline (the suite): the download is not tried
        qing.create_model("qing_densenet121_tr2.chexnet", pretrained=True)
    assert str(err.value) == "\n".join([
        "pretrained weights for qing_densenet121_tr2.chexnet not found (offline mode is on: HF_HUB_OFFLINE=1). "
        "Looked in:",
        f"  - {weights_dir / 'chexnet/model.pth.tar'}",
        "Supply them in one of three ways:",
        "  1. the download: qing fetches https://raw.githubusercontent.com/arnoweng/CheXNet/master/model.pth.tar "
        "on first use; offline mode is on (HF_HUB_OFFLINE=1): fetch it where the network is reachable",
        '  2. a file: qing.create_model("qing_densenet121_tr2.chexnet", pretrained=True, '
        'pretrained_cfg_overlay=dict(file="/path/to/model.pth.tar"))',
        f"  3. the qing weights directory: put the file at {weights_dir / 'chexnet/model.pth.tar'} "
        f"(set the environment variable QING_WEIGHTS_DIR to use another directory than {weights_dir})",
    ])  # fmt: skip


def test_missing_hub_weights_offline_say_where_and_how(weights_dir, tmp_path):
    cache = tmp_path / "hf-cache"
    with pytest.raises(WeightsNotFoundError) as err:
        qing.create_model(TAG, pretrained=True, cache_dir=cache)
    local = weights_dir / HUB_REPO
    command = f"{HUB_REPO} model.safetensors --cache-dir {cache}"
    assert str(err.value) == "\n".join([
        f"pretrained weights for {TAG} not found (Hugging Face offline mode is on: HF_HUB_OFFLINE=1). Looked in:",
        f"  - {local / 'model.safetensors'}",
        f"  - {local / 'pytorch_model.bin'}",
        f"  - the Hugging Face cache {cache} ({HUB_REPO}: model.safetensors, pytorch_model.bin)",
        "Supply them in one of three ways:",
        f"  1. the Hugging Face cache: run `hf download {command}` (or `huggingface-cli download {command}`) "
        "while online; it then loads offline too",
        f'  2. a file: qing.create_model("{TAG}", pretrained=True, '
        'pretrained_cfg_overlay=dict(file="/path/to/model.safetensors"))',
        f"  3. the qing weights directory: put the file at {local / 'model.safetensors'} "
        f"(set the environment variable QING_WEIGHTS_DIR to use another directory than {weights_dir})",
    ])  # fmt: skip


def test_missing_overlay_file(weights_dir, tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(WeightsNotFoundError) as err:
        qing.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
    assert str(err.value) == (
        f"pretrained weights for {TAG}: the file {missing} given as pretrained_cfg_overlay file does not exist; "
        "check the path (an absolute path avoids surprises)"
    )


def test_architecture_without_default_weights_lists_tags():
    with pytest.raises(WeightsNotFoundError) as err:
        qing.create_model("qing_test_tr1", pretrained=True)
    assert str(err.value) == (
        "qing_test_tr1 has no pretrained weights of its own; choose a tag with weights (qing_test_tr1.r160_in1k) "
        'or pass a file: pretrained_cfg_overlay=dict(file="/path/to/weights"). Use pretrained=False for random init.'
    )


def test_unknown_tags_and_models_list_valid_ones():
    with pytest.raises(ValueError) as err:
        qing.create_model("qing_densenet121_tr2.imagenet")
    assert str(err.value) == (
        "unknown tag 'imagenet' for qing_densenet121_tr2; known tags: chexnet, tv_in1k, xrv_all, original "
        "(e.g. qing_densenet121_tr2.chexnet); see qing.list_pretrained()"
    )
    with pytest.raises(ValueError) as err:
        qing.create_model("qing_chexnet_densenet")
    assert str(err.value).startswith("unknown model 'qing_chexnet_densenet'; did you mean qing_chexnet_densenet121")
    assert f"qing models: {', '.join(qing.list_models())}" in str(err.value)


# ---- the three ways to supply weights, end to end --------------------------------------------------


def test_qing_weights_dir_supplies_hub_weights(weights_dir, resnet_weights, caplog):
    (weights_dir / HUB_REPO).mkdir(parents=True)
    save_file(resnet_weights, weights_dir / HUB_REPO / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="qing"):
        model = qing.create_model(TAG, pretrained=True, num_classes=2)
    assert _backbone_equal(model, resnet_weights)
    report = model.qing_load_report
    assert report.format == "timm" and sorted(report.unused) == ["fc.bias", "fc.weight"] and not report.dropped
    assert sorted(report.filled) == sorted(k for k in model.state_dict() if not k.startswith("backbone."))
    assert len(report.loaded) == sum(1 for k in model.state_dict() if k.startswith("backbone."))
    assert (
        f"{TAG}: loaded timm weights from {weights_dir / HUB_REPO / 'model.safetensors'}: 90 tensors; " in caplog.text
    )
    assert "initialized (not in the checkpoint): cls_token, token_proj.* (4), blocks.* (12)" in caplog.text
    assert model.pretrained_cfg["file"] == str(weights_dir / HUB_REPO / "model.safetensors")
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # test_resnet.r160_in1k's normalization
    assert "state_dict" not in model.pretrained_cfg


def test_hugging_face_cache_supplies_weights_offline(weights_dir, resnet_weights, tmp_path):
    snapshot = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("c0ffee" * 6 + "abcd")
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)
    save_file(resnet_weights, snapshot / "model.safetensors")
    model = qing.create_model(TAG, pretrained=True, cache_dir=tmp_path / "hf")
    assert _backbone_equal(model, resnet_weights)
    assert model.qing_load_report.source == f"the Hugging Face Hub ({HUB_REPO})"


def test_overlay_file_loads_a_whole_qing_model(trained_tiny, tmp_path, monkeypatch):
    source, path = trained_tiny
    x = torch.randn(2, 3, 64, 64)
    monkeypatch.chdir(path.parent)
    for file in (str(path), path.name):  # absolute, and relative to the current directory
        model = qing.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=file)).eval()
        assert model.qing_load_report.format == "qing" and model.qing_load_report.filled == []
        with torch.no_grad():
            assert torch.equal(model(x), source(x))
    features = qing.create_model(
        "qing_test_tr1", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), features_only=True
    ).eval()
    with torch.no_grad():
        assert torch.equal(features(x)[-1], source.forward_intermediates(x, intermediates_only=True)[-1])


# ---- class counts and mismatching checkpoints --------------------------------------------------------


def test_new_num_classes_reinitializes_only_the_head(trained_tiny, caplog):
    source, path = trained_tiny
    with caplog.at_level(logging.WARNING, logger="qing"):
        model = qing.create_model(TAG, pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=str(path)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{TAG}: randomly initialized (not in the checkpoint): head.* (2); the checkpoint's classifier does not fit "
        "the model's 3 outputs (head.weight (14, 64) vs model (3, 64); head.bias (14,) vs model (3,)): dropped "
        "head.weight, head.bias; label names: class_0..class_2 (the source's 14 label names do not apply); no "
        "thresholds: fine-tune the model before reading its predictions"
    ]
    assert model.qing_load_report.dropped == ["head.weight", "head.bias"]
    expected = source.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("head."):
            assert value.shape[0] == 3
        else:
            assert torch.equal(value, expected[key]), key


def test_a_fitting_head_loads_even_when_the_cfg_class_count_differs(tmp_path, caplog):
    # timm drops the classifier whenever num_classes differs from the pretrained cfg's (14 here),
    # even though this checkpoint's one-output head fits the model: qing keeps it and says so.
    source = qing.create_model("qing_test_tr1", num_classes=1)
    torch.nn.init.normal_(source.head.weight)
    save_file(source.state_dict(), tmp_path / "binary.safetensors")
    with caplog.at_level(logging.WARNING, logger="qing"):
        model = qing.create_model(
            TAG, pretrained=True, num_classes=1, pretrained_cfg_overlay=dict(file=str(tmp_path / "binary.safetensors"))
        )
    assert torch.equal(model.head.weight, source.head.weight)
    assert model.pretrained_cfg["num_classes"] == 1 and model.pretrained_cfg["label_names"] == ("class_0",)
    message = "the pretrained cfg's 14 label_names do not match the loaded classifier's 1 output(s); replaced them "
    assert message + "with class_0 (pass pretrained_cfg_overlay" in caplog.text


def test_checkpoint_for_another_architecture(tmp_path):
    path = tmp_path / "effnet.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        qing.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert str(err.value).startswith(
        f"{path} (timm format) does not fit {TAG}: 71 of 75 backbone tensors are missing "
        "(e.g. backbone.conv1.0.weight, "
    )
    assert str(err.value).endswith(
        "; the checkpoint has keys like blocks.0.0.bn1.bias, blocks.0.0.bn1.running_mean, blocks.0.0.bn1.running_var, "
        "blocks.0.0.bn1.weight. Is it a checkpoint for another architecture?"
    )

    wide = qing.create_model("qing_test_tr1", embed_dim=96)
    save_file(wide.state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError) as err:
        qing.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "wide.safetensors")))
    assert f"(qing format) does not fit {TAG}: shape mismatch in 18 tensors: " in str(err.value)
    assert "blocks.0.attn.proj.bias: checkpoint (96,) vs model (64,)" in str(err.value)


# ---- the registered tags -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", qing.list_pretrained())
def test_every_tag_records_source_license_preprocessing_and_labels(name):
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.license and cfg.origin_url and cfg.description
    assert bool(cfg.file) != bool(cfg.hf_hub_id)  # a qing weights-dir file or a Hub repo
    assert len(cfg.label_names) == cfg.num_classes
    assert len(cfg.mean) == len(cfg.std) == cfg.input_size[0]
    if cfg.hf_hub_id:  # backbone weights of a timm model: its normalization and license
        source = timm.models.get_pretrained_cfg(cfg.hf_hub_id.removeprefix("timm/"))
        assert (cfg.mean, cfg.std, cfg.license) == (source.mean, source.std, source.license)
    config = resolve_data_config(pretrained_cfg=cfg.to_dict())
    image = Image.new("L" if cfg.input_size[0] == 1 else "RGB", (300, 260), 128)
    assert create_transform(**config)(image).shape == cfg.input_size


def test_default_cfgs():
    """DenseNet hybrids default to the CheXNet backbone; the weightless cfg keeps the original design."""
    for arch in qing.list_models("qing_*_tr*"):
        cfg = timm.models.get_pretrained_cfg(arch)
        tags = timm.models.get_arch_pretrained_cfgs(arch)
        untagged = tags.get(f"{arch}.original", tags.get(arch))
        assert untagged.mean == (0.485,) * 3 and untagged.crop_mode == "squash" and not untagged.has_weights
        if arch.startswith("qing_densenet121"):
            assert cfg.tag == "chexnet" and cfg.file == "chexnet/model.pth.tar"
            assert cfg.mean == (0.485, 0.456, 0.406)  # CheXNet was trained with ImageNet normalization
        else:
            assert cfg.tag is None and not cfg.has_weights


# ---- qing's own files through the dispatcher ------------------------------------------------------


def test_dispatcher_reads_a_saved_qing_model(tmp_path, caplog):
    torch.manual_seed(6)
    source = qing.create_model("qing_test_tr1", num_classes=2).eval()
    qing.set_meta(source, task="multilabel", thresholds=[0.3, 0.7])
    folder = qing.save_pretrained(source, tmp_path / "saved", label_names=["Effusion", "Edema"])
    with caplog.at_level(logging.INFO, logger="qing"):
        converted = load_checkpoint_file(folder)
    assert f"{folder / 'model.safetensors'}: detected qing (a qing CNN-Transformer state dict" in caplog.text
    assert (converted.format, converted.model_name) == ("qing", "qing_test_tr1")
    assert converted.model_kwargs["num_classes"] == 2 and converted.thresholds == [0.3, 0.7]
    assert converted.pretrained_cfg["label_names"] == ("Effusion", "Edema")
    model = converted.create_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    assert model.qing_meta.thresholds == [0.3, 0.7] and model.qing_load_report.format == "qing"
    same = qing.create_model("qing_test_tr1", pretrained=True, num_classes=2, pretrained_cfg_overlay=dict(file=folder))
    assert torch.equal(same.eval()(x), source(x))  # a model folder works as pretrained_cfg_overlay file too

    bare = tmp_path / "bare.safetensors"
    save_file(source.state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"holds qing weights without a config.json beside it; pass model_name="):
        load_checkpoint_file(bare)
    assert load_checkpoint_file(bare, model_name="qing_test_tr1").create_model(num_classes=2).num_classes == 2


def test_verification_catches_tensors_that_did_not_load(trained_tiny):
    _, path = trained_tiny
    model = qing.create_model("qing_test_tr1")
    loader = CheckpointFilter("qing_test_tr1", str(path), convert_for_hybrid)
    complete = loader(read_state_dict(path), model)
    assert complete.keys() == model.state_dict().keys()
    model.load_state_dict({k: v for k, v in complete.items() if not k.startswith("blocks.")}, strict=False)
    with pytest.raises(RuntimeError) as err:  # what a lenient loader skipping keys would leave behind
        loader.verify()
    assert str(err.value) == (
        f"qing_test_tr1: 12 pretrained tensors did not load from {path} (e.g. blocks.0.norm1.weight, "
        "blocks.0.norm1.bias, blocks.0.attn.qkv.weight, blocks.0.attn.qkv.bias); "
        "refusing to return a partly random model"
    )


def test_a_new_head_drops_the_source_label_names_with_one_warning(tmp_path, caplog):
    """Backbone-only weights and a head for the caller's classes: one warning says what is random."""
    path = tmp_path / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), path)
    with caplog.at_level(logging.INFO, logger="qing"):
        model = qing.create_model(TAG, pretrained=True, num_classes=1, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.pretrained_cfg["label_names"] == ("class_0",)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"{TAG}: randomly initialized (not in the checkpoint): ")
    assert warnings[0].endswith(
        "label names: class_0 (the source's 14 label names do not apply); no thresholds: "
        "fine-tune the model before reading its predictions"
    )
