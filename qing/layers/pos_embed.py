"""Position encodings for a class token followed by a grid of feature-map tokens."""

import math

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import nn

__all__ = ["POS_EMBED_TYPES", "LearnedPosEmbed", "SinCosPosEmbed", "sincos_table"]

POS_EMBED_TYPES = ("sincos", "learned")


def sincos_table(length: int, dim: int, *, base: float = 10000.0, device=None) -> torch.Tensor:
    """The original fixed 1-D sinusoidal table: sin on even channels, cos on odd.

    Args:
        length: Number of positions.
        dim: Channels (even).
        base: Wavelength base (10000 in the original design).

    Returns:
        Float32 tensor ``(length, dim)``; row ``p`` encodes position ``p``.
    """
    if dim % 2:
        raise ValueError(f"sincos position encoding needs an even embed_dim, got {dim}.")
    position = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=device).float() * (-math.log(base) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


class SinCosPosEmbed(nn.Module):
    """Adds the fixed sinusoidal encoding; position 0 is the class token.

    The table is a non-persistent buffer (it is derived, never saved), ``max_len`` long as in
    the original design, so any token grid up to ``max_len - 1`` tokens works unchanged.
    """

    def __init__(self, dim: int, *, max_len: int = 5000, device=None, dtype=None) -> None:
        super().__init__()
        self.dim = dim
        self.max_len = max_len
        self.register_buffer("table", torch.empty(1, max_len, dim, device=device, dtype=dtype), persistent=False)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """(Re)compute the table, e.g. after creating the model on the ``meta`` device."""
        if self.table.device.type == "meta":
            return
        table = sincos_table(self.max_len, self.dim, device=self.table.device)
        self.table.copy_(table.unsqueeze(0).to(self.table.dtype))

    def forward(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """``x``: ``(B, 1 + grid_h * grid_w, C)`` -> same shape with positions added."""
        return x + self.table[:, : x.shape[1]].to(x.dtype)


class LearnedPosEmbed(nn.Module):
    """A learned embedding per token, resampled (bicubic) when the token grid changes."""

    def __init__(self, dim: int, grid_size: tuple[int, int], *, device=None, dtype=None) -> None:
        super().__init__()
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.pos_embed = nn.Parameter(
            torch.empty(1, 1 + self.grid_size[0] * self.grid_size[1], dim, device=device, dtype=dtype)
        )
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """``x``: ``(B, 1 + grid_h * grid_w, C)`` -> same shape with positions added."""
        pos = self.pos_embed
        if grid_h != self.grid_size[0] or grid_w != self.grid_size[1]:
            pos = resample_abs_pos_embed(pos, [grid_h, grid_w], old_size=list(self.grid_size), num_prefix_tokens=1)
        return x + pos
