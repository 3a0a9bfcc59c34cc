"""Optimizer (timm's ``create_optimizer_v2``) with backbone/encoder/head learning rates, and LR schedules."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

__all__ = ["LRSchedule", "build_optimizer", "param_groups", "split_backbone", "split_parts"]


def split_backbone(model: nn.Module) -> tuple[set[str], set[str]]:
    """Parameter names of the backbone and of the rest (the "head": tokens, encoder, classifier).

    qing models have ``model.backbone``; for other timm models everything except
    ``get_classifier()`` counts as backbone.
    """
    names = {name for name, _ in model.named_parameters()}
    if hasattr(model, "backbone") and isinstance(model.backbone, nn.Module):
        backbone = {f"backbone.{name}" for name, _ in model.backbone.named_parameters()}
    else:
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        head_ids = {id(p) for p in classifier.parameters()} if isinstance(classifier, nn.Module) else set()
        backbone = {name for name, p in model.named_parameters() if id(p) not in head_ids}
    return backbone, names - backbone


def split_parts(model: nn.Module) -> dict[str, set[str]]:
    """Parameter names by part: ``backbone``, ``encoder`` and ``head``.

    ``backbone`` as :func:`split_backbone`; ``head`` is the classifier (``get_classifier()``: the
    final ``Linear`` of a qing hybrid, or its :class:`~qing.layers.GatedResidualHead`); ``encoder``
    is everything in between (token projection, class token, positions, blocks, the encoder's head
    MLP). Models without a ``backbone`` attribute have no encoder part.
    """
    backbone, rest = split_backbone(model)
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in classifier.parameters()} if isinstance(classifier, nn.Module) else set()
    head = {name for name, p in model.named_parameters() if name in rest and id(p) in head_ids}
    return {"backbone": backbone, "encoder": rest - head, "head": head}


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    backbone_lr: Optional[float],
    weight_decay: float,
    encoder_lr: Optional[float] = None,
    encoder_weight_decay: Optional[float] = None,
) -> list[dict[str, Any]]:
    """Trainable parameters in groups by part (backbone, encoder, head) x decay/no decay.

    Biases, norm weights (1-D parameters) and ``model.no_weight_decay()`` names get no weight
    decay. Frozen parameters are left out. Each group has a ``name`` for logging. The encoder
    (see :func:`split_parts`) gets groups of its own only when ``encoder_lr`` or
    ``encoder_weight_decay`` is set; otherwise it shares the head's groups (``lr``, ``weight_decay``).

    Args:
        model: The model.
        lr: Learning rate of the head (and of the encoder unless ``encoder_lr``).
        backbone_lr: Learning rate of the backbone; ``None``: ``lr``.
        weight_decay: Weight decay of the decayed parameters.
        encoder_lr: Learning rate of the encoder; ``None``: ``lr``.
        encoder_weight_decay: Weight decay of the encoder's decayed parameters; ``None``: ``weight_decay``.

    Returns:
        ``[{"name", "params", "lr", "weight_decay"}, ...]``, sorted by name.
    """
    parts = split_parts(model)
    own_encoder = encoder_lr is not None or encoder_weight_decay is not None
    part_of = {name: part for part, names in parts.items() for name in names}
    if not own_encoder:
        part_of = {name: "head" if part == "encoder" else part for name, part in part_of.items()}
    part_lr = {
        "backbone": lr if backbone_lr is None else backbone_lr,
        "encoder": lr if encoder_lr is None else encoder_lr,
    }
    part_decay = {"encoder": weight_decay if encoder_weight_decay is None else encoder_weight_decay}
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and name not in skip
        groups.setdefault((part_of[name], decay), []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    out = []
    for (part, decay), params in sorted(groups.items()):
        out.append({
            "name": f"{part}{'' if decay else '_no_decay'}",
            "params": params,
            "lr": part_lr.get(part, lr),
            "weight_decay": part_decay.get(part, weight_decay) if decay else 0.0,
        })  # fmt: skip
    return out


def build_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    backbone_lr: Optional[float] = None,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    encoder_lr: Optional[float] = None,
    encoder_weight_decay: Optional[float] = None,
) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2`` over :func:`param_groups` (separate backbone and encoder settings)."""
    groups = param_groups(
        model,
        lr=lr,
        backbone_lr=backbone_lr,
        weight_decay=weight_decay,
        encoder_lr=encoder_lr,
        encoder_weight_decay=encoder_weight_decay,
    )
    return create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=weight_decay, momentum=momentum)


class LRSchedule:
    """One interface over the two schedules.

    * ``"cosine"``: timm's ``CosineLRScheduler`` stepped every update, linear warmup from
      ``min_lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``.
      Each parameter group keeps its own base LR (backbone vs head).
    * ``"plateau"``: ``torch.optim.lr_scheduler.ReduceLROnPlateau`` on the validation loss,
      stepped once per epoch (the original recipe).
    * ``"none"``: constant.

    Args:
        optimizer: The optimizer.
        kind: ``"cosine"``, ``"plateau"`` or ``"none"``.
        total_steps: Optimizer updates in the whole run (cosine).
        warmup_steps: Warmup updates (cosine).
        min_lr: Lowest LR.
        plateau_factor: LR multiplier on a plateau.
        plateau_patience: Epochs without improvement before a drop.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        kind: str,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        plateau_factor: float = 0.2,
        plateau_patience: int = 3,
    ) -> None:
        self.kind = kind
        self.scheduler: Union[CosineLRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau, None] = None
        if kind == "cosine":
            self.scheduler = CosineLRScheduler(
                optimizer,
                t_initial=max(1, total_steps),
                lr_min=min_lr,
                warmup_t=warmup_steps,
                warmup_lr_init=min_lr,
                t_in_epochs=False,
            )
        elif kind == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=plateau_factor, patience=plateau_patience, min_lr=min_lr
            )
        elif kind != "none":
            raise ValueError(f"unknown scheduler {kind!r}; use cosine, plateau or none")

    def step_update(self, num_updates: int) -> None:
        """After optimizer update number ``num_updates`` (cosine only)."""
        if isinstance(self.scheduler, CosineLRScheduler):
            self.scheduler.step_update(num_updates)

    def step_epoch(self, val_loss: float) -> None:
        """After an epoch's validation (plateau only)."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"validation loss is {val_loss}; cannot step the plateau scheduler")
            self.scheduler.step(val_loss)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (plus nothing for ``none``)."""
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)
