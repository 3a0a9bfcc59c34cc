"""qing's model builder: timm's ``build_model_with_cfg`` with weights that are found, converted and checked.

Every qing entrypoint builds through :func:`build_model_with_weights`. With ``pretrained=True`` it

1. finds the weights of the pretrained cfg (tag) with :func:`qing.weights.locate_weights`, which
   fails with :class:`~qing.weights.WeightsNotFoundError` naming every place it looked and the
   ways to supply them; a tag with a URL is downloaded once into the qing weights directory
   (:func:`qing.weights.download_weights`) and checked against its integrity record on every load;
2. reads local files itself (safetensors or ``torch.load(weights_only=True)``, see
   :func:`qing.weights.read_checkpoint`; only files the caller named may be trusted with
   ``QING_TRUST_PICKLE``) and lets timm download Hub weights;
3. converts whatever format arrives in timm's ``pretrained_filter_fn`` (CheXNet, torchxrayvision,
   the original hybrid, a timm/torchvision backbone, qing's own; see :mod:`qing.weights.formats`),
   fills the tensors a backbone-only checkpoint does not have from the fresh initialization so
   timm's strict load passes, and replaces a classifier whose class count differs (a warning
   lists the dropped keys);
4. compares every tensor it meant to load with the model afterwards and raises if any is
   missing: never a silent random initialization;
5. keeps ``pretrained_cfg`` in step with the model: ``num_classes`` and one label name per output
   (``class_0``, ... where none fit), and, when the classifier was not loaded, no label names of the
   source weights and no thresholds, with one warning naming the randomly initialized parts.

The result is described by a :class:`LoadReport` on ``model.qing_load_report``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import urllib.error
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from huggingface_hub import errors
from timm.models import PretrainedCfg, build_model_with_cfg, resolve_pretrained_cfg
from torch import nn

from qing.meta import set_meta, sync_head
from qing.weights import (
    CheckpointError,
    Conversion,
    Converter,
    convert_for_densenet,
    convert_for_hybrid,
    detect_format,
    download_path,
    download_weights,
    locate_weights,
    not_found_error,
    read_checkpoint,
    split_sha256,
    summarize_keys,
    unwrap_state_dict,
    verify_integrity,
    weights_name,
)
from qing.weights.original import ORIGINAL_PREPROCESSING

__all__ = [
    "FOREIGN_FORMATS",
    "CheckpointFilter",
    "LoadReport",
    "build_model_with_weights",
    "check_model_kwargs",
    "check_pretrained_cfg_keys",
    "checkpoint_filter_fn",
    "convert_foreign_state_dict",
    "pretrained_cfg_dict",
]

_logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What ``pretrained=True`` loaded, kept on the model as ``model.qing_load_report``.

    Attributes:
        name: ``architecture.tag`` of the weights.
        source: Where they came from (file path, Hub repo, ``state dict``).
        format: Detected checkpoint format.
        loaded: Model keys taken from the checkpoint.
        filled: Model keys absent from the checkpoint, left at their initialization.
        dropped: Checkpoint classifier keys dropped because the class count differs.
        unused: Checkpoint keys with no place in the model.
        adapted: Keys timm adapted (first convolution to another ``in_chans``).
        thresholds: Decision thresholds found in the checkpoint.
    """

    name: str
    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    thresholds: Optional[list[float]] = None

    def __repr__(self) -> str:
        counts = ", ".join(
            f"{name}={len(getattr(self, name))}" for name in ("loaded", "filled", "dropped", "unused", "adapted")
        )
        thresholds = "" if self.thresholds is None else f", thresholds={len(self.thresholds)}"
        return f"LoadReport({self.name!r}, source={self.source!r}, format={self.format!r}, {counts}{thresholds})"


def _classifier_keys(model: nn.Module, target: Mapping[str, torch.Tensor]) -> list[str]:
    """Every tensor of the cfg's classifier module(s): a Linear's weight and bias, or a whole head module."""
    names = model.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return [k for k in target if k.startswith(tuple(f"{n}." for n in names))]


