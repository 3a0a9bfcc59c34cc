"""The residual head (``head_type="residual"``, the ``*_r2`` models): it starts as its backbone's pooled classifier.

A fresh residual hybrid computes exactly ``Linear(GAP(backbone map))``; loaded with a CNN checkpoint
that has a fitting classifier it computes exactly what that CNN computes (timm's DenseNet121, CheXNet);
training opens the encoder's branch. Also token dropout, the features layout, explanation access,
freezing, the encoder's optimizer groups and the multi-label early-stopping default.
"""

import csv
import logging

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

import qing
from qing import explain
from qing.layers import ResidualHead, TokenDropout
from qing.train import TrainConfig, Trainer, param_groups
from qing.weights import CXR14_LABELS
from tests.model_helpers import legacy_chexnet_state_dict, randomize_batchnorm
from tests.train_helpers import synthetic_root, tiny_config


def _pooled_classifier(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's own pooled linear classifier, computed from the outside."""
    feature_map = model.backbone.forward_features(x)
    return model.head.backbone_fc(F.adaptive_avg_pool2d(feature_map, 1).flatten(1))


def _cnn_file(tmp_path, arch: str, num_classes: int) -> tuple[nn.Module, str]:
    """A timm CNN with random weights and BatchNorm statistics, and its safetensors file."""
    cnn = randomize_batchnorm(timm.create_model(arch, num_classes=num_classes)).eval()
    path = tmp_path / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(path))
    return cnn, str(path)


# ---- it starts as its backbone ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qing_test_r1", "qing_densenet121_r2"])
def test_a_fresh_residual_hybrid_is_its_pooled_backbone_classifier(name):
    model = qing.create_model(name, num_classes=3).eval()
    assert isinstance(model.head, ResidualHead) and model.get_classifier() is model.head
    assert not model.head.encoder_fc.weight.any()  # the encoder's branch starts closed
    assert model.head.backbone_fc.weight.std() > 0.01  # the pooled classifier does not
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits = model(x)
        backbone, encoder = model.head.branches(model.forward_head(model.forward_features(x), pre_logits=True))
        assert torch.equal(logits, _pooled_classifier(model, x))
    assert logits.shape == (2, 3) and logits.std() > 0
    assert torch.equal(encoder, torch.zeros(2, 3)) and torch.equal(backbone, logits)


@pytest.mark.parametrize(("arch", "name"), [("test_resnet", "qing_test_r1"), ("densenet121", "qing_densenet121_r2")])
def test_with_a_cnn_checkpoint_it_computes_what_the_cnn_computes(tmp_path, arch, name):
    cnn, path = _cnn_file(tmp_path, arch, num_classes=3)
    tag = "r160_in1k" if arch == "test_resnet" else "tv_in1k"
    model = qing.create_model(f"{name}.{tag}", pretrained=True, num_classes=3, pretrained_cfg_overlay={"file": path})
    report = model.qing_load_report
    assert {"head.backbone_fc.weight", "head.backbone_fc.bias"} <= set(report.loaded)
    assert report.unused == []  # the CNN's classifier is used, not left over
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), cnn(x))
    assert name != "qing_densenet121_r2" or not isinstance(model.backbone.features.norm5.act, nn.Identity)


def test_a_classifier_of_another_class_count_stays_unused(tmp_path, caplog):
    _, path = _cnn_file(tmp_path, "test_resnet", num_classes=1000)
    with caplog.at_level(logging.INFO, logger="qing"):
        model = qing.create_model("qing_test_r1.r160_in1k", pretrained=True, num_classes=3,
                                  pretrained_cfg_overlay={"file": path})  # fmt: skip
    report = model.qing_load_report
    assert sorted(report.unused) == ["fc.bias", "fc.weight"]
    assert "head.backbone_fc.weight" in report.filled and not model.head.encoder_fc.weight.any()
    assert "unused checkpoint tensors: fc.* (2)" in caplog.text


@pytest.fixture(scope="module")
def chexnet(tmp_path_factory):
    """``(torchvision CheXNet with random weights, its model.pth.tar)``."""
    torch.manual_seed(3)
    reference = torchvision.models.densenet121(weights=None)
    reference.classifier = nn.Sequential(nn.Linear(1024, 14), nn.Sigmoid())
    randomize_batchnorm(reference).eval()
    path = tmp_path_factory.mktemp("chexnet") / "model.pth.tar"
    torch.save({"epoch": 3, "state_dict": legacy_chexnet_state_dict(reference)}, path)
    return reference, str(path)


