"""What qing keeps with a model beyond timm's ``pretrained_cfg``: task, calibration, thresholds, evaluation.

timm's ``PretrainedCfg`` describes weights and preprocessing and rejects unknown fields, so
qing's own facts live in ``model.qing_meta`` (a :class:`ModelMeta`) and in the ``"qing"`` key
of a saved ``config.json``. ``predict`` and ``eval`` divide the logits by ``temperatures`` and apply
``thresholds`` to the resulting probabilities; the model card shows ``metrics``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

__all__ = [
    "TASKS",
    "ModelMeta",
    "default_label_names",
    "get_meta",
    "model_labels",
    "model_task",
    "set_meta",
    "sync_head",
]

#: ``binary``: one logit, sigmoid. ``multilabel``: one sigmoid per label. ``multiclass``: softmax.
TASKS = ("binary", "multilabel", "multiclass")


@dataclass
class ModelMeta:
    """qing metadata of a model.

    Attributes:
        task: One of ``TASKS``, or ``None`` when unknown (inferred from ``num_classes``).
        thresholds: Decision threshold per output on the probability scale, chosen on
            validation data; ``None`` means 0.5 (sigmoid tasks) or argmax (multiclass). With
            ``temperatures`` they apply to the calibrated probabilities (see :meth:`uncalibrated`).
        temperatures: Temperature scaling, one positive value per output, fitted on validation data:
            probabilities are ``sigmoid(logits / T)`` (softmax of ``logits / T`` for multiclass, where
            all outputs share one value). ``None``: no calibration (``T = 1``).
        threshold_method: How the thresholds were chosen, e.g. ``"youden"`` or ``"sensitivity@0.90"``.
        metrics: Evaluation summary (e.g. test AUROC) for the model card.
        datasets: Names of the datasets the weights were trained on.
        negative_label: Binary task only: the name of the negative class (e.g. ``"NORMAL"``); the
            single output's label names the positive one.
    """

    task: Optional[str] = None
    thresholds: Optional[list[float]] = None
    temperatures: Optional[list[float]] = None
    threshold_method: Optional[str] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    negative_label: Optional[str] = None

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is not one of {TASKS}")
        if self.thresholds is not None:
            self.thresholds = [float(t) for t in self.thresholds]
            bad = [t for t in self.thresholds if not 0.0 <= t <= 1.0]
            if bad:
                raise ValueError(f"thresholds are probabilities in [0, 1], got {bad}")
        if self.temperatures is not None:
            self.temperatures = [float(t) for t in self.temperatures]
            bad = [t for t in self.temperatures if not (math.isfinite(t) and t > 0.0)]
            if bad or not self.temperatures:
                raise ValueError(f"temperatures are finite numbers > 0, one per output; got {self.temperatures}")
            if self.thresholds is not None and len(self.thresholds) != len(self.temperatures):
                raise ValueError(f"{len(self.temperatures)} temperatures for {len(self.thresholds)} thresholds")

    def uncalibrated(self) -> ModelMeta:
        """This metadata without temperature scaling, deciding exactly as before.

        A per-output temperature is a monotone change of the probability, so a threshold ``t`` on the
        calibrated probability ``sigmoid(z / T)`` is the threshold ``sigmoid(T * logit(t))`` on the plain
        ``sigmoid(z)``: the returned thresholds are those, and every decision stays the same
        (multiclass argmax decisions do not depend on one shared temperature).

        Returns:
            A copy with ``temperatures=None`` and thresholds on the uncalibrated probability scale.
        """
        if self.temperatures is None:
            return dataclasses.replace(self)
        thresholds = self.thresholds
        if thresholds is not None:
            thresholds = [_rescale_threshold(t, temp) for t, temp in zip(thresholds, self.temperatures)]
        return dataclasses.replace(self, temperatures=None, thresholds=thresholds)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict without empty entries."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, [], {})}

    @classmethod
    def from_dict(cls, data: Optional[dict[str, Any]]) -> ModelMeta:
        """Inverse of ``to_dict``; unknown keys are an error (a newer qing wrote them)."""
        data = dict(data or {})
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown qing metadata keys {sorted(unknown)}; upgrade qing")
        return cls(**data)


def _rescale_threshold(threshold: float, temperature: float) -> float:
    """``sigmoid(T * logit(t))``: the plain-probability threshold equal to ``t`` on ``sigmoid(z / T)``."""
    if threshold <= 0.0 or threshold >= 1.0:
        return threshold
    z = temperature * math.log(threshold / (1.0 - threshold))
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def get_meta(model: nn.Module) -> ModelMeta:
    """The model's :class:`ModelMeta` (an empty one if none was set)."""
    meta = getattr(model, "qing_meta", None)
    return meta if isinstance(meta, ModelMeta) else ModelMeta()


