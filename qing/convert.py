"""Convert a checkpoint file of any supported format into a qing model: the dispatcher behind ``qing convert``.

:func:`load_checkpoint_file` reads a file safely, detects its format (CheXNet, the original
hybrid, torchxrayvision DenseNet, torchvision/timm DenseNet121, qing's own safetensors), logs
which one it found, and returns a :class:`ConvertedCheckpoint`: the state dict under qing key
names, the ``qing.create_model`` arguments and a pretrained cfg recording the preprocessing and
label names the weights expect. One call then builds the model, and ``qing.save_pretrained``
writes it as safetensors + JSON::

    import qing
    from qing.convert import load_checkpoint_file

    converted = load_checkpoint_file("model.pth.tar")        # -> format "chexnet"
    model = converted.create_model().eval()                   # qing_chexnet_densenet121, weights checked
    qing.save_pretrained(model, "chexnet-qing")

The per-format functions (:func:`load_chexnet_file`, :func:`load_original_hybrid_file`,
:func:`load_xrv_file`) do the same but fail if the file is of another format.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import timm
import torch
from huggingface_hub.constants import CONFIG_NAME, SAFETENSORS_SINGLE_FILE
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, split_model_name_tag
from torch import nn

from qing._factory import create_model
from qing.meta import ModelMeta, set_meta
from qing.models import CheckpointFilter, pretrained_cfg_dict
from qing.weights import (
    CXR14_LABELS,
    FORMATS,
    XRV_PATHOLOGIES,
    CheckpointError,
    PickledModule,
    convert_chexnet,
    convert_for_densenet,
    convert_for_hybrid,
    convert_original_hybrid,
    convert_xrv_densenet,
    detect_format,
    read_checkpoint,
    unwrap_state_dict,
)
from qing.weights.densenet_layout import densenet_summary, normalize_densenet_keys
from qing.weights.original import original_label_names

__all__ = [
    "ConvertedCheckpoint",
    "load_checkpoint_file",
    "load_chexnet_file",
    "load_original_hybrid_file",
    "load_xrv_file",
]

_logger = logging.getLogger(__name__)

#: Default qing architecture per format.
DEFAULT_TARGETS = {
    "chexnet": "qing_chexnet_densenet121",
    "xrv_densenet": "qing_xrv_densenet121",
    "densenet121": "qing_densenet121_tr2",
    "original_hybrid": "qing_densenet121_tr2",
}
_SOURCE_KEYS = ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "custom_load", "state_dict")


@dataclass
class ConvertedCheckpoint:
    """A checkpoint converted for a qing architecture: what is needed to build it and save it.

    Attributes:
        format: Detected format (a key of :data:`qing.weights.FORMATS`).
        source: The file read.
        model_name: qing architecture, e.g. ``"qing_chexnet_densenet121"``.
        state_dict: Tensors under ``model_name``'s keys; only ``backbone.*`` when the checkpoint
            is a backbone for a hybrid (the rest keeps its initialization).
        model_kwargs: JSON-able ``qing.create_model`` arguments (``num_classes``, ``in_chans``, ...).
        pretrained_cfg: JSON-able timm pretrained cfg: preprocessing (``mean``, ``std``,
            ``input_size``, ``crop_mode``, ``interpolation``), ``label_names``, license, origin.
        task: ``qing_meta.task`` of the converted classifier, when known.
        thresholds: Decision thresholds carried by the checkpoint (torchxrayvision ``op_threshs``).
    """

    format: str
    source: str
    model_name: str
    state_dict: dict[str, torch.Tensor]
    model_kwargs: dict[str, Any]
    pretrained_cfg: dict[str, Any]
    task: Optional[str] = None
    thresholds: Optional[list[float]] = None

    @property
    def meta(self) -> ModelMeta:
        """The :class:`~qing.meta.ModelMeta` the built model gets."""
        return ModelMeta(task=self.task, thresholds=self.thresholds)

    def create_model(self, **kwargs: Any) -> nn.Module:
        """Build ``model_name`` with these weights (loaded and checked like ``pretrained=True``).

        Args:
            **kwargs: Overrides of ``model_kwargs`` (e.g. ``num_classes=2`` re-initializes the
                classifier, with a warning listing the dropped keys).

        Returns:
            The model in train mode, with ``pretrained_cfg`` and ``qing_meta`` set.
        """
        cfg = dict(self.pretrained_cfg, state_dict=self.state_dict)
        model = create_model(self.model_name, pretrained=True, pretrained_cfg=cfg, **{**self.model_kwargs, **kwargs})
        model.qing_load_report.format = self.format  # the loader saw the converted layout
        if getattr(model, "num_classes", None) == self.model_kwargs.get("num_classes"):
            updates = {k: v for k, v in (("task", self.task), ("thresholds", self.thresholds)) if v is not None}
            if updates:
                set_meta(model, **updates)
        return model


def _is_hybrid(model_name: str) -> bool:
    cfg = get_pretrained_cfg(model_name)
    return bool(cfg and cfg.first_conv and cfg.first_conv.startswith("backbone."))


def _target_cfg(model_name: str, tag: str, source: str) -> dict[str, Any]:
    """The registry cfg of ``model_name.tag`` (or the architecture's default) without weight locations."""
    tagged = f"{model_name}.{tag}"
    cfg = pretrained_cfg_dict(
        get_pretrained_cfg(tagged if tagged in get_arch_pretrained_cfgs(model_name) else model_name)
    )
    for key in _SOURCE_KEYS:
        cfg.pop(key, None)
    cfg["file"] = source
    return cfg


def _label_names(given: Optional[list[str]], default: tuple[str, ...], num_classes: int) -> Optional[tuple[str, ...]]:
    if given is not None:
        if len(given) != num_classes:
            raise ValueError(f"{len(given)} label_names for a classifier with {num_classes} outputs")
        return tuple(given)
    return default if len(default) == num_classes else None


def _with_head(cfg: dict[str, Any], num_classes: int, labels: Optional[tuple[str, ...]]) -> dict[str, Any]:
    cfg["num_classes"] = num_classes
    if labels is None:
        cfg.pop("label_names", None)
    else:
        cfg["label_names"] = labels
    return cfg


def _check_fits(converted: ConvertedCheckpoint) -> None:
    """Build the target on the meta device and run the load checks: another architecture fails here."""
    model = create_model(converted.model_name, device="meta", **converted.model_kwargs)
    convert = convert_for_hybrid if hasattr(model, "backbone") else convert_for_densenet
    CheckpointFilter(converted.model_name, converted.source, convert)(converted.state_dict, model)


def _qing_architecture(path: Path) -> Optional[str]:
    """The qing architecture in a ``config.json`` beside ``path`` (a saved qing model folder), if any."""
    config_file = path.parent / CONFIG_NAME
    if not config_file.is_file():
        return None
    try:
        arch = json.loads(config_file.read_text()).get("architecture")
    except (ValueError, AttributeError):
        return None
    return arch if isinstance(arch, str) and arch.startswith("qing_") and timm.is_model(arch) else None


def _convert_qing(path: Path, state_dict: dict[str, torch.Tensor], model_name: Optional[str]) -> ConvertedCheckpoint:
    folder = path if path.is_dir() else path.parent
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        if model_name is None:
            raise CheckpointError(
                f"{path} holds qing weights without a config.json beside it; pass model_name= "
                "(the architecture it was saved from)"
            )
        cfg = _target_cfg(model_name, "", str(path))
        return ConvertedCheckpoint("qing", str(path), model_name, state_dict, {}, cfg)
    config = json.loads(config_file.read_text())
    arch = config.get("architecture")
    if model_name is not None and model_name != arch:
        raise CheckpointError(f"{config_file} describes a {arch} model, expected {model_name}")
    cfg = dict(config.get("pretrained_cfg", {}))
    for key in _SOURCE_KEYS:
        cfg.pop(key, None)
    cfg.update(architecture=arch, file=str(path), num_classes=config.get("num_classes", cfg.get("num_classes")))
    if config.get("label_names"):
        cfg["label_names"] = tuple(config["label_names"])
    kwargs = dict(config.get("model_args", {}), num_classes=cfg["num_classes"])
    meta = ModelMeta.from_dict(config.get("qing"))
    return ConvertedCheckpoint("qing", str(path), arch, state_dict, kwargs, cfg, meta.task, meta.thresholds)


def _convert(
    fmt: str,
    state_dict: dict[str, torch.Tensor],
    source: str,
    model_name: str,
    label_names: Optional[list[str]],
    extra_labels: Optional[tuple[str, ...]] = None,
) -> ConvertedCheckpoint:
    hybrid = _is_hybrid(model_name)
    if fmt == "original_hybrid":
        if not hybrid:
            raise CheckpointError(f"{source}: found {FORMATS[fmt]}, expected a checkpoint for {model_name}")
        sd, kwargs = convert_original_hybrid(state_dict)
        labels = original_label_names(kwargs["num_classes"], label_names)
        cfg = _with_head(_target_cfg(model_name, "original", source), kwargs["num_classes"], labels)
        task = "binary" if kwargs["num_classes"] == 1 else "multilabel"
        return ConvertedCheckpoint(fmt, source, model_name, sd, kwargs, cfg, task)

    tag = {"chexnet": "chexnet", "xrv_densenet": "xrv_all" if hybrid else "all", "densenet121": "tv_in1k"}[fmt]
    thresholds = None
    prefix = "backbone." if hybrid else ""
    if fmt == "chexnet":
        sd = convert_chexnet(state_dict, prefix=prefix, classifier=not hybrid)
        default_labels: tuple[str, ...] = CXR14_LABELS
    elif fmt == "xrv_densenet":
        sd, thresholds = convert_xrv_densenet(state_dict, prefix=prefix, classifier=not hybrid)
        default_labels = extra_labels or XRV_PATHOLOGIES
    else:
        normalized = normalize_densenet_keys(state_dict)
        sd = {prefix + k: v for k, v in normalized.items() if not hybrid or k.startswith("features.")}
        default_labels = ()
    summary = densenet_summary(normalize_densenet_keys({k.removeprefix("backbone."): v for k, v in sd.items()}))
    cfg = _target_cfg(model_name, tag, source)
    cfg["input_size"] = (summary["in_chans"], *cfg["input_size"][1:])
    if len(cfg.get("mean", ())) != summary["in_chans"]:  # e.g. a 1-channel DenseNet into a 3-channel cfg
        cfg["mean"] = (sum(cfg["mean"]) / len(cfg["mean"]),) * summary["in_chans"]
        cfg["std"] = (sum(cfg["std"]) / len(cfg["std"]),) * summary["in_chans"]
    kwargs: dict[str, Any] = {"in_chans": summary["in_chans"]}
    if hybrid:
        return ConvertedCheckpoint(fmt, source, model_name, sd, kwargs, cfg)
    num_classes = summary["num_classes"]
    kwargs["num_classes"] = num_classes
    cfg = _with_head(cfg, num_classes, _label_names(label_names, default_labels, num_classes))
    if thresholds is not None and len(thresholds) != num_classes:
        thresholds = None
    return ConvertedCheckpoint(fmt, source, model_name, sd, kwargs, cfg, "multilabel", thresholds)


def load_checkpoint_file(
    path: Union[str, Path],
    *,
    model_name: Optional[str] = None,
    label_names: Optional[list[str]] = None,
    trust_pickle: Optional[bool] = None,
    expected_format: Optional[str] = None,
) -> ConvertedCheckpoint:
    """Read a checkpoint of any supported format and convert it for a qing architecture.

    Formats (see :data:`qing.weights.FORMATS`) and their default targets:

    - ``chexnet`` (CheXNet ``model.pth.tar``) -> ``qing_chexnet_densenet121``;
    - ``xrv_densenet`` (torchxrayvision DenseNet121) -> ``qing_xrv_densenet121``;
    - ``original_hybrid`` (the original script's ``state_dict``) -> ``qing_densenet121_tr2``;
    - ``densenet121`` (torchvision/timm DenseNet121) -> the backbone of ``qing_densenet121_tr2``;
    - ``qing`` (a ``model.safetensors`` with its ``config.json``, or the folder) -> its architecture.

    A DenseNet format with ``model_name`` set to a qing densenet hybrid becomes that hybrid's
    backbone (e.g. CheXNet for ``qing_densenet121_tr4``). The file is read with
    ``weights_only=True`` (or as safetensors); the target is built on the meta device to check
    that the weights fit it.

    Args:
        path: The checkpoint file (or a qing model folder).
        model_name: Target qing architecture; ``None`` picks the format's default.
        label_names: Output names, overriding the format's (e.g. for an original model trained
            on other classes; the default for a one-output original model is ``["PNEUMONIA"]``).
        trust_pickle: Allow full unpickling (arbitrary code!); ``None`` reads ``$QING_TRUST_PICKLE``.
        expected_format: Fail unless the file is of this format.

    Returns:
        A :class:`ConvertedCheckpoint`; ``.format`` says what was found (also logged at INFO).

    Raises:
        FileNotFoundError: No such file.
        UnsafeCheckpointError: The file needs untrusted unpickling (message names the opt-in).
        CheckpointError: Corrupt file, unknown layout, another format than expected, or weights
            that do not fit ``model_name`` (message says what was found and what was expected).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        weights = path / SAFETENSORS_SINGLE_FILE
        if not weights.is_file():
            raise FileNotFoundError(
                f"{path} is a folder without {SAFETENSORS_SINGLE_FILE}; pass the checkpoint file itself"
            )
        path = weights
    raw = read_checkpoint(path, trust_pickle=trust_pickle)
    state_dict = unwrap_state_dict(raw, source=path)
    fmt = "qing" if _qing_architecture(path) else detect_format(state_dict)
    if fmt == "unknown":
        sample = ", ".join(list(state_dict)[:5])
        known = "; ".join(f"{k}: {v}" for k, v in FORMATS.items())
        raise CheckpointError(f"{path}: unrecognized checkpoint layout (keys like {sample}); known formats: {known}")
    if expected_format is not None and fmt != expected_format:
        raise CheckpointError(f"{path}: found {FORMATS[fmt]}, expected {FORMATS[expected_format]}")
    if fmt == "qing":
        converted = _convert_qing(path, state_dict, model_name)
    else:
        target = model_name or DEFAULT_TARGETS[fmt]
        if not timm.is_model(split_model_name_tag(target)[0]):
            raise ValueError(f"unknown model {target!r}; see qing.list_models()")
        labels = getattr(raw, "targets", None) if isinstance(raw, (nn.Module, PickledModule)) else None
        extra = tuple(labels) if labels is not None and len(labels) == len(XRV_PATHOLOGIES) else None
        converted = _convert(fmt, state_dict, str(path), target, label_names, extra)
    _logger.info("%s: detected %s (%s); converting for %s", path, fmt, FORMATS[fmt], converted.model_name)
    _check_fits(converted)
    return converted


def load_chexnet_file(
    path: Union[str, Path],
    *,
    model_name: str = "qing_chexnet_densenet121",
    label_names: Optional[list[str]] = None,
    trust_pickle: Optional[bool] = None,
) -> ConvertedCheckpoint:
    """Convert CheXNet's ``model.pth.tar`` for ``qing_chexnet_densenet121`` (or a densenet hybrid's backbone).

    See :func:`load_checkpoint_file`; fails if the file is not a CheXNet checkpoint.
    """
    return load_checkpoint_file(
        path, model_name=model_name, label_names=label_names, trust_pickle=trust_pickle, expected_format="chexnet"
    )


def load_original_hybrid_file(
    path: Union[str, Path],
    *,
    model_name: str = "qing_densenet121_tr2",
    label_names: Optional[list[str]] = None,
    trust_pickle: Optional[bool] = None,
) -> ConvertedCheckpoint:
    """Convert a checkpoint of the original hybrid script for ``qing_densenet121_tr2``.

    Accepts what the script saved (``torch.save(model.state_dict(), path)``) and training
    checkpoints nesting it under ``model_state_dict`` or ``state_dict``. The pretrained cfg
    records the original preprocessing (``Resize((224, 224))``, bilinear, ``mean=(0.485,) * 3``,
    ``std=(0.229,) * 3``) and ``label_names`` (``["PNEUMONIA"]`` for one output by default).
    ``sigmoid(model(x))`` of the built model equals the original model's output.
    """
    return load_checkpoint_file(
        path,
        model_name=model_name,
        label_names=label_names,
        trust_pickle=trust_pickle,
        expected_format="original_hybrid",
    )


def load_xrv_file(
    path: Union[str, Path],
    *,
    model_name: str = "qing_xrv_densenet121",
    label_names: Optional[list[str]] = None,
    trust_pickle: Optional[bool] = None,
) -> ConvertedCheckpoint:
    """Convert torchxrayvision DenseNet121 weights for ``qing_xrv_densenet121`` (or a 1-channel hybrid backbone).

    Accepts a saved ``model.state_dict()`` (tensors only) or the release files, which are pickled
    ``nn.Module`` objects, read through inert stand-ins (no trust flag, no torchxrayvision needed).
    ``op_threshs`` in the weights become ``qing_meta.thresholds``. See :func:`load_checkpoint_file`.
    """
    return load_checkpoint_file(
        path, model_name=model_name, label_names=label_names, trust_pickle=trust_pickle, expected_format="xrv_densenet"
    )