def test_densenet121_r2_chexnet_predicts_as_chexnet_then_trains_with_the_small_dataset_preset(chexnet, tmp_path):
    reference, path = chexnet
    model = qing.create_model("qing_densenet121_r2.chexnet", pretrained=True, pretrained_cfg_overlay={"file": path})
    assert model.qing_load_report.unused == []  # CheXNet's classifier is the pooled classifier
    assert tuple(model.pretrained_cfg["label_names"]) == tuple(CXR14_LABELS)  # and its label names stay true
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(model.eval()(x)), reference(x), atol=1e-6)

    # the original recipe (frozen backbone but its top 2 units, Adam at 5e-6, plateau) on the new head
    data = synthetic_root(tmp_path / "data")
    config = tiny_config(data, tmp_path / "run", epochs=1)
    preset = TrainConfig.preset(
        "small_dataset", model="qing_densenet121_r2.chexnet", pretrained_file=path, img_size=64, batch_size=4,
        epochs=1, device="cpu", progress=False, report=False, tensorboard=False, log_images=0,
        output_dir=str(tmp_path / "run"), data=config.data,
    )  # fmt: skip
    trainer = Trainer(preset)
    trainer.fit()
    before, after = model.state_dict(), trainer.model.state_dict()  # the same CheXNet file at the start
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("backbone.")} == {
        n for n, _ in trainer.model.named_parameters() if n.startswith(("backbone.features.denseblock4.",
                                                                       "backbone.features.norm5."))
    }  # fmt: skip
    assert {"head.backbone_fc.weight", "head.encoder_fc.weight", "blocks.0.attn.qkv.weight"} <= trainable
    assert torch.equal(after["backbone.features.denseblock1.denselayer1.conv1.weight"],
                       before["backbone.features.denseblock1.denselayer1.conv1.weight"])  # fmt: skip
    assert not torch.equal(after["head.backbone_fc.bias"], before["head.backbone_fc.bias"])
    assert after["head.encoder_fc.weight"].abs().max() > 0  # the branch opened, a little at lr 5e-6


def test_training_opens_the_encoder_branch():
    model = qing.create_model("qing_test_r1", num_classes=2, drop_rate=0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    F.binary_cross_entropy_with_logits(model(x), y).backward()
    qkv = model.blocks[0].attn.qkv.weight
    assert not qkv.grad.any()  # behind the closed gate the encoder gets no gradient yet ...
    assert model.head.encoder_fc.weight.grad.abs().sum() > 0  # ... but the gate does
    optimizer.step()
    optimizer.zero_grad()
    assert model.head.encoder_fc.weight.abs().min() > 0
    F.binary_cross_entropy_with_logits(model(x), y).backward()
    assert qkv.grad.abs().sum() > 0  # open, the encoder learns
    model.eval()
    with torch.no_grad():
        _, encoder = model.head.branches(model.forward_head(model.forward_features(x), pre_logits=True))
        assert encoder.abs().min() > 0 and torch.allclose(model(x), _pooled_classifier(model, x) + encoder)


def test_reset_classifier_and_another_class_count_close_the_gate_again(tmp_path, caplog):
    model = qing.create_model("qing_test_r1", num_classes=3).eval()
    with torch.no_grad():
        model.head.encoder_fc.weight.normal_()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    model.reset_classifier(5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), _pooled_classifier(model, x)) and model(x).shape == (2, 5)

    save_file(state, str(tmp_path / "r1.safetensors"))
    with caplog.at_level(logging.WARNING, logger="qing"):
        loaded = qing.create_model("qing_test_r1", pretrained=True, num_classes=2,
                                   pretrained_cfg_overlay={"file": str(tmp_path / "r1.safetensors")})  # fmt: skip
    assert "the checkpoint's classifier does not fit the model's 2 outputs (head.backbone_fc.weight (3, 96) vs " \
           "model (2, 96);" in caplog.text  # fmt: skip
    assert "dropped head.backbone_fc.weight, head.backbone_fc.bias, head.encoder_fc.weight" in caplog.text
    assert not loaded.head.encoder_fc.weight.any()
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])  # the rest loads


