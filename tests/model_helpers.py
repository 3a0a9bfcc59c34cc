"""Shared pieces of the model and weight tests."""

from __future__ import annotations

import re

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


def legacy_chexnet_state_dict(model: nn.Module, *, batches_tracked: bool = False) -> dict:
    """torchvision DenseNet121 weights in CheXNet's layout: ``module.densenet121.`` prefix, ``norm.1`` names.

    ``num_batches_tracked`` is left out, as in CheXNet's file, unless ``batches_tracked``.
    """
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and not batches_tracked:
            continue
        key = re.sub(r"(denselayer\d+\.)(norm|relu|conv)([12])\.", r"\1\2.\3.", key)
        out[f"module.densenet121.{key}"] = value.clone()
    return out
