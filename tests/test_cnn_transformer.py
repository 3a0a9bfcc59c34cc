"""Behaviour of the CNN-Transformer family beyond the generic contract."""

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import group_parameters
from torch import nn

import qing
from qing.layers import EncoderBlock, sincos_table
from qing.weights import ORIGINAL_PREPROCESSING, convert_original_hybrid
from tests.model_helpers import randomize_batchnorm
from tests.reference.original_hybrid import OriginalHybrid


@pytest.fixture(scope="module")
def original_pair():
    torch.manual_seed(1)
    original = OriginalHybrid(num_classes=1).eval()
    randomize_batchnorm(original)
    state_dict, kwargs = convert_original_hybrid(original.state_dict())
    model = qing.create_model("qing_densenet121_tr2", **kwargs).eval()
    model.load_state_dict(state_dict)
    return original, model


@pytest.mark.parametrize("batch", [1, 3])
def test_densenet121_tr2_is_the_original_design(original_pair, batch):
    original, model = original_pair
    x = torch.randn(batch, 3, 224, 224) * 2
    with torch.no_grad():
        expected = original(x)
        probs = torch.sigmoid(model(x))
    assert probs.shape == expected.shape == (batch, 1)
    assert torch.allclose(probs, expected, atol=1e-5)
    if batch > 1:
        assert expected.std() > 0  # inputs really differ


def test_original_config_values():
    model = qing.create_model("qing_densenet121_tr2")
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (512, 2, 8)
    assert model.blocks[0].mlp.fc1.out_features == 1024 and not model.blocks[0].pre_norm
    assert model.pos_drop.p == model.head_drop.p == model.blocks[0].mlp.drop1.p == 0.2
    assert isinstance(model.backbone.features.norm5.act, nn.Identity)  # torchvision `features` ends at norm5
    original = qing.create_model("qing_densenet121_tr2.original")  # no weights, the original preprocessing
    assert original.pretrained_cfg["mean"] == ORIGINAL_PREPROCESSING["mean"]
    assert original.pretrained_cfg["std"] == ORIGINAL_PREPROCESSING["std"]
    config = resolve_data_config(model=original)
    assert config["crop_mode"] == "squash" and config["crop_pct"] == 1.0  # Resize((224, 224)), no crop


def test_sincos_table_matches_the_formula():
    table = sincos_table(50, 8)
    pos, i = 7, 3  # channel pair (6, 7) uses frequency 10000^(-6/8)
    freq = 10000 ** (-(2 * i) / 8)
    assert torch.isclose(table[pos, 2 * i], torch.tensor(pos * freq).sin())
    assert torch.isclose(table[pos, 2 * i + 1], torch.tensor(pos * freq).cos())
    assert torch.equal(table[0, 1::2], torch.ones(4))


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_attention_weights_are_explicit_softmax(norm):
    block = EncoderBlock(32, 4, 64, norm=norm).eval()
    x = torch.randn(2, 10, 32)
    weights = block.attention_weights(x)
    h = block.norm1(x) if norm == "pre" else x
    q, k, _ = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).chunk(3, dim=-1)
    q = q.reshape(2, 10, 4, 8).transpose(1, 2)
    k = k.reshape(2, 10, 4, 8).transpose(1, 2)
    explicit = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1)
    assert weights.shape == (2, 4, 10, 10)
    assert torch.allclose(weights, explicit, atol=1e-6)
    # the same weights nn.MultiheadAttention reports for the same parameters
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    mha.in_proj_weight.data.copy_(block.attn.qkv.weight)
    mha.in_proj_bias.data.copy_(block.attn.qkv.bias)
    _, mha_weights = mha(h, h, h, need_weights=True, average_attn_weights=False)
    assert torch.allclose(weights, mha_weights, atol=1e-6)


