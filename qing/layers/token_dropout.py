"""Token dropout: train on a random subset of the spatial tokens."""

from typing import Optional

import torch
from torch import nn

__all__ = ["TokenDropout"]


class TokenDropout(nn.Module):
    """Keep a random ``round((1 - prob) * N)`` of the ``N`` spatial tokens while training (at least one).

    The ``num_prefix_tokens`` leading tokens (the class token) are always kept, and the kept tokens
    stay in grid order. Position encodings must be added before, since the grid is gone after.
    In eval mode, or with ``prob=0``, every token passes and the indices are ``None``. A regularizer
    for small data (fewer, different tokens per step) that also saves encoder compute; compare
    timm's ``PatchDropout``, whose floor rounding drops 1 of 4 tokens at ``prob=0.1``.

    Args:
        prob: Fraction of spatial tokens to drop, in ``[0, 1)``.
        num_prefix_tokens: Leading tokens that are never dropped.
    """

    def __init__(self, prob: float = 0.0, *, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"token dropout probability must be in [0, 1), got {prob}")
        self.prob = float(prob)
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Tokens ``(B, P + N, C)`` -> ``((B, P + K, C), kept indices (B, K) into the N spatial tokens)``."""
        if not self.training or self.prob == 0.0:
            return x, None
        prefix, tokens = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        batch, length = tokens.shape[0], tokens.shape[1]
        num_keep = max(1, int(length * (1.0 - self.prob) + 0.5))  # nearest
        if num_keep >= length:
            return x, None
        keep = torch.sort(torch.rand(batch, length, device=x.device).argsort(dim=1)[:, :num_keep], dim=1)[0]
        kept = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return torch.cat([prefix, kept], dim=1), keep

    def extra_repr(self) -> str:
        return f"prob={self.prob}, num_prefix_tokens={self.num_prefix_tokens}"
