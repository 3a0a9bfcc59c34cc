"""``pretrained=True`` for qing models: find the weights, convert them, load them, check they loaded.

Every qing entrypoint builds through :func:`build_model_with_weights`, a wrapper around timm's
``build_model_with_cfg``. With ``pretrained=True`` it

1. finds the weights of the pretrained cfg (tag) and fails with :class:`WeightsNotFoundError`
   naming every place it looked and the three ways to supply them;
2. reads local files itself (safetensors or ``torch.load(weights_only=True)``, see
   :func:`qing.weights.read_checkpoint`) and lets timm download Hub weights;
3. converts whatever format arrives in timm's ``pretrained_filter_fn`` (CheXNet, torchxrayvision,
   the original hybrid, a timm/torchvision backbone, qing's own), fills the tensors a
   backbone-only checkpoint does not have from the fresh initialization so timm's strict load
   passes, and replaces a classifier whose class count differs (a warning lists the dropped keys);
4. compares every tensor it meant to load with the model afterwards and raises if any is
   missing: never a silent random initialization.

Where weights are looked for, in order:

- ``pretrained_cfg["file"]``: an absolute path, or a path relative to the current directory and
  then to the **qing weights directory** ``$QING_WEIGHTS_DIR`` (default ``~/.cache/qing/weights``).
  CheXNet is expected at ``<weights dir>/chexnet/model.pth.tar``; torchxrayvision files at
  ``<weights dir>/xrv/<release file name>`` or in ``~/.torchxrayvision/models_data/``.
- ``pretrained_cfg["hf_hub_id"]``: first ``<weights dir>/<repo id>/model.safetensors`` (or
  ``pytorch_model.bin``), then the Hugging Face cache (``cache_dir`` or ``$HF_HUB_CACHE``),
  downloading unless ``HF_HUB_OFFLINE=1``.
- Any tag's weights can be replaced with ``pretrained_cfg_overlay=dict(file="/path/to/weights")``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import urllib.error
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import timm
import torch
from timm.models import PretrainedCfg, build_model_with_cfg, resolve_pretrained_cfg
from torch import nn

from qing.meta import set_meta
from qing.weights.files import CheckpointError, read_checkpoint, unwrap_state_dict
from qing.weights.original import ORIGINAL_PREPROCESSING

__all__ = [
    "WEIGHTS_DIR_ENV",
    "CheckpointFilter",
    "Conversion",
    "LoadReport",
    "WeightsNotFoundError",
    "build_model_with_weights",
    "hub_cached",
    "locate_weights",
    "weights_dir",
]

_logger = logging.getLogger(__name__)

#: Environment variable naming the qing weights directory.
WEIGHTS_DIR_ENV = "QING_WEIGHTS_DIR"
_DEFAULT_WEIGHTS_DIR = "~/.cache/qing/weights"
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsNotFoundError(FileNotFoundError):
    """``pretrained=True`` but the weights are not available; the message says where qing looked."""


def weights_dir() -> Path:
    """The qing weights directory: ``$QING_WEIGHTS_DIR``, default ``~/.cache/qing/weights``.

    It holds weights that cannot be (or should not be) downloaded: ``chexnet/model.pth.tar``,
    ``xrv/<torchxrayvision release file>``, and local copies of Hub weights as
    ``<repo id>/model.safetensors`` (e.g. ``timm/densenet121.tv_in1k/model.safetensors``).
    """
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or _DEFAULT_WEIGHTS_DIR).expanduser()


# ---- locating weights --------------------------------------------------------------------------


@dataclass
class _Source:
    kind: str  # "state_dict" | "file" | "hf-hub" | "local-dir" | "url"
    location: str = ""


def _weights_name(cfg: PretrainedCfg, variant: str) -> str:
    arch = cfg.architecture or variant
    return f"{arch}.{cfg.tag}" if cfg.tag else arch


def _foreign_cache_candidates(relative: Path) -> list[Path]:
    """Other libraries' caches that hold the same file (torchxrayvision's)."""
    if relative.parts and relative.parts[0] == "xrv":
        from qing.weights.xrv import XRV_CACHE_DIR

        return [XRV_CACHE_DIR / relative.name]
    return []


def _file_candidates(file: str) -> list[Path]:
    path = Path(file).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path.cwd() / path, weights_dir() / path, *_foreign_cache_candidates(path)]
    return [c / "model.safetensors" if c.is_dir() else c for c in candidates]  # a saved qing model folder


def _hub_filenames(cfg: PretrainedCfg) -> tuple[str, ...]:
    return (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES


def _split_revision(hf_hub_id: str) -> tuple[str, Optional[str]]:
    repo, _, revision = hf_hub_id.partition("@")
    return repo, revision or None


def _hub_cache_dir(cache_dir: Optional[Union[str, Path]]) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE)


def hub_cached(cfg: PretrainedCfg, cache_dir: Optional[Union[str, Path]] = None) -> bool:
    """Whether the Hub weights of ``cfg`` are in the Hugging Face cache (no network access).

    Args:
        cfg: A pretrained cfg with ``hf_hub_id`` (``repo`` or ``repo@revision``).
        cache_dir: Cache to look in; ``None`` is huggingface_hub's default cache.
    """
    from huggingface_hub import try_to_load_from_cache

    repo, revision = _split_revision(cfg.hf_hub_id)
    for filename in _hub_filenames(cfg):
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(found, str):
            return True
    return False


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _not_found(
    name: str, cfg: PretrainedCfg, looked: Sequence[str], cache_dir: Optional[Union[str, Path]], reason: str = ""
) -> WeightsNotFoundError:
    """The error for missing weights: where qing looked and the three ways to supply them."""
    lines = [f"pretrained weights for {name} not found{f' ({reason})' if reason else ''}. Looked in:"]
    lines += [f"  - {place}" for place in looked]
    lines.append("Supply them in one of three ways:")
    if cfg.hf_hub_id:
        repo, revision = _split_revision(cfg.hf_hub_id)
        filename = _hub_filenames(cfg)[0]
        extra = (f" --revision {revision}" if revision else "") + (f" --cache-dir {cache_dir}" if cache_dir else "")
        lines.append(
            f"  1. the Hugging Face cache: run `hf download {repo} {filename}{extra}` "
            f"(or `huggingface-cli download {repo} {filename}{extra}`) while online; it then loads offline too"
        )
        local_name = f"{repo}/{filename}"
    else:
        origin = f"; get the file from {cfg.origin_url}" if cfg.origin_url else ""
        lines.append(f"  1. the Hugging Face cache: not available, these weights are not on the Hub{origin}")
        local_name = str(cfg.file) if cfg.file and not Path(cfg.file).is_absolute() else f"{name}/model.safetensors"
    lines.append(
        f'  2. a file: qing.create_model("{name}", pretrained=True, '
        f'pretrained_cfg_overlay=dict(file="/path/to/{Path(local_name).name}"))'
    )
    lines.append(
        f"  3. the qing weights directory: put the file at {weights_dir() / local_name} "
        f"(set the environment variable {WEIGHTS_DIR_ENV} to use another directory than {weights_dir()})"
    )
    return WeightsNotFoundError("\n".join(lines))


def locate_weights(
    cfg: PretrainedCfg,
    *,
    variant: str = "",
    cache_dir: Optional[Union[str, Path]] = None,
    explicit_file: bool = False,
) -> tuple[str, str]:
    """Where the weights of a pretrained cfg are, without loading them.

    Args:
        cfg: The resolved pretrained cfg (tag plus overlay).
        variant: Architecture name, for messages when ``cfg.architecture`` is unset.
        cache_dir: Hugging Face cache directory (default ``$HF_HUB_CACHE``).
        explicit_file: ``cfg.file`` was given by the caller (``pretrained_cfg_overlay``): if it is
            missing, fail instead of falling back to the tag's Hub repo.

    Returns:
        ``(kind, location)``: ``("file", path)``, ``("hf-hub", repo id)``, ``("local-dir", path)``,
        ``("url", url)`` or ``("state_dict", "")``.

    Raises:
        WeightsNotFoundError: Nothing found; the message lists the places looked and the three
            ways to supply the weights (Hugging Face cache, ``pretrained_cfg_overlay=dict(file=...)``,
            the qing weights directory ``$QING_WEIGHTS_DIR``).
    """
    name = _weights_name(cfg, variant)
    if cfg.state_dict:
        return "state_dict", str(cfg.file or "")
    if cfg.source == "local-dir":
        if cfg.file and Path(cfg.file).is_dir():
            return "local-dir", str(cfg.file)
        raise _not_found(name, cfg, [f"{cfg.file} (local-dir: not a directory)"], cache_dir)
    looked: list[str] = []
    if cfg.file:
        candidates = _file_candidates(str(cfg.file))
        for path in candidates:
            if path.is_file():
                return "file", str(path)
        looked += [str(p) for p in candidates]
        if explicit_file:
            raise _not_found(name, cfg, looked, cache_dir)
    if cfg.hf_hub_id:
        repo, _ = _split_revision(cfg.hf_hub_id)
        if cfg.source != "hf-hub":  # registry tags: a local copy in the qing weights directory wins
            for filename in _hub_filenames(cfg):
                path = weights_dir() / repo / filename
                if path.is_file():
                    return "file", str(path)
                looked.append(str(path))
        looked.append(f"the Hugging Face cache {_hub_cache_dir(cache_dir)} ({repo}: {', '.join(_hub_filenames(cfg))})")
        if cfg.source == "hf-hub" or not _hub_offline() or hub_cached(cfg, cache_dir):
            return "hf-hub", cfg.hf_hub_id  # "hf-hub:" model names: qing.hub explains their errors
        raise _not_found(name, cfg, looked, cache_dir, reason="Hugging Face offline mode is on: HF_HUB_OFFLINE=1")
    if cfg.url:
        return "url", str(cfg.url)
    if looked:
        raise _not_found(name, cfg, looked, cache_dir)
    arch = cfg.architecture or variant
    tags = timm.list_pretrained(f"{arch}.*")
    raise WeightsNotFoundError(
        f"{name} has no pretrained weights of its own; choose a tag with weights"
        + (f" ({', '.join(tags)})" if tags else "")
        + ' or pass a file: pretrained_cfg_overlay=dict(file="/path/to/weights"). '
        "Use pretrained=False for random init."
    )


# ---- converting and checking -------------------------------------------------------------------


@dataclass
class Conversion:
    """What a model family's converter made of a checkpoint.

    Attributes:
        state_dict: Tensors under the model's key names.
        format: Detected format, e.g. ``"chexnet"``, ``"xrv_densenet"``, ``"original_hybrid"``, ``"qing"``.
        required_prefix: ``""`` when the checkpoint is a whole model (every key must be present);
            ``"backbone."`` when it only covers the backbone (the rest keeps its initialization).
        unused: Checkpoint keys with no place in the model (e.g. a backbone's ImageNet classifier).
        thresholds: Decision thresholds carried by the checkpoint (torchxrayvision ``op_threshs``).
    """

    state_dict: dict[str, torch.Tensor]
    format: str
    required_prefix: str = ""
    unused: list[str] = field(default_factory=list)
    thresholds: Optional[list[float]] = None


#: ``converter(state_dict, model) -> Conversion``
Converter = Callable[[Mapping[str, torch.Tensor], nn.Module], Conversion]


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


def summarize_keys(keys: Sequence[str], *, limit: int = 8) -> str:
    """``"blocks.* (24), cls_token, head.* (2)"``: keys grouped by their first component."""
    groups: dict[str, int] = {}
    for key in keys:
        group = key.split(".", 1)[0] + ".*" if "." in key else key
        groups[group] = groups.get(group, 0) + 1
    parts = [f"{g} ({n})" if n > 1 else g for g, n in groups.items()]
    return ", ".join(parts[:limit]) + (f", ... ({len(parts) - limit} more groups)" if len(parts) > limit else "")


def _classifier_keys(model: nn.Module, target: Mapping[str, torch.Tensor]) -> list[str]:
    names = model.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return [f"{n}.{p}" for n in names for p in ("weight", "bias") if f"{n}.{p}" in target]


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
        rows = ckpt[dropped[0]].shape[0]
        for key in dropped:
            del ckpt[key]
        _logger.warning(
            "%s: the checkpoint's classifier has %d outputs but the model has %d: dropped %s "
            "and re-initialized the classifier",
            self.name,
            rows,
            getattr(model, "num_classes", -1),
            ", ".join(dropped),
        )
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
    from huggingface_hub import errors

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


def _label_names_fit(cfg: dict[str, Any], num_classes: int, name: str, head_loaded: bool) -> None:
    labels = cfg.get("label_names")
    if labels is None or not num_classes or len(labels) == num_classes:
        return
    if head_loaded:
        _logger.warning(
            "%s: the pretrained cfg's %d label_names do not match the loaded classifier's %d outputs; "
            "dropped them (pass pretrained_cfg_overlay=dict(label_names=[...]))",
            name,
            len(labels),
            num_classes,
        )
    else:  # a new head for the caller's classes: the source weights' names no longer apply
        _logger.info(
            "%s: new %d-output head; the pretrained cfg's %d label_names dropped", name, num_classes, len(labels)
        )
    cfg["label_names"] = None


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
    if not pretrained:
        return build_model_with_cfg(
            model_cls, variant, False, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay or None,
            feature_cfg=feature_cfg, **kwargs,
        )  # fmt: skip

    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    name = _weights_name(cfg, variant)
    cache_dir = kwargs.get("cache_dir")
    kind, location = locate_weights(cfg, variant=variant, cache_dir=cache_dir, explicit_file=bool(overlay.get("file")))
    weights: Optional[Mapping[str, torch.Tensor]] = None
    if kind == "file":
        weights = unwrap_state_dict(read_checkpoint(location), source=location)
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
        raise _not_found(name, cfg, looked, cache_dir) from err
    report = filt.verify()
    model.pretrained_cfg.pop("state_dict", None)
    if report.format == "original_hybrid":
        _use_original_preprocessing(model, overlay, name)
    if kind == "file":
        model.pretrained_cfg["file"] = location
    model.qing_load_report = report

    num_classes = getattr(model, "num_classes", 0)
    if not report.dropped and num_classes:
        head = model.pretrained_cfg.get("classifier") or ""
        head_loaded = bool(head) and any(k.startswith(f"{head}.") for k in report.loaded)
        _label_names_fit(model.pretrained_cfg, num_classes, name, head_loaded)
        thresholds = report.thresholds or (tag_thresholds or {}).get(cfg.tag or "")
        updates: dict[str, Any] = {}
        if task:
            updates["task"] = task
        if thresholds is not None and len(thresholds) == num_classes:
            updates["thresholds"] = list(thresholds)
        if updates:
            set_meta(model, **updates)
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
