"""CNN-Transformer hybrids for chest X-ray classification.

A timm CNN turns the image into a feature map; each of its ``h x w`` positions becomes a
token (``Linear + LayerNorm`` to ``embed_dim``); a learnable class token is prepended, a
position encoding added, and a small Transformer encoder mixes the tokens. The head reads
``concat(class token, mean of the spatial tokens)``::

    image (B, C, H, W)
      -> backbone.forward_features        (B, F, h, w)     h = H / stride
      -> tokens + LayerNorm                (B, h*w, D)
      -> [cls] + tokens + position         (B, 1 + h*w, D)
      -> depth x EncoderBlock              (B, 1 + h*w, D)  = forward_features
      -> concat(cls, mean(spatial))        (B, 2D)
      -> Linear(2D, D), GELU, Dropout      (B, D)           = forward_head(pre_logits=True)
      -> Linear(D, num_classes)            (B, num_classes) logits

``qing_densenet121_tr2`` is the original design (DenseNet121 without its final ReLU, 512-d,
8 heads, MLP 1024, two post-norm blocks, dropout 0.2, sinusoidal positions).

``head_type="residual"`` (the ``*_r2`` models) keeps the CNN's own pooled linear classifier and adds
the encoder's prediction as a residual through a gate that starts closed (a zero-initialized
projection, :class:`~qing.layers.ResidualHead`)::

    logits = Linear(GAP(backbone map)) + Linear_zero_init(MLP(concat(cls, mean(spatial))))

A fresh residual hybrid is therefore exactly its backbone's pooled classifier (with a CNN
checkpoint that has a fitting classifier, e.g. CheXNet's, it *is* that CNN), and the encoder only
adds what training supports. Its ``forward_features`` returns both streams side by side,
``(B, 1 + h*w, D + F)``: the encoder's tokens, then the backbone's ``F`` features of each grid cell
(the global average at the class-token position).
"""

# No ``from __future__ import annotations`` here or in qing.layers: torch.fx copies the forward
# signatures into the traced code, and TorchScript cannot read string annotations there.
import dataclasses
import inspect
import re
from collections.abc import Mapping
from functools import partial
from typing import Any, Optional, Union

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function, register_notrace_module, trunc_normal_
from timm.models import (
    checkpoint_seq,
    generate_default_cfgs,
    get_pretrained_cfg,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models._features import feature_take_indices
from timm.models.densenet import DenseLayer, DenseNet
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from qing.layers import (
    NORM_PLACEMENTS,
    POS_EMBED_TYPES,
    EncoderBlock,
    LearnedPosEmbed,
    ResidualHead,
    SinCosPosEmbed,
    TokenDropout,
)
from qing.layers.encoder import LayerNorm
from qing.meta import sync_head
from qing.models._builder import build_model_with_weights, check_model_kwargs, convert_foreign_state_dict
from qing.weights import (
    CHEXNET_FILE,
    CXR14_LABELS,
    ORIGINAL_PREPROCESSING,
    XRV_MEAN,
    XRV_STD,
    XRV_WEIGHTS,
    Conversion,
    convert_chexnet,
    convert_for_hybrid,
    convert_xrv_densenet,
    strip_prefixes,
)
from qing.weights.chexnet import CHEXNET_URL, CHEXNET_WEIGHTS_URL, NO_LICENSE
from qing.weights.densenet_layout import normalize_densenet_keys

__all__ = ["GLOBAL_POOL_TYPES", "HEAD_TYPES", "CNNTransformer"]

#: ``global_pool`` values: what ``forward_head`` reads from the tokens.
GLOBAL_POOL_TYPES = ("token_avg", "token", "avg", "")

#: ``head_type`` values: ``"encoder"`` (logits from the encoder alone, the original design) or
#: ``"residual"`` (the backbone's pooled linear classifier plus the encoder's residual, gated closed at init).
HEAD_TYPES = ("encoder", "residual")

# Validation runs as one opaque call under torch.fx, so traced graphs keep it without branching.
register_notrace_module(SinCosPosEmbed)
register_notrace_module(LearnedPosEmbed)
register_notrace_module(TokenDropout)  # data-dependent token count while training


@register_notrace_function
def check_input(x: torch.Tensor, in_chans: int, stride: int, max_tokens: int) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(B, in_chans, H, W)`` with ``H, W`` multiples of ``stride``."""
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D image batch (B, C, H, W), got a tensor of shape {list(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channel(s), got {x.shape[1]} (input shape {list(x.shape)}); "
            f"create the model with in_chans={x.shape[1]} or convert the images"
        )
    h, w = x.shape[2], x.shape[3]
    if h % stride != 0 or w % stride != 0 or h < stride or w < stride:
        raise ValueError(
            f"input size {h}x{w} is not a positive multiple of the backbone stride {stride}; "
            f"resize to e.g. {max(1, h // stride) * stride}x{max(1, w // stride) * stride}"
        )
    if (h // stride) * (w // stride) + 1 > max_tokens:
        raise ValueError(
            f"input size {h}x{w} gives {(h // stride) * (w // stride) + 1} tokens, more than the "
            f"position encoding's {max_tokens}; use a smaller image or a larger max_tokens"
        )


@register_notrace_function
def backbone_stream(feature_map: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """Backbone map ``(B, F, h, w)`` -> ``(B, 1 + K, F)``: its global average, then its grid cells.

    ``keep`` (``(B, K)`` indices from token dropout) selects the cells the encoder kept; ``None`` keeps all.
    """
    cells = feature_map.flatten(2).transpose(1, 2)
    if keep is not None:
        cells = cells.gather(1, keep.unsqueeze(-1).expand(-1, -1, cells.shape[-1]))
    pooled = F.adaptive_avg_pool2d(feature_map, 1).flatten(1)  # timm's global_pool="avg"
    return torch.cat([pooled.unsqueeze(1), cells], dim=1)


def _prefix_pattern(pattern: Any, prefix: str) -> Any:
    """Re-anchor a timm ``group_matcher`` regex (or list of ``(regex, suffix)``) under ``prefix``."""
    if pattern is None:
        return None
    if isinstance(pattern, str):
        return rf"^{re.escape(prefix)}(?:{pattern.lstrip('^')})"
    return [(_prefix_pattern(p, prefix), suffix) for p, suffix in pattern]


def _create_backbone(name: str, *, in_chans: int, final_act: bool, args: dict[str, Any], **dd: Any) -> nn.Module:
    """A headless timm CNN whose ``forward_features`` returns its last feature map."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:8]
        raise ValueError(
            f"unknown backbone {name!r}: not a timm model name"
            + (f"; close matches: {', '.join(close)}" if close else "")
            + " (see timm.list_models())"
        )
    reserved = {"pretrained", "in_chans", "num_classes", "features_only"} & set(args)
    if reserved:
        raise ValueError(f"backbone_args may not set {sorted(reserved)}: the hybrid controls them")
    backbone = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0, **args, **dd)
    if not hasattr(backbone, "forward_intermediates") or not getattr(backbone, "feature_info", None):
        raise ValueError(
            f"backbone {name!r} has no forward_intermediates/feature_info; use a timm CNN such as "
            "densenet121, resnet50, convnext_tiny or efficientnet_b0"
        )
    if hasattr(backbone, "patch_embed"):
        raise ValueError(f"backbone {name!r} is a vision transformer; the hybrid needs a CNN feature map")
    # drop classifier and pooling (and head-only norms such as ConvNeXt's), keep what forward_features runs
    if "reset_other" in inspect.signature(backbone.reset_classifier).parameters:
        backbone.reset_classifier(0, "", reset_other=True)
    else:
        backbone.reset_classifier(0, "")
    if not final_act:
        norm_acts = [m for m in backbone.modules() if hasattr(m, "act") and isinstance(m, nn.BatchNorm2d)]
        if not norm_acts:
            raise ValueError(f"backbone_final_act=False: {name!r} has no final norm + activation layer to strip")
        norm_acts[-1].act = nn.Identity()  # e.g. DenseNet's norm5: torchvision's `features` ends before the ReLU
    return backbone