class CheckpointFilter:
    """timm ``pretrained_filter_fn``: convert, complete, record; then :meth:`verify` after the load."""

    def __init__(
        self, name: str, source: str, convert: Converter, weights: Optional[Mapping[str, torch.Tensor]] = None
    ) -> None:
        self.name, self.source, self.convert = name, source, convert
        self.weights = weights  # read by qing: used instead of the placeholder timm passes in
        self.model: Optional[nn.Module] = None
        self.expected: dict[str, torch.Tensor] = {}
        self.report: Optional[LoadReport] = None
        self.dropped_note = ""  # the classifier shapes that did not fit, for the builder's one warning

    def __call__(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """Convert ``state_dict`` for ``model``, check it fits, and complete it for a strict load."""
        if self.weights is not None:
            state_dict, self.weights = self.weights, None
        state_dict = unwrap_state_dict(state_dict, source=self.source)
        conversion = self.convert(state_dict, model)
        ckpt = dict(conversion.state_dict)
        target = model.state_dict()
        cfg = model.pretrained_cfg
        dropped = self._drop_mismatched_classifier(ckpt, target, model)
        first_conv = f"{cfg.get('first_conv')}.weight"
        in_chans_differ = getattr(model, "in_chans", cfg["input_size"][0]) != cfg["input_size"][0]
        self._check_fits(ckpt, model, conversion, state_dict, skip_shape=first_conv if in_chans_differ else None)

        loaded = [k for k in target if k in ckpt]
        filled = [k for k in target if k not in ckpt]
        adapted = [k for k in (first_conv,) if k in ckpt and in_chans_differ and ckpt[k].shape != target[k].shape]
        self.model = model
        self.expected = {k: ckpt[k] for k in loaded if k not in adapted}
        self.report = LoadReport(
            name=self.name,
            source=self.source,
            format=conversion.format,
            loaded=loaded,
            filled=filled,
            dropped=dropped,
            unused=list(conversion.unused) + [k for k in ckpt if k not in target],
            adapted=adapted,
            thresholds=conversion.thresholds,
        )
        return {**{k: ckpt[k] for k in loaded}, **{k: target[k] for k in filled}}

    def _drop_mismatched_classifier(
        self, ckpt: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], model: nn.Module
    ) -> list[str]:
        """Remove a classifier whose class count differs (warning with the keys); else sync the cfg's count."""
        head = _classifier_keys(model, target)
        if not any(k in ckpt and ckpt[k].shape != target[k].shape for k in head):
            if head and all(k in ckpt for k in head):
                # the cfg describes the loaded weights (and keeps timm from dropping a classifier that fits)
                model.pretrained_cfg["num_classes"] = getattr(model, "num_classes", model.pretrained_cfg["num_classes"])
            return []
        dropped = [k for k in head if k in ckpt]
        shapes = "; ".join(
            f"{k} {tuple(ckpt[k].shape)} vs model {tuple(target[k].shape)}" for k in dropped if k in target
        )
        self.dropped_note = (
            f"the checkpoint's classifier does not fit the model's {getattr(model, 'num_classes', '?')} outputs "
            f"({shapes}): dropped {', '.join(dropped)}"
        )
        for key in dropped:
            del ckpt[key]
        return dropped

    def _check_fits(
        self,
        ckpt: Mapping[str, torch.Tensor],
        model: nn.Module,
        conversion: Conversion,
        original: Mapping[str, torch.Tensor],
        skip_shape: Optional[str],
    ) -> None:
        """Raise unless every required tensor is there with the model's shape (``skip_shape``: adaptable)."""
        target = model.state_dict()
        head = set(_classifier_keys(model, target))
        required = [
            k
            for k in target
            if k.startswith(conversion.required_prefix) and k not in head and not k.endswith("num_batches_tracked")
        ]
        missing = [k for k in required if k not in ckpt]
        if missing:
            found = ", ".join([k for k in original if not k.endswith("num_batches_tracked")][:4])
            raise CheckpointError(
                f"{self.source} ({conversion.format} format) does not fit {self.name}: {len(missing)} of "
                f"{len(required)} {'backbone ' if conversion.required_prefix else ''}tensors are missing "
                f"(e.g. {', '.join(missing[:4])}); the checkpoint has keys like {found}. "
                "Is it a checkpoint for another architecture?"
            )
        mismatched = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
            for k, v in ckpt.items()
            if k in target and v.shape != target[k].shape and k != skip_shape
        ]
        if mismatched:
            raise CheckpointError(
                f"{self.source} ({conversion.format} format) does not fit {self.name}: shape mismatch in "
                f"{len(mismatched)} tensors: {'; '.join(mismatched[:4])}. "
                "Build the model with the checkpoint's arguments (embed_dim, depth, mlp_dim, in_chans, ...)."
            )

    def verify(self) -> LoadReport:
        """Raise unless every tensor meant to load is in the model; log what happened."""
        if self.report is None or self.model is None:
            raise RuntimeError(f"{self.name}: pretrained weights were requested but timm never loaded a checkpoint")
        actual = self.model.state_dict()
        differ = [
            k
            for k, v in self.expected.items()
            if k in actual
            and actual[k].device.type != "meta"
            and not torch.equal(actual[k], v.to(device=actual[k].device, dtype=actual[k].dtype))
        ]
        self.expected = {}
        if differ:
            raise RuntimeError(
                f"{self.name}: {len(differ)} pretrained tensors did not load from {self.source} "
                f"(e.g. {', '.join(differ[:4])}); refusing to return a partly random model"
            )
        report = self.report
        message = f"{report.name}: loaded {report.format} weights from {report.source}: {len(report.loaded)} tensors"
        fresh = [k for k in report.filled if not k.endswith("num_batches_tracked")]
        if fresh:
            message += f"; initialized (not in the checkpoint): {summarize_keys(fresh)}"
        if report.unused:
            message += f"; unused checkpoint tensors: {summarize_keys(report.unused)}"
        if report.adapted:
            message += f"; adapted to in_chans: {', '.join(report.adapted)}"
        _logger.info(message)
        return report


