"""Adapter for checkpoints of the original single-script CNN-Transformer hybrid.

The original module's state dict (``../shared/DESIGN.md`` item 8) holds the DenseNet twice
(``base_model.*`` with its ImageNet classifier, and ``cnn_features.*``), a saved sinusoidal
buffer, sequence-first ``nn.MultiheadAttention`` weights and a ``classifier.{0,3}`` head.
``convert_original_hybrid`` maps it onto ``qing_densenet121_tr2`` so that
``sigmoid(qing logits)`` equals the original output.

Migrating a trained model (the original script saved ``torch.save(model.state_dict(), path)``)::

    import qing
    from qing.convert import load_original_hybrid_file

    converted = load_original_hybrid_file("best_model.pth")  # label_names=["PNEUMONIA"] by default
    model = converted.create_model().eval()   # qing_densenet121_tr2, the original preprocessing
    qing.save_pretrained(model, "my-model")    # safetensors + config.json from now on

``converted.pretrained_cfg`` records the original preprocessing (``Resize((224, 224))`` squash,
bilinear, ``mean=(0.485,) * 3``, ``std=(0.229,) * 3``) and the label names, so
``timm.data.resolve_data_config(model=model)`` rebuilds the exact input pipeline.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

from qing.layers.pos_embed import sincos_table
from qing.weights.files import strip_prefixes

__all__ = [
    "ORIGINAL_LABEL_NAMES",
    "ORIGINAL_PREPROCESSING",
    "convert_original_hybrid",
    "is_original_hybrid",
    "original_label_names",
]

#: Label of the original binary (normal vs pneumonia) model's single output.
ORIGINAL_LABEL_NAMES = ("PNEUMONIA",)

#: The original script's transform (``Resize((224, 224))``, ``ToTensor``, ``Normalize``) as pretrained-cfg entries.
ORIGINAL_PREPROCESSING = {
    "input_size": (3, 224, 224),
    "crop_pct": 1.0,
    "crop_mode": "squash",
    "interpolation": "bilinear",
    "mean": (0.485, 0.485, 0.485),
    "std": (0.229, 0.229, 0.229),
}

_logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^transformer_encoder\.layers\.(\d+)\.(.+)$")
_LAYER_RENAMES = {
    "self_attn.in_proj_weight": "attn.qkv.weight",
    "self_attn.in_proj_bias": "attn.qkv.bias",
    "self_attn.out_proj.weight": "attn.proj.weight",
    "self_attn.out_proj.bias": "attn.proj.bias",
    "linear1.weight": "mlp.fc1.weight",
    "linear1.bias": "mlp.fc1.bias",
    "linear2.weight": "mlp.fc2.weight",
    "linear2.bias": "mlp.fc2.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
}
_DIRECT = {
    "class_token": "cls_token",
    "feature_projection.0.weight": "token_proj.0.weight",
    "feature_projection.0.bias": "token_proj.0.bias",
    "feature_projection.1.weight": "token_proj.1.weight",
    "feature_projection.1.bias": "token_proj.1.bias",
    "classifier.0.weight": "pre_logits.0.weight",
    "classifier.0.bias": "pre_logits.0.bias",
    "classifier.3.weight": "head.weight",
    "classifier.3.bias": "head.bias",
}


def is_original_hybrid(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` has the original hybrid's key layout."""
    return (
        "class_token" in state_dict
        and "feature_projection.0.weight" in state_dict
        and any(k.startswith("transformer_encoder.layers.") for k in state_dict)
    )


def convert_original_hybrid(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Map an original-hybrid state dict to ``qing_densenet121_tr2`` keys.

    Args:
        state_dict: The original module's ``state_dict()`` (``module.``/``_orig_mod.`` prefixes are removed).

    Returns:
        ``(qing_state_dict, model_kwargs)``: kwargs (``num_classes``, ``embed_dim``, ``depth``,
        ``mlp_dim``) read from the tensor shapes. ``num_heads`` is not stored in the weights;
        the original used 8.

    Raises:
        ValueError: Keys of another layout, a missing tensor, or a position buffer that is not the
            standard sinusoidal table (the conversion would change predictions).
    """
    sd = strip_prefixes(state_dict)
    if not is_original_hybrid(sd):
        raise ValueError(
            "not an original-hybrid checkpoint: expected keys class_token, feature_projection.0.weight "
            "and transformer_encoder.layers.*"
        )
    out: dict[str, torch.Tensor] = {}
    unused = []
    for key, value in sd.items():
        if key.startswith("cnn_features."):
            out["backbone.features." + key.removeprefix("cnn_features.")] = value
        elif key in _DIRECT:
            out[_DIRECT[key]] = value
        elif (m := _LAYER.match(key)) and m.group(2) in _LAYER_RENAMES:
            out[f"blocks.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}"] = value
        elif key.startswith("base_model.") or key == "transformer_encoder.pos_encoder.pe":
            continue  # duplicate DenseNet / unused ImageNet classifier / derived buffer, checked below
        else:
            unused.append(key)
    if unused:
        raise ValueError(f"unexpected keys in original-hybrid checkpoint: {unused[:10]}")
    if not any(k.startswith("backbone.features.") for k in out):  # only base_model.* was saved
        for key, value in sd.items():
            if key.startswith("base_model.features."):
                out["backbone." + key.removeprefix("base_model.")] = value

    embed_dim = out["cls_token"].shape[-1]
    pe = sd.get("transformer_encoder.pos_encoder.pe")
    if pe is not None:
        expected = sincos_table(pe.shape[0], embed_dim)
        if pe.reshape(pe.shape[0], -1).shape != expected.shape or not torch.allclose(
            pe.reshape(pe.shape[0], -1).float(), expected, atol=1e-5
        ):
            raise ValueError("transformer_encoder.pos_encoder.pe is not the standard sinusoidal table")
    depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
    kwargs = dict(
        num_classes=out["head.weight"].shape[0],
        embed_dim=embed_dim,
        depth=depth,
        mlp_dim=out["blocks.0.mlp.fc1.weight"].shape[0],
    )
    return out, kwargs


def original_label_names(num_classes: int, label_names: Optional[Sequence[str]] = None) -> tuple[str, ...]:
    """Label names of a converted original model: given, ``("PNEUMONIA",)`` for one output, else ``class_<i>``.

    Raises:
        ValueError: ``label_names`` of the wrong length.
    """
    if label_names is not None:
        if len(label_names) != num_classes:
            raise ValueError(f"{len(label_names)} label_names for a checkpoint with {num_classes} outputs")
        return tuple(str(n) for n in label_names)
    if num_classes == 1:
        return ORIGINAL_LABEL_NAMES
    _logger.warning("original checkpoint with %d outputs and no label_names: naming them class_0..", num_classes)
    return tuple(f"class_{i}" for i in range(num_classes))