def set_meta(model: nn.Module, **updates: Any) -> ModelMeta:
    """Update fields of the model's metadata and return it.

    Args:
        model: The model; its ``qing_meta`` is replaced.
        **updates: :class:`ModelMeta` fields. ``temperatures`` needs one entry per output
            (``model.num_classes``); ``thresholds`` takes one probability per output or a single
            number for every output; new thresholds without a
            ``threshold_method`` clear the old method's name (it described the old thresholds).

    Returns:
        The new :class:`ModelMeta`.

    Example:
        >>> import qing
        >>> model = qing.create_model("qing_test_tr1", num_classes=3)
        >>> qing.set_meta(model, thresholds=0.3).thresholds
        [0.3, 0.3, 0.3]
    """
    unknown = sorted(set(updates) - {f.name for f in dataclasses.fields(ModelMeta)})
    if unknown:
        raise TypeError(f"unknown qing metadata field(s) {unknown}; expected some of {list(_FIELDS)}")
    num_classes = getattr(model, "num_classes", None)
    thresholds = updates.get("thresholds")
    if isinstance(thresholds, numbers.Real) and not isinstance(thresholds, bool):
        if not num_classes:
            raise ValueError(f"a single threshold {thresholds} needs a model with outputs (num_classes={num_classes})")
        updates["thresholds"] = [float(thresholds)] * int(num_classes)
    elif thresholds is not None and not isinstance(thresholds, Sequence) and not hasattr(thresholds, "tolist"):
        raise TypeError(f"thresholds must be a number or one number per output, got {type(thresholds).__name__}")
    elif hasattr(thresholds, "tolist"):
        updates["thresholds"] = thresholds.tolist()
    if "thresholds" in updates and "threshold_method" not in updates:
        updates["threshold_method"] = None
    meta = dataclasses.replace(get_meta(model), **updates)
    for name in ("thresholds", "temperatures"):
        values = getattr(meta, name)
        if values is not None and num_classes and len(values) != num_classes:
            raise ValueError(f"{len(values)} {name} for a model with {num_classes} outputs")
    model.qing_meta = meta
    return meta


_FIELDS = tuple(f.name for f in dataclasses.fields(ModelMeta))


def default_label_names(num_classes: int) -> tuple[str, ...]:
    """``("class_0", "class_1", ...)``: the names of outputs nobody named (as timm and transformers do)."""
    return tuple(f"class_{i}" for i in range(num_classes))


def sync_head(model: nn.Module) -> None:
    """Keep ``pretrained_cfg`` and ``qing_meta`` in step with the model's classifier.

    Sets ``pretrained_cfg["num_classes"]`` to ``model.num_classes``; label names that do not number one per
    output become :func:`default_label_names` (none for ``num_classes=0``); thresholds (and the metrics
    and method that described them) and temperatures of another output count are dropped. Called after building a model
    and by ``reset_classifier``.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or not hasattr(model, "num_classes"):  # e.g. a features_only wrapper
        return
    num_classes = int(model.num_classes or 0)
    cfg["num_classes"] = num_classes
    names = cfg.get("label_names")
    if not num_classes:
        cfg["label_names"] = None
    elif names is None or len(names) != num_classes:
        cfg["label_names"] = default_label_names(num_classes)
    meta = getattr(model, "qing_meta", None)
    if not isinstance(meta, ModelMeta):
        return
    if meta.thresholds is not None and len(meta.thresholds) != num_classes:
        meta = dataclasses.replace(meta, thresholds=None, threshold_method=None, metrics={})
    if meta.temperatures is not None and len(meta.temperatures) != num_classes:
        meta = dataclasses.replace(meta, temperatures=None)
    model.qing_meta = meta


def model_labels(model: nn.Module) -> list[str]:
    """One name per output: the pretrained cfg's ``label_names``, :func:`default_label_names` where missing."""
    num_classes = int(getattr(model, "num_classes", 0))
    names = list(getattr(model, "pretrained_cfg", {}).get("label_names") or ())
    if len(names) != num_classes:
        names = [""] * num_classes
    defaults = default_label_names(num_classes)
    return [str(name) if name else defaults[i] for i, name in enumerate(names)]


def model_task(model: nn.Module) -> str:
    """The model's task: its metadata's, else ``binary`` for one output and ``multilabel`` for more."""
    return get_meta(model).task or ("binary" if int(getattr(model, "num_classes", 0)) == 1 else "multilabel")