# ---- building ----------------------------------------------------------------------------------


def _hub_errors() -> tuple[type[BaseException], ...]:
    return (
        errors.LocalEntryNotFoundError,
        errors.EntryNotFoundError,
        errors.RepositoryNotFoundError,
        errors.RevisionNotFoundError,
        errors.OfflineModeIsEnabled,
        errors.HfHubHTTPError,
        ConnectionError,
        urllib.error.URLError,
    )


_CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(PretrainedCfg))
_SOURCE_LOCATIONS = ("file", "url", "state_dict")


def check_pretrained_cfg_keys(
    variant: str, pretrained_cfg: Any = None, overlay: Optional[Mapping[str, Any]] = None
) -> None:
    """Raise ``TypeError`` naming the unknown key and the valid ones (timm's own error names neither clearly).

    Args:
        variant: Architecture name, for the message.
        pretrained_cfg: A dict (or ``PretrainedCfg``, tag name) given as ``pretrained_cfg``.
        overlay: ``pretrained_cfg_overlay``.
    """
    for what, given in (("pretrained_cfg", pretrained_cfg), ("pretrained_cfg_overlay", overlay)):
        if not isinstance(given, Mapping):
            continue
        unknown = sorted(set(given) - _CFG_FIELDS)
        if unknown:
            raise TypeError(
                f"{variant}: unknown {what} key(s) {', '.join(map(repr, unknown))}; timm's PretrainedCfg has "
                f"{', '.join(sorted(_CFG_FIELDS))}. Model arguments such as num_classes or in_chans go to "
                "create_model itself; qing's own metadata (task, thresholds) goes through qing.set_meta"
            )


def _without_source_locations(pretrained_cfg: Any, overlay: Mapping[str, Any], variant: str) -> Any:
    """For ``hf-hub:``/``local-dir:`` configs: drop the ``file``/``url``/``state_dict`` the repo's config.json set.

    timm fills ``source`` (and, for ``local-dir:``, ``file``: the folder) itself; anything else that
    points at weights came from a downloaded file and must not choose what is read from the local disk.
    """
    if not isinstance(pretrained_cfg, Mapping) or pretrained_cfg.get("source") not in ("hf-hub", "local-dir"):
        return pretrained_cfg
    keys = ("url", "state_dict") if pretrained_cfg["source"] == "local-dir" else _SOURCE_LOCATIONS
    removed = [k for k in keys if pretrained_cfg.get(k) is not None and k not in overlay]
    if not removed:
        return pretrained_cfg
    where = pretrained_cfg.get("hf_hub_id") or pretrained_cfg.get("file") or variant
    _logger.warning(
        "%s: ignored %s from the config.json of %s: a repo's config may not choose which local file or URL is "
        "read; the weights come from the repo itself",
        variant,
        ", ".join(removed),
        where,
    )
    return {k: v for k, v in pretrained_cfg.items() if k not in removed}