def test_bad_head_type_and_the_original_design_untouched():
    with pytest.raises(ValueError, match=r"head_type='mlp' is not supported; use one of \('encoder', 'residual'\)"):
        qing.create_model("qing_test_tr1", head_type="mlp")
    original = qing.create_model("qing_densenet121_tr2", device="meta")
    assert original.head_type == "encoder" and isinstance(original.head, nn.Linear)
    assert original.num_features == original.embed_dim == 512
    assert isinstance(original.backbone.features.norm5.act, nn.Identity)  # the original strips the final ReLU
    assert not any(k.startswith("head.") and k not in ("head.weight", "head.bias") for k in original.state_dict())


# ---- features, token dropout, explanation, freezing --------------------------------------------------


def test_features_carry_the_encoder_tokens_then_the_backbone_cells():
    model = qing.create_model("qing_test_r1", num_classes=2).eval()
    d, f = model.embed_dim, model.backbone_features
    assert model.num_features == model.head_hidden_size == d + f
    x = torch.randn(2, 3, 64, 96)  # grid 2 x 3
    with torch.no_grad():
        features = model.forward_features(x)
        feature_map = model.backbone.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape == (2, 7, d + f)
    assert torch.equal(features[:, 1:, d:], feature_map.flatten(2).transpose(1, 2))  # cell (i, j) = token 1 + 3i + j
    assert torch.allclose(features[:, 0, d:], feature_map.mean((2, 3)), atol=1e-6)  # the class position: GAP
    assert torch.equal(pre_logits[:, d:], features[:, 0, d:]) and pre_logits.shape == (2, d + f)
    model.reset_classifier(2, global_pool="")
    with torch.no_grad():
        assert model(x).shape == (2, 7, 2)  # per-token logits, as timm's global_pool=""


def test_token_dropout_keeps_the_class_token_and_a_sorted_subset():
    drop = TokenDropout(0.25).train()
    x = torch.randn(3, 1 + 16, 8)
    out, keep = drop(x)
    assert out.shape == (3, 1 + 12, 8) and keep.shape == (3, 12)
    assert torch.equal(out[:, 0], x[:, 0])
    assert all(torch.equal(k, k.sort().values) and len(set(k.tolist())) == 12 for k in keep)
    assert torch.equal(out[:, 1:], torch.stack([x[b, 1 + keep[b]] for b in range(3)]))
    assert TokenDropout(0.1).train()(torch.randn(1, 5, 8))[1] is None  # 4 tokens: round(3.6) keeps all
    out, keep = drop.eval()(x)
    assert out is x and keep is None
    with pytest.raises(ValueError, match=r"token dropout probability must be in \[0, 1\), got 1.0"):
        TokenDropout(1.0)


def test_the_backbone_stream_follows_the_kept_tokens():
    model = qing.create_model("qing_test_r1", num_classes=1, token_drop_rate=0.25).train()
    x = torch.randn(2, 3, 128, 128)  # 16 cells, 12 kept
    features = model.forward_features(x)
    cells = model.backbone.forward_features(x).flatten(2).transpose(1, 2)
    assert features.shape == (2, 13, model.num_features)
    for b in range(2):
        kept = [int((cells[b] == row).all(-1).nonzero()) for row in features[b, 1:, model.embed_dim :]]
        assert kept == sorted(set(kept)) and len(kept) == 12


def test_attention_maps_grad_cam_and_freezing_see_the_backbone(tmp_path):
    cnn, path = _cnn_file(tmp_path, "test_resnet", num_classes=1)
    model = qing.create_model("qing_test_r1.r160_in1k", pretrained=True, num_classes=1,
                              pretrained_cfg_overlay={"file": path}).eval()  # fmt: skip
    x = torch.randn(2, 3, 64, 96)
    assert explain.attention_maps(model, x).shape == (2, 1, 4, 2, 3)

    def grad_cam(net: nn.Module, layer: nn.Module) -> torch.Tensor:
        kept = {}
        handle = layer.register_forward_hook(lambda _m, _i, out: kept.update(map=out))
        logit = net(x)[:, 0].sum()
        handle.remove()
        (grad,) = torch.autograd.grad(logit, kept["map"])
        return F.relu((grad.mean((2, 3), keepdim=True) * kept["map"]).sum(1))

    # the same Grad-CAM as the plain CNN at the start: model.backbone is that CNN
    assert torch.equal(grad_cam(model, model.backbone.layer4), grad_cam(cnn, cnn.layer4))

    model.freeze_backbone(0)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"cls_token", "token_proj", "blocks", "pre_logits", "head"}


