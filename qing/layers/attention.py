"""Multi-head self-attention that can also hand back its attention weights."""

import torch
from timm.layers import Attention as _TimmAttention

__all__ = ["Attention"]


class Attention(_TimmAttention):
    """timm's fused multi-head self-attention plus an explicit weights path.

    ``forward`` is timm's (``F.scaled_dot_product_attention`` when fused attention is
    enabled), so the normal path pays nothing for explainability. ``attention_weights``
    recomputes the query/key projections and returns ``softmax(Q K^T / sqrt(d))``.

    The ``qkv`` weight has the layout of ``nn.MultiheadAttention.in_proj_weight``
    (query, key, value rows stacked), and ``proj`` matches ``out_proj``.
    """

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of this layer.

        Args:
            x: Tokens, shape ``(B, N, C)``, exactly as passed to ``forward``.

        Returns:
            Weights of shape ``(B, num_heads, N, N)``; each row sums to one.
        """
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