def _head_loaded(model: nn.Module, report: LoadReport) -> bool:
    """Whether the classifier computes what the checkpoint's did: every tensor loaded, or a zero-initialized gate.

    A residual head's ``encoder_fc`` starts at zero by design (``qing.layers.ResidualHead``): filled with
    zeros it adds nothing, so a loaded pooled classifier alone decides the outputs.
    """
    state = model.state_dict()
    head = _classifier_keys(model, state)
    loaded = set(report.loaded)
    return bool(head) and any(k in loaded for k in head) and all(k in loaded or not state[k].any() for k in head)


def _finish_head(
    model: nn.Module, report: LoadReport, name: str, dropped_note: str, thresholds: Any, task: Any
) -> None:
    """Label names, thresholds and task after a load; one warning when the classifier is random."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if not num_classes:  # a headless model or a features_only wrapper: no labels to keep in step
        sync_head(model)
        return
    cfg = model.pretrained_cfg
    if not _head_loaded(model, report):
        names = cfg.get("label_names")
        cfg["label_names"] = None  # they named the source weights' outputs, not this random head's
        sync_head(model)
        set_meta(model, thresholds=None)
        fresh = [k for k in report.filled if not k.endswith("num_batches_tracked")]
        parts = [f"randomly initialized (not in the checkpoint): {summarize_keys(fresh)}"]
        if dropped_note:
            parts.append(dropped_note)
        new = cfg["label_names"]
        shown = new[0] if len(new) == 1 else f"{new[0]}..{new[-1]}"
        named = f" (the source's {len(names)} label names do not apply)" if names else ""
        parts.append(f"label names: {shown}{named}; no thresholds: fine-tune the model before reading its predictions")
        _logger.warning("%s: %s", name, "; ".join(parts))
        return
    labels = cfg.get("label_names")
    if labels is not None and len(labels) != num_classes:
        defaults = "class_0" if num_classes == 1 else f"class_0..class_{num_classes - 1}"
        _logger.warning(
            "%s: the pretrained cfg's %d label_names do not match the loaded classifier's %d output(s); "
            "replaced them with %s (pass pretrained_cfg_overlay=dict(label_names=[...]))",
            name,
            len(labels),
            num_classes,
            defaults,
        )
        cfg["label_names"] = None
    sync_head(model)
    updates: dict[str, Any] = {}
    if task:
        updates["task"] = task
    if thresholds is not None and len(thresholds) == num_classes:
        updates["thresholds"] = list(thresholds)
    if updates:
        set_meta(model, **updates)


def _read_weights(kind: str, location: str, cfg: PretrainedCfg, explicit: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """Download (``url``), check integrity and read a weights file; returns ``(path, state dict)``."""
    pinned = None
    if kind == "url":
        _, pinned = split_sha256(location)
        path = download_path(cfg)
        if not path.is_file():
            download_weights(location, path)
        location = str(path)
    elif cfg.url and not explicit:
        _, pinned = split_sha256(str(cfg.url))
        pinned = pinned if Path(location) == download_path(cfg) else None
    verify_integrity(location, expected_sha256=pinned)
    # QING_TRUST_PICKLE reaches only files the caller named; registry and downloaded files are never trusted
    checkpoint = read_checkpoint(location, trust_pickle=None if explicit else False)
    return location, unwrap_state_dict(checkpoint, source=location)


def build_model_with_weights(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool,
    *,
    convert: Converter,
    feature_cfg: Optional[dict[str, Any]] = None,
    tag_thresholds: Optional[Mapping[str, Sequence[float]]] = None,
    task: Optional[str] = None,
    **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg`` with qing's weight lookup, conversion and load check.

    Args:
        model_cls: Model class (or factory).
        variant: Registered architecture name.
        pretrained: Load the weights of the pretrained cfg.
        convert: The family's converter, ``convert(state_dict, model) -> Conversion``.
        feature_cfg: timm feature-extraction config (``features_only``).
        tag_thresholds: Decision thresholds per tag, set as ``model.qing_meta.thresholds`` when the
            tag's classifier loads (torchxrayvision ``op_threshs``); thresholds in the checkpoint win.
        task: ``qing_meta.task`` to record when the checkpoint's classifier loads.
        **kwargs: Model arguments and timm build arguments (``pretrained_cfg``,
            ``pretrained_cfg_overlay``, ``cache_dir``, ``features_only``, ...).

    Returns:
        The model; with ``pretrained=True`` also ``model.qing_load_report`` (a :class:`LoadReport`).

    Raises:
        WeightsNotFoundError: The weights are not available (message: where qing looked, how to supply them).
        CheckpointError: The file is corrupt, needs untrusted unpickling, or belongs to another architecture.
        RuntimeError: Tensors that should have loaded did not.
    """
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    check_pretrained_cfg_keys(variant, pretrained_cfg, overlay)
    pretrained_cfg = _without_source_locations(pretrained_cfg, overlay, variant)
    if overlay.get("url") and not overlay.get("file"):  # the caller's URL replaces the tag's file and Hub repo
        overlay.setdefault("hf_hub_id", None)
        overlay["file"] = None
    if not pretrained:
        model = build_model_with_cfg(
            model_cls, variant, False, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay or None,
            feature_cfg=feature_cfg, **kwargs,
        )  # fmt: skip
        sync_head(model)
        return model

    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    name = weights_name(cfg, variant)
    cache_dir = kwargs.get("cache_dir")
    explicit = bool(overlay.get("file"))
    kind, location = locate_weights(cfg, variant=variant, cache_dir=cache_dir, explicit_file=explicit)
    weights: Optional[Mapping[str, torch.Tensor]] = None
    if kind in ("file", "url"):
        location, weights = _read_weights(kind, location, cfg, explicit)
        kind = "file"
        overlay["file"] = location
        source = location
    elif kind == "state_dict":
        weights = cfg.state_dict
        source = f"{location} (converted state dict)" if location else "a state dict"
    else:
        source = f"the Hugging Face Hub ({location})" if kind == "hf-hub" else location
    if weights is not None:
        # timm deep-copies pretrained cfgs (seconds for a state dict): hand it a placeholder, the filter swaps it
        overlay["state_dict"] = {"qing.weights_read_by_qing": torch.zeros(())}
        if isinstance(pretrained_cfg, Mapping):
            pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if k != "state_dict"}
        elif isinstance(pretrained_cfg, PretrainedCfg):
            pretrained_cfg = dataclasses.replace(pretrained_cfg, state_dict=None)

    filt = CheckpointFilter(name, source, convert, weights)
    try:
        model = build_model_with_cfg(
            model_cls, variant, True, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay,
            pretrained_filter_fn=filt, feature_cfg=feature_cfg, **kwargs,
        )  # fmt: skip
    except _hub_errors() as err:
        if cfg.source == "hf-hub":
            raise
        looked = [f"{source}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"]
        raise not_found_error(name, cfg, looked, cache_dir) from err
    report = filt.verify()
    model.pretrained_cfg.pop("state_dict", None)
    if report.format == "original_hybrid":
        _use_original_preprocessing(model, overlay, name)
    if kind == "file":
        model.pretrained_cfg["file"] = location
    model.qing_load_report = report
    thresholds = report.thresholds or (tag_thresholds or {}).get(cfg.tag or "")
    _finish_head(model, report, name, filt.dropped_note, thresholds, task)
    return model


