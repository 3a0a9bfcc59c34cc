"""The pooled-backbone classifier with a residual from the Transformer encoder that starts closed."""

from typing import Optional

import torch
from timm.layers import trunc_normal_
from torch import nn

__all__ = ["ResidualHead"]


class ResidualHead(nn.Module):
    """``logits = backbone_fc(pooled) + encoder_fc(encoded)`` on features ``[encoded (D) | pooled (F)]``.

    ``pooled`` is the global average of the backbone's feature map, so ``backbone_fc`` is the CNN's
    own linear classifier. ``encoder_fc`` is the gate of the encoder's branch: it starts at zero, so
    a fresh head computes exactly ``backbone_fc(pooled)``, and the encoder contributes only as far
    as training opens it (a "zero layer", as ControlNet attaches a new branch to a trained network).
    It has one entry per (output, encoder channel) rather than one scalar, so under Adam it opens at
    the pace the pooled classifier itself learns: a scalar gate moves at most about ``lr`` per step
    (about 0.03 over a few hundred steps at ``lr=1e-4``), which keeps the encoder shut for a whole
    fine-tuning run. ``encoder_fc`` has no bias (``backbone_fc``'s serves both).

    Args:
        encoder_dim: Width ``D`` of the encoder's pooled features (the first ``D`` inputs).
        backbone_dim: Width ``F`` of the pooled backbone features (the last ``F`` inputs).
        num_classes: Outputs.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
        self,
        encoder_dim: int,
        backbone_dim: int,
        num_classes: int,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.encoder_dim = encoder_dim
        self.in_features = encoder_dim + backbone_dim
        self.out_features = num_classes
        self.backbone_fc = nn.Linear(backbone_dim, num_classes, **dd)
        self.encoder_fc = nn.Linear(encoder_dim, num_classes, bias=False, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        """``backbone_fc``: truncated normal (std 0.02), zero bias; ``encoder_fc``: zero (the branch closed)."""
        if self.encoder_fc.weight.device.type == "meta":
            return
        trunc_normal_(self.backbone_fc.weight, std=0.02)
        nn.init.zeros_(self.backbone_fc.bias)
        nn.init.zeros_(self.encoder_fc.weight)

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two terms of the logits, ``(backbone_fc(pooled), encoder_fc(encoded))``, each ``(..., num_classes)``."""
        return self.backbone_fc(x[..., self.encoder_dim :]), self.encoder_fc(x[..., : self.encoder_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., D + F) -> (..., num_classes)``."""
        backbone, encoder = self.branches(x)
        return backbone + encoder

    def extra_repr(self) -> str:
        return f"encoder_dim={self.encoder_dim}, in_features={self.in_features}, out_features={self.out_features}"
