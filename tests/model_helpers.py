"""Shared pieces of the model and weight tests."""

from __future__ import annotations

from torch import nn


def randomize_batchnorm(model: nn.Module, *, affine: bool = True) -> nn.Module:
    """Non-trivial BatchNorm statistics (and affine parameters), so eval-mode comparisons test them too."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            if affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return model