def _use_original_preprocessing(model: nn.Module, overlay: Mapping[str, Any], name: str) -> None:
    """Original-hybrid weights were trained with the original transform: record it unless the caller chose one."""
    changed = {k: v for k, v in ORIGINAL_PREPROCESSING.items() if k not in overlay and model.pretrained_cfg.get(k) != v}
    if changed:
        model.pretrained_cfg.update(changed)
        _logger.warning(
            "%s: the weights are an original-hybrid checkpoint; preprocessing set to the original script's (%s)",
            name,
            ", ".join(f"{k}={v}" for k, v in changed.items()),
        )


def pretrained_cfg_dict(cfg: Union[PretrainedCfg, Mapping[str, Any]]) -> dict[str, Any]:
    """A pretrained cfg as a plain dict without in-memory weights or empty entries (no deep copy)."""
    if isinstance(cfg, PretrainedCfg):
        cfg = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return {k: v for k, v in cfg.items() if v is not None and k != "state_dict"}


def check_model_kwargs(model_cls: Callable[..., nn.Module], variant: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` naming the accepted arguments when ``kwargs`` holds one neither the model nor timm takes.

    Accepted: the parameters of ``model_cls`` and those timm's ``build_model_with_cfg`` reads
    (its own parameters and the feature-extraction keywords it takes out of ``**kwargs``).
    """
    check_pretrained_cfg_keys(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    accepted = set(inspect.signature(model_cls).parameters)
    unknown = sorted(set(kwargs) - accepted - _TIMM_BUILD_ARGS)
    if unknown:
        raise TypeError(f"{variant}: unknown argument(s) {', '.join(unknown)}; accepted: {', '.join(sorted(accepted))}")


# timm's builder: its parameters, plus the keywords it pops from **kwargs (features_only, out_indices,
# feature_cls: feature extraction; pruned: pruned variants). Read from timm, so a new timm argument passes.
_TIMM_BUILD_ARGS = frozenset(inspect.signature(build_model_with_cfg).parameters) - {"kwargs", "model_cls"} | {
    "features_only",
    "out_indices",
    "feature_cls",
    "pruned",
}


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm-style filter: convert ``state_dict`` for ``model`` and complete it for a strict load.

    Picks :func:`~qing.weights.convert_for_hybrid` for qing hybrids (models with a ``backbone``) and
    :func:`~qing.weights.convert_for_densenet` otherwise; keys the checkpoint lacks (a backbone-only
    checkpoint's encoder and head, a replaced classifier) are filled from ``model``'s current
    tensors, so ``model.load_state_dict(checkpoint_filter_fn(sd, model))`` loads strictly.

    Args:
        state_dict: Checkpoint weights in any format of :data:`qing.weights.FORMATS` (or a timm backbone's).
        model: The target model; it needs ``pretrained_cfg`` (every qing model has it).

    Returns:
        A complete state dict for ``model``.
    """
    convert = convert_for_hybrid if hasattr(model, "backbone") else convert_for_densenet
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    filt = CheckpointFilter(name, "checkpoint", convert)
    complete = filt(state_dict, model)
    if filt.dropped_note:
        _logger.warning("%s: %s; the classifier keeps the model's initialization", name, filt.dropped_note)
    return complete


#: Checkpoint formats that :func:`convert_foreign_state_dict` converts (qing's own layout loads as it is).
FOREIGN_FORMATS = ("chexnet", "original_hybrid", "xrv_densenet", "densenet121")


def convert_foreign_state_dict(state_dict: Mapping[str, Any], model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """A complete state dict for ``model`` when ``state_dict`` is a foreign format; ``None`` otherwise.

    What qing models' ``load_state_dict`` runs first. So ``model.load_state_dict`` of a CheXNet state dict
    (``torch.load("model.pth.tar", weights_only=True)["state_dict"]``) and ``timm.create_model(...,
    checkpoint_path="model.pth.tar")`` convert CheXNet, torchxrayvision, original-hybrid and torchvision
    DenseNet121 checkpoints. A state dict that already has every key of the model is left alone (``None``).
    """
    if not isinstance(state_dict, Mapping) or not state_dict:
        return None
    own = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if all(k in state_dict for k in own):
        return None
    try:
        fmt = detect_format({k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)})
    except CheckpointError:
        return None
    if fmt not in FOREIGN_FORMATS:
        return None
    complete = checkpoint_filter_fn(state_dict, model)
    _logger.info("converted a %s checkpoint for %s", fmt, type(model).__name__)
    return complete