def test_forward_attention_per_layer_and_fused_forward():
    model = qing.create_model("qing_test_tr1", depth=2).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        maps = model.forward_attention(x)
    assert [m.shape for m in maps] == [(2, 4, 17, 17)] * 2
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 4, 17))
    with torch.profiler.profile() as prof, torch.no_grad():
        model(x)
    ops = {e.name for e in prof.events()}
    assert "aten::scaled_dot_product_attention" in ops
    assert "aten::_softmax" not in ops  # the normal path never materializes the weights


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
@pytest.mark.parametrize("size", [(64, 64), (96, 160), (160, 160), (256, 256)])
def test_any_multiple_of_the_stride(pos_embed, size):
    model = qing.create_model("qing_test_tr1", pos_embed=pos_embed, num_classes=2).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        assert model(x).shape == (1, 2)
        tokens = model.forward_features(x)
    assert tokens.shape[1] == 1 + (size[0] // 32) * (size[1] // 32)


def test_learned_position_grid_is_resampled_not_cropped():
    model = qing.create_model("qing_test_tr1", pos_embed="learned")
    assert model.pos_embed.grid_size == (5, 5)
    tokens = torch.zeros(1, 1 + 6 * 4, 64)
    out = model.pos_embed(tokens, 6, 4)
    assert out.shape == (1, 25, 64)
    assert torch.equal(out[:, 0], model.pos_embed.pos_embed[:, 0].detach())  # class position kept


def test_grayscale_input_without_channel_copy():
    model = qing.create_model("qing_densenet121_tr2", in_chans=1, num_classes=2).eval()
    assert model.backbone.features.conv0.in_channels == 1 and model.in_chans == 1
    assert model.pretrained_cfg["input_size"][0] == 3  # the cfg describes the source, timm adapts
    with torch.no_grad():
        assert model(torch.randn(2, 1, 224, 224)).shape == (2, 2)


def test_freeze_backbone_counts_trainable_parameters():
    model = qing.create_model("qing_densenet121_tr2")
    units = model.backbone_units()
    names = [n for n, _ in units]
    assert names == [
        "features.conv0", "features.norm0", "features.denseblock1", "features.transition1",
        "features.denseblock2", "features.transition2", "features.denseblock3", "features.transition3",
        "features.denseblock4", "features.norm5",
    ]  # fmt: skip
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    total, backbone = count(model), count(model.backbone)
    trainable = lambda: sum(p.numel() for p in model.parameters() if p.requires_grad)  # noqa: E731

    model.freeze_backbone(0)
    assert trainable() == total - backbone
    model.freeze_backbone(2)
    assert trainable() == total - backbone + count(units[-1][1]) + count(units[-2][1])
    assert model.backbone.features.norm5.weight.requires_grad
    assert not model.backbone.features.transition3.conv.weight.requires_grad
    model.freeze_backbone(100)
    assert trainable() == total
    model.freeze_backbone(0)
    model.unfreeze()
    assert trainable() == total


@pytest.mark.parametrize("name", ["qing_test_tr1", "qing_densenet121_tr2"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    a = qing.create_model(name, drop_rate=0.0).train()
    b = qing.create_model(name, drop_rate=0.0).train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), n
    b.set_grad_checkpointing(False)
    assert all("forward" not in m.__dict__ for m in b.modules())


def test_densenet_checkpointing_saves_only_layer_outputs():
    """Whole dense layers are recomputed: far fewer tensors are kept for backward."""
    from torch.autograd.graph import saved_tensors_hooks

    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(2, 3, 96, 96)).sum()
        return total

    model = qing.create_model("qing_densenet121_tr2").train()
    plain = saved_bytes(model)
    model.set_grad_checkpointing(True)
    assert saved_bytes(model) < 0.25 * plain


def test_group_matcher_orders_backbone_then_encoder_then_head():
    model = qing.create_model("qing_densenet121_tr2")
    groups = group_parameters(model, model.group_matcher(coarse=True))
    names = list(groups.values())
    assert names[0][0].startswith("backbone.features.conv0")
    assert any(n.startswith("backbone.features.denseblock1") for n in names[1])
    block_groups = [i for i, g in enumerate(names) if any(n.startswith("blocks.") for n in g)]
    token_group = next(i for i, g in enumerate(names) if "cls_token" in g)
    assert token_group < block_groups[0]
    assert "head.weight" in names[-1]
    assert sum(len(g) for g in names) == len(list(model.named_parameters()))
    assert model.no_weight_decay() == {"cls_token"}
    learned = qing.create_model("qing_test_tr1", pos_embed="learned")
    assert learned.no_weight_decay() <= {n for n, _ in learned.named_parameters()}


def test_pre_norm_variant_has_final_norm():
    model = qing.create_model("qing_test_tr1", norm="pre")
    assert model.blocks[0].pre_norm and isinstance(model.norm, nn.LayerNorm)


def test_model_args_are_json_and_rebuild_the_model():
    import json

    model = qing.create_model("qing_test_tr1", num_classes=3, pos_embed="learned", depth=2)
    args = json.loads(json.dumps(model._model_args))
    rebuilt = qing.create_model("qing_test_tr1", **args)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


# ---- bad input ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return qing.create_model("qing_test_tr1").eval()


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 64, 64), "expected a 4-D image batch (B, C, H, W), got a tensor of shape [3, 64, 64]"),
        ((1, 1, 64, 64), "expected 3 input channel(s), got 1"),
        (
            (1, 3, 100, 64),
            "input size 100x64 is not a positive multiple of the backbone stride 32; resize to e.g. 96x64",
        ),
        ((1, 3, 16, 64), "input size 16x64 is not a positive multiple of the backbone stride 32"),
    ],
)
def test_bad_input_shape(tiny, shape, message):
    with pytest.raises(ValueError) as err:
        tiny(torch.randn(*shape))
    assert message in str(err.value)


