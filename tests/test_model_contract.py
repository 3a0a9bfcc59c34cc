"""The timm model contract, run over every registered qing architecture.

Mirrors the generic checks of timm's own ``tests/test_models.py`` (forward, backward with a
gradient for every parameter, default cfgs, torchscript, ``features_only``, fx forward/backward,
fx then torchscript, ``forward_intermediates``) plus meta-device creation and bf16.
"""

import math

import pytest
import timm
import torch
from timm.layers import set_layer_config
from timm.layers._fx import _autowrap_functions, _leaf_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import qing

MODELS = qing.list_models()
FX_TRACER = {"leaf_modules": list(_leaf_modules), "autowrap_functions": list(_autowrap_functions)}
SMALL = 96  # input side for the heavier checks (a multiple of 32; timm uses 96-128)


def _input(model_or_name, side: int = SMALL, batch: int = 1) -> torch.Tensor:
    cfg = (
        model_or_name.pretrained_cfg
        if isinstance(model_or_name, torch.nn.Module)
        else timm.models.get_pretrained_cfg(model_or_name).to_dict()
    )
    side = min(side, cfg["input_size"][-1])
    return torch.randn(batch, cfg["input_size"][0], side, side)


def _fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=FX_TRACER)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**FX_TRACER).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_names = [n.name for n in graph_nodes[0]._input_nodes]
        names = [n.name for n in graph_nodes]
        train_return = [train_nodes[-names.index(n)] for n in output_names]
    return create_feature_extractor(
        model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=FX_TRACER
    )


def test_required_family_is_registered():
    required = {
        "qing_densenet121_tr2", "qing_densenet121_tr4", "qing_resnet50_tr2",
        "qing_convnext_tiny_tr2", "qing_efficientnet_b0_tr2", "qing_test_tr1",
        "qing_densenet121_r2", "qing_resnet50_r2", "qing_convnext_tiny_r2", "qing_efficientnet_b0_r2", "qing_test_r1",
    }  # fmt: skip
    assert required <= set(MODELS)
    assert set(timm.list_models("qing_*")) == set(MODELS)


def test_timm_create_model_after_import():
    model = timm.create_model("qing_test_tr1", num_classes=3)
    assert isinstance(model, qing.CNNTransformer)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("name", MODELS)
def test_forward(name):
    model = qing.create_model(name).eval()
    x = _input(model, side=128, batch=2)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, model.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    model = qing.create_model(name, num_classes=42).train()
    out = model(_input(model, batch=2))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert out.shape == (2, 42)


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_and_heads(name):
    model = qing.create_model(name).eval()
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    x = _input(model)
    features = model.forward_features(x)
    if isinstance(model, qing.CNNTransformer):
        grid = (x.shape[-2] // model.feat_stride) * (x.shape[-1] // model.feat_stride)
        assert features.shape == (1, 1 + grid, model.num_features)  # tokens, class token first
    else:  # the plain CNN baselines in the zoo keep timm's CNN contract
        assert features.shape[:2] == (1, model.num_features) and features.ndim == 4
    assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)

    # the cfg's classifier names the module get_classifier() returns (a Linear, or a residual head)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert any(k.startswith(cfg["classifier"] + ".") for k in state_dict)
    assert cfg["first_conv"] + ".weight" in state_dict
    assert len(cfg["label_names"]) == cfg["num_classes"] == model.num_classes
    assert len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0] == model.in_chans
    assert cfg["license"]

    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0, "")
    assert model(x).shape == features.shape
    headless = qing.create_model(name, num_classes=0).eval()
    assert headless(x).shape == (1, headless.num_features)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name):
    model = qing.create_model(name).eval()
    x = _input(model, side=128)
    info = timm.models.FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        only = model.forward_intermediates(x, intermediates_only=True)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert torch.equal(final, model.forward_features(x))
        assert torch.allclose(model.forward_head(final), model(x))
    assert len(feats) == len(only) == len(info.channels())
    for c, r, f, o in zip(info.channels(), info.reduction(), feats, only):
        assert f.shape[1] == c and f.shape[-1] == math.ceil(x.shape[-1] / r)
        assert torch.equal(f, o)
    assert [t.shape[1] for t in last_two] == info.channels()[-2:]
    if isinstance(model, qing.CNNTransformer):
        assert len(feats) == model._num_backbone_levels + len(model.blocks)
        nhwc = model.forward_intermediates(x, indices=2, output_fmt="NHWC", intermediates_only=True)
        assert [t.shape[-1] for t in nhwc] == info.channels()[-2:]


@pytest.mark.parametrize("name", MODELS)
def test_features_only(name):
    model = qing.create_model(name, features_only=True).eval()
    x = _input(model, side=128)
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == len(model.feature_info.channels())
    for c, r, o in zip(model.feature_info.channels(), model.feature_info.reduction(), outs):
        assert o.shape[:2] == (1, c) and o.shape[-1] == x.shape[-1] // r
        assert torch.isfinite(o).all()


def test_features_only_backbone_levels_prune_the_transformer():
    model = qing.create_model("qing_test_tr1", features_only=True, out_indices=(1, 2))
    assert len(model.model.blocks) == 0 and model.feature_info.reduction() == [4, 8]
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == model.feature_info.channels()


@pytest.mark.parametrize("name", MODELS)
def test_torchscript(name):
    with set_layer_config(scriptable=True):
        model = qing.create_model(name).eval()
    scripted = torch.jit.script(model)
    x = _input(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_fx_forward(name):
    model = qing.create_model(name).eval()
    x = _input(model)
    with torch.no_grad():
        expected = model(x)
        traced = next(iter(_fx_model(model)(x).values()))
    assert torch.equal(traced, expected)


@pytest.mark.parametrize("name", MODELS)
def test_fx_backward(name):
    model = qing.create_model(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    traced = _fx_model(model, train=True)
    out = torch.cat(tuple(traced(_input(model, batch=2)).values()))
    out.mean().backward()
    assert out.shape[-1] == 42
    assert sum(p.grad.numel() for p in traced.parameters() if p.grad is not None) == num_params


@pytest.mark.parametrize("name", MODELS)
def test_fx_then_torchscript(name):
    """timm's check: a symbolically traced model scripts too (no string annotations in the traced code)."""
    with set_layer_config(scriptable=True):
        model = qing.create_model(name).eval()
    scripted = torch.jit.script(_fx_model(model))
    x = _input(model)
    with torch.no_grad():
        assert torch.allclose(next(iter(scripted(x).values())), model(x), atol=1e-5)


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_meta_device_then_materialize(pos_embed):
    reference = qing.create_model("qing_test_tr1", pos_embed=pos_embed).eval()
    model = qing.create_model("qing_test_tr1", pos_embed=pos_embed, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    model = model.to_empty(device="cpu")
    model.init_non_persistent_buffers()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference(x))


def test_bf16_parameters_and_autocast():
    model = qing.create_model("qing_test_tr1", dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    model = qing.create_model("qing_test_tr1").eval()
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert torch.allclose(out.float(), model(x), atol=0.1)