# ---- training: encoder groups, multi-label default ------------------------------------------------


def test_encoder_learning_rate_and_weight_decay_get_groups_of_their_own():
    model = qing.create_model("qing_test_r1", num_classes=2)
    default = {g["name"] for g in param_groups(model, lr=1e-3, backbone_lr=None, weight_decay=0.05)}
    assert default == {"backbone", "backbone_no_decay", "head", "head_no_decay"}  # as before: no encoder settings
    settings = dict(lr=1e-3, backbone_lr=1e-5, weight_decay=0.05, encoder_lr=1e-4, encoder_weight_decay=0.3)
    groups = {g["name"]: g for g in param_groups(model, **settings)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert members["head"] == {"head.backbone_fc.weight", "head.encoder_fc.weight"}
    assert members["head_no_decay"] == {"head.backbone_fc.bias"}
    assert "blocks.0.attn.qkv.weight" in members["encoder"] and "token_proj.0.weight" in members["encoder"]
    assert {"cls_token", "token_proj.1.weight"} <= members["encoder_no_decay"]
    lrs = {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()}
    assert lrs == {
        "backbone": (1e-5, 0.05), "backbone_no_decay": (1e-5, 0.0), "encoder": (1e-4, 0.3),
        "encoder_no_decay": (1e-4, 0.0), "head": (1e-3, 0.05), "head_no_decay": (1e-3, 0.0),
    }  # fmt: skip
    assert sum(len(m) for m in members.values()) == len(names)


def test_early_stopping_metric_auto_resolves_by_task():
    config = TrainConfig()
    assert config.early_stopping_metric == "auto"
    assert [config.monitor_metric(t) for t in ("binary", "multiclass", "multilabel")] == [
        "val_loss", "val_loss", "val_auroc"
    ]  # fmt: skip
    assert TrainConfig(early_stopping_metric="val_f1").monitor_metric("multilabel") == "val_f1"
    assert TrainConfig.preset("small_dataset").monitor_metric("multilabel") == "val_loss"  # the original's
    with pytest.raises(ValueError, match="early_stopping_metric must be auto, val_loss or val_<metric>, got 'auroc'"):
        TrainConfig(early_stopping_metric="auroc")


def test_a_multilabel_run_selects_by_validation_auroc(tmp_path, nih_64):
    """Real NIH images: three labels, a patient-grouped split given by a column."""
    with open(nih_64 / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = ["Atelectasis", "Effusion", "Infiltration"]
    positive = sorted({r["patient"] for r in rows if any(r[k] == "1" for k in labels)}, key=int)[:24]
    negative = sorted({r["patient"] for r in rows} - set(positive), key=int)[:24]
    split = {p: ("val" if i % 4 == 1 else "test" if i % 4 == 3 else "train")
             for group in (positive, negative) for i, p in enumerate(group)}  # fmt: skip
    chosen: dict[str, dict[str, str]] = {}
    for r in rows:  # one image per patient, with a finding where the patient has one
        finding = any(r[k] == "1" for k in labels)
        if r["patient"] in split and r["patient"] not in chosen and (finding or r["patient"] not in positive):
            chosen[r["patient"]] = r
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "patient", "split", *labels])
        writer.writeheader()
        for r in chosen.values():
            writer.writerow({"path": r["path"], "patient": r["patient"], "split": split[r["patient"]],
                             **{k: r[k] for k in labels}})  # fmt: skip
    config = tiny_config(
        tmp_path, tmp_path / "run", model="qing_test_r1", epochs=2, batch_size=16,
        data={"root": None, "patient_regex": None, "labels_csv": str(table), "image_dir": str(nih_64),
              "label_columns": labels, "patient_column": "patient", "split_column": "split"},
    )  # fmt: skip
    result = Trainer(config).fit()
    assert result.monitor == "val_auroc"
    best = max(result.history, key=lambda h: h["val_auroc"])
    assert (result.best_epoch, result.best_value) == (best["epoch"], best["val_auroc"])