def test_too_many_tokens_for_the_position_table():
    model = qing.create_model("qing_test_tr1", max_tokens=10)
    with pytest.raises(ValueError, match="gives 17 tokens, more than the position encoding's 10"):
        model(torch.randn(1, 3, 128, 128))


def test_unknown_backbone():
    with pytest.raises(
        ValueError, match=r"unknown backbone 'densenet122': not a timm model name; close matches: .*densenet121"
    ):
        qing.create_model("qing_test_tr1", backbone="densenet122")


def test_transformer_backbone_rejected():
    with pytest.raises(ValueError, match="'test_vit' is a vision transformer"):
        qing.create_model("qing_test_tr1", backbone="test_vit")


def test_unknown_kwargs_list_accepted_ones():
    with pytest.raises(TypeError, match=r"qing_test_tr1: unknown argument\(s\) depht; accepted: .*depth"):
        timm.create_model("qing_test_tr1", depht=3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(norm="middle"), "norm='middle' is not supported; use one of ('post', 'pre')"),
        (dict(pos_embed="rope"), "pos_embed='rope' is not supported; use one of ('sincos', 'learned')"),
        (dict(global_pool="max"), "global_pool='max' is not supported"),
        (dict(num_heads=3), "embed_dim=64 must be divisible by num_heads=3"),
        (dict(backbone_args=dict(in_chans=1)), "backbone_args may not set ['in_chans']"),
    ],
)
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError) as err:
        qing.create_model("qing_test_tr1", **kwargs)
    assert message in str(err.value)


def test_unknown_model_and_tag():
    with pytest.raises(ValueError, match=r"unknown model 'qing_densenet121_tr3'; did you mean .*qing_densenet121_tr2"):
        qing.create_model("qing_densenet121_tr3")
    with pytest.raises(ValueError, match=r"unknown tag 'imagenet' for qing_test_tr1; known tags: "):
        qing.create_model("qing_test_tr1.imagenet")
    with pytest.raises(ValueError) as err:
        qing.create_model("qing_densenet121_tr5")
    suggestions = str(err.value).split("did you mean ")[1].split("?")[0].split(", ")
    assert len(suggestions) == len(set(suggestions)) and "qing_densenet121_tr4" in suggestions
    with pytest.raises(ValueError) as err:
        qing.create_model("zzz_no_such_model")
    assert str(err.value).startswith("unknown model 'zzz_no_such_model'. qing models: qing_")
