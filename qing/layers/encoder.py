"""Transformer encoder block with post-norm (the original design) or pre-norm."""

from functools import partial
from typing import Final

import torch
from timm.layers import DropPath, Mlp
from torch import nn

from qing.layers.attention import Attention

__all__ = ["NORM_PLACEMENTS", "EncoderBlock"]

NORM_PLACEMENTS = ("post", "pre")

#: The original design used ``nn.LayerNorm`` defaults (eps 1e-5); keep them for exact migration.
LayerNorm = partial(nn.LayerNorm, eps=1e-5)


class EncoderBlock(nn.Module):
    """Self-attention + GELU MLP block on batch-first tokens ``(B, N, C)``.

    ``norm="post"`` reproduces ``nn.TransformerEncoderLayer(norm_first=False)``::

        x = norm1(x + drop(attn(x)))
        x = norm2(x + drop(fc2(drop(gelu(fc1(x))))))

    ``norm="pre"`` is the ViT layout (``x = x + attn(norm1(x))`` ...). Dropout after the
    attention projection and in the MLP uses ``drop``; ``drop_path`` is stochastic depth on
    each residual branch (0 keeps the original behaviour).
    """

    pre_norm: Final[bool]

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        norm: str = "post",
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if norm not in NORM_PLACEMENTS:
            raise ValueError(f"norm={norm!r} is not supported; use one of {NORM_PLACEMENTS}.")
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}.")
        dd = {"device": device, "dtype": dtype}
        self.pre_norm = norm == "pre"
        self.norm1 = LayerNorm(dim, **dd)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, hidden_features=mlp_dim, act_layer=nn.GELU, drop=drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, N, C)``."""
        if self.pre_norm:
            x = x + self.drop_path1(self.attn(self.norm1(x)))
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        else:
            x = self.norm1(x + self.drop_path1(self.attn(x)))
            x = self.norm2(x + self.drop_path2(self.mlp(x)))
        return x

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities ``(B, heads, N, N)`` this block computes for input ``x``."""
        return self.attn.attention_weights(self.norm1(x) if self.pre_norm else x)