def _checkpoint_modules(model: nn.Module, module_type: type[nn.Module], enable: bool) -> None:
    """Make every ``module_type`` submodule recompute its forward in backward (non-reentrant)."""
    for module in model.modules():
        if not isinstance(module, module_type):
            continue
        module.__dict__.pop("forward", None)
        if enable:
            module.forward = partial(_checkpointed_forward, module)


def _checkpointed_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(module).forward
    if not module.training or not torch.is_grad_enabled():
        return forward(module, *args, **kwargs)
    # recomputation runs later: snapshot list arguments (DenseBlock keeps appending to its feature list)
    args = tuple(list(a) if isinstance(a, list) else a for a in args)
    return checkpoint(forward, module, *args, use_reentrant=False, **kwargs)


class CNNTransformer(nn.Module):
    """A timm CNN backbone followed by a Transformer encoder over its feature-map tokens.

    All arguments are keyword-only and JSON-able (the backbone is a timm model name), so
    timm records them in ``config.json`` and ``create_model`` can rebuild the model.

    Args:
        backbone: timm CNN name; its last feature map (stride ``feat_stride``) becomes the tokens.
        backbone_args: Extra kwargs for ``timm.create_model(backbone, ...)``.
        backbone_final_act: Keep the activation after the backbone's final norm. ``False``
            strips it (DenseNet121 as torchvision's ``features``, the original design).
        num_classes: Outputs (logits). 0 makes ``forward`` return pre-logits features.
        in_chans: Input channels (1 for grayscale X-rays without copying to 3 channels).
        img_size: Default input size; sets the learned position grid and ``pool_size``.
        embed_dim: Token width ``D``.
        depth: Number of encoder blocks.
        num_heads: Attention heads.
        mlp_dim: Hidden width of the block MLP.
        norm: ``"post"`` (the original, as ``nn.TransformerEncoderLayer``) or ``"pre"``.
        pos_embed: ``"sincos"`` (fixed, the original) or ``"learned"`` (resampled on new grids).
        max_tokens: Length of the sinusoidal table (5000 as the original).
        global_pool: ``"token_avg"`` (class token joined with the mean of spatial tokens, the
            original), ``"token"``, ``"avg"`` or ``""`` (return tokens).
        head_type: ``"encoder"`` (the original: logits from the encoder) or ``"residual"``
            (the backbone's pooled linear classifier plus the encoder's logits through a zero-initialized
            projection, so a fresh model is exactly its backbone's classifier; :class:`~qing.layers.ResidualHead`).
        drop_rate: Dropout after positions, in the blocks and in the head (0.2 originally).
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth, linearly increasing over the blocks.
        token_drop_rate: Fraction of the spatial tokens dropped (not attended to) per image while
            training (:class:`~qing.layers.TokenDropout`).
        device: Parameter device (e.g. ``"meta"``).
        dtype: Parameter dtype.
    """

    def __init__(
        self,
        *,
        backbone: str = "densenet121",
        backbone_args: Optional[dict[str, Any]] = None,
        backbone_final_act: bool = True,
        num_classes: int = 14,
        in_chans: int = 3,
        img_size: Union[int, tuple[int, int]] = 224,
        embed_dim: int = 512,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 1024,
        norm: str = "post",
        pos_embed: str = "sincos",
        max_tokens: int = 5000,
        global_pool: str = "token_avg",
        head_type: str = "encoder",
        drop_rate: float = 0.2,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        token_drop_rate: float = 0.0,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if norm not in NORM_PLACEMENTS:
            raise ValueError(f"norm={norm!r} is not supported; use one of {NORM_PLACEMENTS}")
        if pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f"pos_embed={pos_embed!r} is not supported; use one of {POS_EMBED_TYPES}")
        if global_pool not in GLOBAL_POOL_TYPES:
            raise ValueError(f"global_pool={global_pool!r} is not supported; use one of {GLOBAL_POOL_TYPES}")
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type={head_type!r} is not supported; use one of {HEAD_TYPES}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.head_type = head_type
        self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.backbone = _create_backbone(
            backbone, in_chans=in_chans, final_act=backbone_final_act, args=dict(backbone_args or {}), **dd
        )
        backbone_info = self.backbone.feature_info
        self.feat_stride = int(backbone_info[-1]["reduction"])
        self.backbone_features = int(self.backbone.num_features)
        # features and pre-logits: the encoder's D, then (residual) the backbone's F
        residual = head_type == "residual"
        self.num_features = self.head_hidden_size = embed_dim + (self.backbone_features if residual else 0)
        self.max_tokens = max_tokens
        grid = (img_size[0] // self.feat_stride, img_size[1] // self.feat_stride)

        self.token_proj = nn.Sequential(nn.Linear(self.backbone_features, embed_dim, **dd), LayerNorm(embed_dim, **dd))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        if pos_embed == "sincos":
            self.pos_embed: nn.Module = SinCosPosEmbed(embed_dim, max_len=max_tokens, **dd)
        else:
            self.pos_embed = LearnedPosEmbed(embed_dim, grid, **dd)
        self.pos_drop = nn.Dropout(drop_rate)
        self.token_drop = TokenDropout(token_drop_rate, num_prefix_tokens=self.num_prefix_tokens)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[
            EncoderBlock(
                embed_dim, num_heads, mlp_dim, norm=norm, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[i], **dd,
            )
            for i in range(depth)
        ])  # fmt: skip
        # post-norm blocks end normalized; pre-norm ones need a final norm
        self.norm = LayerNorm(embed_dim, **dd) if norm == "pre" else nn.Identity()

        self.pre_logits = self._make_pre_logits(global_pool, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes, **dd)

        self._num_backbone_levels = len(backbone_info)
        self.feature_info = [dict(info, module=f"backbone.{info['module']}") for info in backbone_info] + [
            dict(num_chs=embed_dim, reduction=self.feat_stride, module=f"blocks.{i}") for i in range(depth)
        ]
        self.init_weights()

    def _make_pre_logits(self, global_pool: str, **dd: Any) -> nn.Module:
        if not global_pool:
            return nn.Identity()
        width = 2 * self.embed_dim if global_pool == "token_avg" else self.embed_dim
        return nn.Sequential(nn.Linear(width, self.embed_dim, **dd), nn.GELU())

    def _make_head(self, num_classes: int, **dd: Any) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        if self.head_type == "residual":
            return ResidualHead(self.embed_dim, self.backbone_features, num_classes, **dd)
        return nn.Linear(self.embed_dim, num_classes, **dd)

    def init_weights(self) -> None:
        """Initialize the token, transformer and head weights (the backbone keeps timm's init)."""
        if self.cls_token.device.type == "meta":
            return
        trunc_normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("backbone"):
                continue
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if isinstance(self.head, ResidualHead):
            self.head.init_weights()  # its encoder branch starts closed (zero)

    def init_non_persistent_buffers(self) -> None:
        """Recompute derived buffers (the sinusoidal table) after ``to_empty()`` from ``meta``."""
        if isinstance(self.pos_embed, SinCosPosEmbed):
            self.pos_embed.init_non_persistent_buffers()

    # ---- timm model contract -------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay."""
        names = {"cls_token"}
        if isinstance(self.pos_embed, LearnedPosEmbed):
            names.add("pos_embed.pos_embed")
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups in depth order: backbone stem, backbone blocks, tokens, encoder blocks.

        The head and parameters matched nowhere (e.g. DenseNet's ``norm5``) fall in the last group.
        """
        inner = self.backbone.group_matcher(coarse=coarse)
        return dict(
            stem=_prefix_pattern(inner.get("stem"), "backbone."),
            backbone_blocks=_prefix_pattern(inner.get("blocks"), "backbone."),
            tokens=r"^token_proj|^cls_token|^pos_embed",
            blocks=r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward (backbone and encoder) to cut training memory.

        Uses the backbone's own timm checkpointing, except for DenseNet, whose timm version only
        recomputes the bottleneck: there every dense layer is recomputed whole, so each layer
        keeps just its 32-channel output (training peak memory about halves; see benchmarks/).
        """
        self.grad_checkpointing = enable
        if isinstance(self.backbone, DenseNet):
            _checkpoint_modules(self.backbone, DenseLayer, enable)
        else:
            self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final ``Linear(D, num_classes)``, or the :class:`~qing.layers.ResidualHead` (residual)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the final layer (and, if the pooled width changes, the hidden head layer).

        Args:
            num_classes: New number of outputs; 0 removes the classifier.
            global_pool: New pooling (one of ``GLOBAL_POOL_TYPES``); ``None`` keeps it.
        """
        dd = {"device": self.cls_token.device, "dtype": self.cls_token.dtype}
        if global_pool is not None and global_pool != self.global_pool:
            if global_pool not in GLOBAL_POOL_TYPES:
                raise ValueError(f"global_pool={global_pool!r} is not supported; use one of {GLOBAL_POOL_TYPES}")
            old_width = 2 if self.global_pool == "token_avg" else 1 if self.global_pool else 0
            new_width = 2 if global_pool == "token_avg" else 1 if global_pool else 0
            if old_width != new_width:
                self.pre_logits = self._make_pre_logits(global_pool, **dd)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = self._make_head(num_classes, **dd)
        if isinstance(self.head, nn.Linear) and dd["device"].type != "meta":
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        sync_head(self)  # pretrained_cfg num_classes / label names and thresholds follow the new head

    @torch.jit.ignore
    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` that first converts CheXNet, torchxrayvision and original-hybrid checkpoints.

        A state dict in a foreign format (see :data:`qing.models.FOREIGN_FORMATS`) is converted and
        completed with this model's own tensors where it has none (a backbone-only checkpoint), as
        ``pretrained=True`` does; so ``timm.create_model(..., checkpoint_path="model.pth.tar")`` works.
        """
        converted = convert_foreign_state_dict(state_dict, self)
        return super().load_state_dict(state_dict if converted is None else converted, strict=strict, assign=assign)

    # ---- forward --------------------------------------------------------------------------

    def forward_tokens(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Backbone feature map ``(B, F, h, w)`` -> embedded tokens ``(B, 1 + h*w, D)`` (before the blocks)."""
        grid_h, grid_w = feature_map.shape[-2], feature_map.shape[-1]
        x = self.token_proj(feature_map.permute(0, 2, 3, 1).flatten(1, 2))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.pos_drop(self.pos_embed(x, grid_h, grid_w))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_chans, H, W)`` -> encoded tokens ``(B, 1 + H/s * W/s, D)``, class token first.

        With ``head_type="residual"`` each token is followed by the backbone's features of its grid
        cell (the global average at the class token): ``(B, 1 + H/s * W/s, D + F)``. While training
        with ``token_drop_rate`` only the kept tokens are returned.
        """
        check_input(x, self.in_chans, self.feat_stride, self.max_tokens)
        feature_map = self.backbone.forward_features(x)
        x, keep = self.token_drop(self.forward_tokens(feature_map))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        x = self.norm(x)
        if self.head_type == "residual":
            x = torch.cat([x, backbone_stream(feature_map, keep)], dim=-1)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, 1 + N, D)`` -> ``(B, 2D)`` for ``token_avg``, ``(B, D)`` for ``token``/``avg``."""
        if self.global_pool == "token_avg":
            return torch.cat([x[:, 0], x[:, 1:].mean(dim=1)], dim=-1)
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, 1:].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits ``(B, num_classes)``, or the ``(B, head_hidden_size)`` hidden features if ``pre_logits``.

        The hidden features are the encoder's ``D`` (after ``Linear, GELU``), followed for
        ``head_type="residual"`` by the backbone's globally averaged ``F``.
        """
        if self.head_type == "residual":
            encoded = x[..., : self.embed_dim]
            pooled = x[:, 0, self.embed_dim :] if self.global_pool != "" else x[..., self.embed_dim :]
            x = torch.cat([self.head_drop(self.pre_logits(self.pool(encoded))), pooled], dim=-1)
        else:
            x = self.head_drop(self.pre_logits(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_chans, H, W)`` -> logits ``(B, num_classes)`` (no sigmoid)."""
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_attention(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights of every encoder block, for explanation.

        Runs the normal forward once more with an explicit ``softmax(Q K^T / sqrt(d))`` per
        block, so ``forward`` itself stays on the fused kernel.

        Args:
            x: Images ``(B, in_chans, H, W)``.

        Returns:
            One tensor per block, ``(B, num_heads, 1 + h*w, 1 + h*w)``; token 0 is the class
            token and tokens ``1..h*w`` follow the feature map in row-major order.
        """
        check_input(x, self.in_chans, self.feat_stride, self.max_tokens)
        x = self.forward_tokens(self.backbone.forward_features(x))
        weights = []
        for block in self.blocks:
            weights.append(block.attention_weights(x))
            x = block(x)
        return weights

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Backbone feature maps followed by each encoder block's spatial tokens as maps.

        Levels ``0 .. n-1`` are the backbone's ``feature_info`` levels; level ``n + i`` is block
        ``i`` with its class token dropped and tokens reshaped to ``(B, D, h, w)``.

        Args:
            x: Images ``(B, in_chans, H, W)``.
            indices: Last ``n`` levels if int, all if ``None``, else the listed levels.
            norm: Apply the final norm to block outputs (pre-norm models only; post-norm ends normalized).
            stop_early: Stop once the last requested level is computed.
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: Return only the intermediates.

        Returns:
            ``intermediates`` or ``(forward_features output, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        check_input(x, self.in_chans, self.feat_stride, self.max_tokens)
        n_bb = self._num_backbone_levels
        take_indices, max_index = feature_take_indices(n_bb + len(self.blocks), indices)
        bb_take = [i for i in take_indices if i < n_bb]
        nhwc = output_fmt == "NHWC"

        intermediates: list[torch.Tensor] = []
        if (intermediates_only or stop_early) and max_index < n_bb:
            maps = self.backbone.forward_intermediates(x, indices=bb_take, stop_early=True, intermediates_only=True)
            return [m.permute(0, 2, 3, 1) if nhwc else m for m in maps]
        if bb_take:
            feature_map, maps = self.backbone.forward_intermediates(x, indices=bb_take)
            intermediates.extend(m.permute(0, 2, 3, 1) if nhwc else m for m in maps)
        else:
            feature_map = self.backbone.forward_features(x)

        grid_h, grid_w = feature_map.shape[-2:]
        x = self.forward_tokens(feature_map)
        last_block = max_index - n_bb if stop_early else len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if i > last_block:
                break
            x = block(x)
            if n_bb + i in take_indices:
                out = self.norm(x) if norm else x
                out = out[:, self.num_prefix_tokens :].reshape(out.shape[0], grid_h, grid_w, -1)
                intermediates.append(out if nhwc else out.permute(0, 3, 1, 2))

        if intermediates_only:
            return intermediates
        x = self.norm(x)
        if self.head_type == "residual":
            x = torch.cat([x, backbone_stream(feature_map, None)], dim=-1)
        return x, intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
        self,
        indices: Union[int, list[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the layers after the last level in ``indices`` (timm feature extraction)."""
        n_bb = self._num_backbone_levels
        take_indices, max_index = feature_take_indices(n_bb + len(self.blocks), indices)
        if max_index < n_bb:
            self.backbone.prune_intermediate_layers(
                [i for i in take_indices if i < n_bb], prune_norm=prune_norm, prune_head=True
            )
            self.blocks = self.blocks[:0]
            self.token_proj = nn.Identity()
            self.cls_token = nn.Parameter(self.cls_token.detach()[:, :, :0], requires_grad=False)
            self.pos_embed = nn.Identity()
        else:
            self.blocks = self.blocks[: max_index - n_bb + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.pre_logits = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    # ---- fine-tuning helpers -------------------------------------------------------------

    @torch.jit.ignore
    def backbone_units(self) -> list[tuple[str, nn.Module]]:
        """The backbone's top-level units, input to output, as ``FREEZE_CNN``/``FINE_TUNE_LAYERS`` count them.

        Direct children of the backbone, with ``nn.Sequential`` children opened one level
        (DenseNet121: ``features.conv0, features.norm0, features.denseblock1, features.transition1,
        ..., features.denseblock4, features.norm5``; ResNet: ``conv1, bn1, layer1.0, ...``;
        ConvNeXt: ``stem.0, stem.1, stages.0, ..., stages.3``). Units without parameters are skipped.

        Returns:
            ``(name, module)`` pairs, names relative to ``model.backbone``.
        """
        units = []
        for name, child in self.backbone.named_children():
            members = child.named_children() if isinstance(child, nn.Sequential) else [("", child)]
            for sub, module in members:
                if any(True for _ in module.parameters()):
                    units.append((f"{name}.{sub}" if sub else name, module))
        return units

    @torch.jit.ignore
    def freeze_backbone(self, trainable_top_k: int = 0) -> None:
        """Freeze the backbone except its top ``k`` units (see ``backbone_units``).

        The original design's ``FREEZE_CNN=True, FINE_TUNE_LAYERS=k``. Token projection,
        encoder and head stay trainable. ``k`` larger than the number of units unfreezes all.

        Args:
            trainable_top_k: Units at the output end of the backbone left trainable.
        """
        if trainable_top_k < 0:
            raise ValueError(f"trainable_top_k must be >= 0, got {trainable_top_k}")
        self.backbone.requires_grad_(False)
        units = self.backbone_units()
        for _, module in units[len(units) - min(trainable_top_k, len(units)) :]:
            module.requires_grad_(True)

    @torch.jit.ignore
    def unfreeze(self) -> None:
        """Make every parameter trainable again."""
        self.requires_grad_(True)


# ---- registry -----------------------------------------------------------------------------------


def _cnn_classifier(state_dict: dict[str, torch.Tensor], fmt: str, model: CNNTransformer) -> Optional[str]:
    """The name of the CNN checkpoint's classifier module in ``state_dict`` (normalized in place), if it has one."""
    if fmt in ("chexnet", "xrv_densenet", "densenet121"):
        if fmt == "chexnet":
            converted = convert_chexnet(state_dict, prefix="", classifier=True)
        elif fmt == "xrv_densenet":
            converted = convert_xrv_densenet(state_dict, prefix="", classifier=True)[0]
        else:
            converted = normalize_densenet_keys(state_dict)
        state_dict.clear()
        state_dict.update(converted)
        return "classifier"
    return model.backbone.pretrained_cfg.get("classifier") or None  # a timm CNN's own, e.g. "fc"


def convert_for_residual(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Conversion:
    """:func:`~qing.weights.convert_for_hybrid`, plus a CNN checkpoint's classifier as the pooled classifier.

    For ``head_type="residual"`` models loading a backbone checkpoint (CheXNet, torchxrayvision,
    torchvision/timm DenseNet121 or a timm CNN), the checkpoint's linear classifier becomes
    ``head.backbone_fc`` when its shape fits: with the encoder's branch closed the hybrid then *is* that CNN
    (``qing_densenet121_r2.chexnet`` predicts exactly as CheXNet). A classifier of another class
    count stays unused and the pooled classifier keeps its initialization.
    """
    conversion = convert_for_hybrid(state_dict, model)
    head = getattr(model, "head", None)
    if not isinstance(head, ResidualHead) or conversion.required_prefix != "backbone.":
        return conversion
    source = strip_prefixes(state_dict)
    name = _cnn_classifier(source, conversion.format, model)
    target = {"weight": head.backbone_fc.weight, "bias": head.backbone_fc.bias}
    found = {p: source.get(f"{name}.{p}") for p in target}
    if name is None or any(v is None or v.shape != target[p].shape for p, v in found.items()):
        return conversion
    mapped = {f"head.backbone_fc.{p}": v for p, v in found.items()}
    classifier_key = re.compile(rf"(^|\.){re.escape(name)}(\.0)?\.(weight|bias)$")
    unused = [k for k in conversion.unused if not classifier_key.search(k)]
    return dataclasses.replace(conversion, state_dict={**conversion.state_dict, **mapped}, unused=unused)


def _create_hybrid(variant: str, pretrained: bool = False, **kwargs: Any) -> CNNTransformer:
    """Build a registered hybrid; ``pretrained=True`` goes through qing's checked loader.

    See :func:`qing.models.build_model_with_weights`: weights are found (file, qing weights directory,
    Hugging Face cache), converted from their format (CheXNet, torchxrayvision, timm backbone,
    the original hybrid, qing) and verified after loading.
    """
    check_model_kwargs(CNNTransformer, variant, kwargs)
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    kwargs.setdefault("img_size", tuple(cfg.input_size[-2:]))  # learned position grid follows the weights
    return build_model_with_weights(
        CNNTransformer,
        variant,
        pretrained,
        convert=convert_for_residual,
        feature_cfg=dict(feature_cls="getter", out_indices=None),
        **kwargs,
    )


def _cfg(first_conv: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": len(CXR14_LABELS),
        "label_names": CXR14_LABELS,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "crop_mode": "squash",
        "interpolation": "bilinear",
        "mean": ORIGINAL_PREPROCESSING["mean"],
        "std": ORIGINAL_PREPROCESSING["std"],
        "first_conv": f"backbone.{first_conv}",
        "classifier": "head",
        "license": "apache-2.0",
        "origin_url": "https://github.com/qing-cxr/qing",
        **kwargs,
    }


_HEAD_NOTE = "Token projection, encoder and head start from random initialization (fine-tune them)."
_RESIDUAL_NOTE = (
    "The encoder starts from random initialization behind a closed (zero) gate, so the model starts as its "
    "backbone's pooled classifier; that classifier is the checkpoint's own where its class count fits."
)


def _timm_cfg(first_conv: str, timm_weights: str, note: str = _HEAD_NOTE, **kwargs: Any) -> dict[str, Any]:
    """Backbone weights of a timm model on the Hub, with that model's normalization and license."""
    src = get_pretrained_cfg(timm_weights)
    return _cfg(
        first_conv,
        hf_hub_id=src.hf_hub_id,
        mean=src.mean,
        std=src.std,
        interpolation=src.interpolation,
        license=src.license or "apache-2.0",
        origin_url=f"https://huggingface.co/{src.hf_hub_id}",
        paper_ids=src.paper_ids,
        description=f"Backbone from timm's {timm_weights} ({src.hf_hub_id}, ImageNet). {note}",
        **kwargs,
    )


def _chexnet_cfg(note: str = _HEAD_NOTE) -> dict[str, Any]:
    """DenseNet121 backbone from CheXNet's model.pth.tar (downloaded into the qing weights directory)."""
    return _cfg(
        "features.conv0",
        file=CHEXNET_FILE,
        url=CHEXNET_WEIGHTS_URL,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        license=NO_LICENSE,
        origin_url=CHEXNET_URL,
        paper_ids="arXiv:1711.05225",
        description=(
            "Backbone from CheXNet (DenseNet121 trained on ChestX-ray14, ImageNet normalization), downloaded on "
            f"first use into $QING_WEIGHTS_DIR/{CHEXNET_FILE}. The source states no licence. {note}"
        ),
    )


def _xrv_cfg(note: str = _HEAD_NOTE) -> dict[str, Any]:
    """1-channel DenseNet121 backbone from torchxrayvision's densenet121-res224-all weights."""
    weights = XRV_WEIGHTS["all"]
    return _cfg(
        "features.conv0",
        file=f"xrv/{weights.filename}",
        url=weights.url,
        input_size=(1, 224, 224),
        mean=XRV_MEAN,
        std=XRV_STD,
        crop_mode="center",
        license="apache-2.0",
        origin_url=weights.url,
        paper_ids="arXiv:2111.00595",
        description=(
            f"Backbone from torchxrayvision {weights.name} ({weights.datasets}): one input channel scaled to "
            f"[-1024, 1024], i.e. mean 0.5 and std 1/2048 on [0, 1]; torchxrayvision's licence. {note}"
        ),
    )


_TEST_INPUT = dict(input_size=(3, 160, 160), pool_size=(5, 5))

# The DenseNet hybrids default to the CheXNet backbone, as the original design did, so
# `create_model("qing_densenet121_tr2", pretrained=True)` means CheXNet weights ("*" marks the default);
# their `.original` tag is the original design's preprocessing without weights (training from scratch,
# migrated original-hybrid checkpoints). The other architectures default to that weightless cfg, so
# pretrained=True there asks for a tag.
_ORIGINAL_NOTE = "The original design's preprocessing (squash resize, mean 0.485 / std 0.229 on every channel)."
default_cfgs = generate_default_cfgs({
    "qing_densenet121_tr2.chexnet*": _chexnet_cfg(),
    "qing_densenet121_tr2.tv_in1k": _timm_cfg("features.conv0", "densenet121.tv_in1k"),
    "qing_densenet121_tr2.xrv_all": _xrv_cfg(),
    "qing_densenet121_tr2.original": _cfg("features.conv0", description=f"No weights. {_ORIGINAL_NOTE}"),
    "qing_densenet121_tr4.chexnet*": _chexnet_cfg(),
    "qing_densenet121_tr4.tv_in1k": _timm_cfg("features.conv0", "densenet121.tv_in1k"),
    "qing_densenet121_tr4.xrv_all": _xrv_cfg(),
    "qing_densenet121_tr4.original": _cfg("features.conv0", description=f"No weights. {_ORIGINAL_NOTE}"),
    "qing_resnet50_tr2.a1_in1k": _timm_cfg("conv1", "resnet50.a1_in1k"),
    "qing_resnet50_tr2.*": _cfg("conv1"),
    "qing_convnext_tiny_tr2.in12k_ft_in1k": _timm_cfg("stem.0", "convnext_tiny.in12k_ft_in1k"),
    "qing_convnext_tiny_tr2.fb_in1k": _timm_cfg("stem.0", "convnext_tiny.fb_in1k"),
    "qing_convnext_tiny_tr2.*": _cfg("stem.0"),
    "qing_efficientnet_b0_tr2.ra_in1k": _timm_cfg("conv_stem", "efficientnet_b0.ra_in1k"),
    "qing_efficientnet_b0_tr2.*": _cfg("conv_stem"),
    "qing_test_tr1.r160_in1k": _timm_cfg("conv1.0", "test_resnet.r160_in1k", **_TEST_INPUT),
    "qing_test_tr1.*": _cfg("conv1.0", **_TEST_INPUT),
    # residual heads: the backbone's pooled classifier + the encoder behind a gate that starts closed
    "qing_densenet121_r2.chexnet*": _chexnet_cfg(_RESIDUAL_NOTE),
    "qing_densenet121_r2.tv_in1k": _timm_cfg("features.conv0", "densenet121.tv_in1k", _RESIDUAL_NOTE),
    "qing_densenet121_r2.xrv_all": _xrv_cfg(_RESIDUAL_NOTE),
    "qing_resnet50_r2.a1_in1k": _timm_cfg("conv1", "resnet50.a1_in1k", _RESIDUAL_NOTE),
    "qing_resnet50_r2.*": _cfg("conv1"),
    "qing_convnext_tiny_r2.in12k_ft_in1k": _timm_cfg("stem.0", "convnext_tiny.in12k_ft_in1k", _RESIDUAL_NOTE),
    "qing_convnext_tiny_r2.fb_in1k": _timm_cfg("stem.0", "convnext_tiny.fb_in1k", _RESIDUAL_NOTE),
    "qing_convnext_tiny_r2.*": _cfg("stem.0"),
    "qing_efficientnet_b0_r2.ra_in1k": _timm_cfg("conv_stem", "efficientnet_b0.ra_in1k", _RESIDUAL_NOTE),
    "qing_efficientnet_b0_r2.*": _cfg("conv_stem"),
    "qing_test_r1.r160_in1k": _timm_cfg("conv1.0", "test_resnet.r160_in1k", _RESIDUAL_NOTE, **_TEST_INPUT),
    "qing_test_r1.*": _cfg("conv1.0", **_TEST_INPUT),
})  # fmt: skip

_DENSENET = dict(backbone="densenet121", backbone_final_act=False)


@register_model
def qing_densenet121_tr2(pretrained: bool = False, **kwargs: Any) -> CNNTransformer:
    """The original hybrid: DenseNet121 (no final ReLU), 512-d, 8 heads, MLP 1024, 2 post-norm blocks."""
    args = dict(_DENSENET, embed_dim=512, depth=2, num_heads=8, mlp_dim=1024, drop_rate=0.2)
    return _create_hybrid("qing_densenet121_tr2", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def qing_densenet121_tr4(pretrained: bool = False, **kwargs: Any) -> CNNTransformer:
    """DenseNet121 with four post-norm blocks (512-d, 8 heads, MLP 1024)."""
    args = dict(_DENSENET, embed_dim=512, depth=4, num_heads=8, mlp_dim=1024, drop_rate=0.2)
    return _create_hybrid("qing_densenet121_tr4", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def qing_resnet50_tr2(pretrained: bool = False, **kwargs: Any) -> CNNTransformer:
    """ResNet-50 tokens (2048-d), two post-norm blocks (512-d, 8 heads, MLP 1024)."""
    args = dict(backbone="resnet50", embed_dim=512, depth=2, num_heads=8, mlp_dim=1024, drop_rate=0.2)
    return _create_hybrid("qing_resnet50_tr2", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def qing_convnext_tiny_tr2(pretrained: bool = False, **kwargs: Any) -> CNNTransformer:
    """ConvNeXt-Tiny tokens (768-d), two post-norm blocks (512-d, 8 heads, MLP 1024)."""
    args = dict(backbone="convnext_tiny", embed_dim=512, depth=2, num_heads=8, mlp_dim=1024, drop_rate=0.2)
    return _create_hybrid("qing_convnext_tiny_tr2", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def qing_efficientnet_b0_tr2(pretrained: bool = False, **kwargs: Any) -> CNNTransformer:
    """EfficientNet-B0 tokens (1280-d), two post-norm blocks (512-d, 8 heads, MLP 1024)."""
    args = dict(backbone="efficientnet_b0", embed_dim=512, depth=2, num_heads=8, mlp_dim=1024, drop_rate=0.2)
    return _create_hybrid("qing_efficientnet_b0_tr2", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def qing_test_tr1(pretrained: bool = False, **kwargs: Any) -> CNNTransformer:
    """Tiny model for tests: timm's ``test_resnet`` backbone, one 64-d block."""
    args = dict(backbone="test_resnet", embed_dim=64, depth=1, num_heads=4, mlp_dim=128, drop_rate=0.1)
    return _create_hybrid("qing_test_tr1", pretrained=pretrained, **dict(args, **kwargs))


# ---- residual heads: start as the backbone's pooled classifier ------------------------------------

#: The residual design's regularization for small data: stochastic depth and token dropout in the encoder.
_RESIDUAL = dict(head_type="residual", drop_rate=0.2, drop_path_rate=0.1, token_drop_rate=0.1)
_R2 = dict(_RESIDUAL, embed_dim=512, depth=2, num_heads=8, mlp_dim=1024)


@register_model
def qing_densenet121_r2(pretrained: bool = False, **kwargs: Any) -> CNNTransformer:
    """DenseNet121 (with its final ReLU, as CheXNet) + a residual encoder gated closed at init: 2 blocks, 512-d."""
    args = dict(_R2, backbone="densenet121")
    return _create_hybrid("qing_densenet121_r2", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def qing_resnet50_r2(pretrained: bool = False, **kwargs: Any) -> CNNTransformer:
    """ResNet-50 + a residual encoder, gated closed at init: 2 post-norm blocks, 512-d."""
    args = dict(_R2, backbone="resnet50")
    return _create_hybrid("qing_resnet50_r2", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def qing_convnext_tiny_r2(pretrained: bool = False, **kwargs: Any) -> CNNTransformer:
    """ConvNeXt-Tiny + a residual encoder, gated closed at init: 2 post-norm blocks, 512-d."""
    args = dict(_R2, backbone="convnext_tiny")
    return _create_hybrid("qing_convnext_tiny_r2", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def qing_efficientnet_b0_r2(pretrained: bool = False, **kwargs: Any) -> CNNTransformer:
    """EfficientNet-B0 + a residual encoder, gated closed at init: 2 post-norm blocks, 512-d."""
    args = dict(_R2, backbone="efficientnet_b0")
    return _create_hybrid("qing_efficientnet_b0_r2", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def qing_test_r1(pretrained: bool = False, **kwargs: Any) -> CNNTransformer:
    """Tiny residual model for tests: timm's ``test_resnet`` backbone, one 64-d block behind the gate."""
    args = dict(_RESIDUAL, backbone="test_resnet", embed_dim=64, depth=1, num_heads=4, mlp_dim=128, drop_rate=0.1)
    return _create_hybrid("qing_test_r1", pretrained=pretrained, **dict(args, **kwargs))
