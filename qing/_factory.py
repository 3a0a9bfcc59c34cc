"""``create_model``, ``from_pretrained`` and model listing: timm's, with clear errors and qing's metadata.

``create_model`` is ``timm.create_model`` with two additions, both in its body: registry names are
checked first (close matches are suggested), and ``hf-hub:`` / ``local-dir:`` sources are opened with
:mod:`qing.hub` (their config checked, their errors explained, their ``qing_meta`` restored).
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import timm
from timm.models import PretrainedCfg, get_arch_pretrained_cfgs, parse_model_name, split_model_name_tag
from torch import nn

from qing.hub import explain_source_errors, open_model_source, restore_meta, source_name
from qing.meta import get_meta
from qing.models import CNNTransformer
from qing.models.cxr_densenet import CXRDenseNet
from qing.weights import read_checkpoint, strip_prefixes, unwrap_state_dict

__all__ = ["create_model", "from_pretrained", "list_models", "list_pretrained"]

_logger = logging.getLogger(__name__)


def list_models(pattern: str = "qing_*", *, pretrained: bool = False) -> list[str]:
    """Registered qing architecture names matching a wildcard ``pattern``.

    Args:
        pattern: ``fnmatch`` wildcard, e.g. ``"qing_densenet*"``.
        pretrained: Only architectures with at least one weight tag, listed with tags.
    """
    names = timm.list_models(pattern, pretrained=pretrained, module=None)
    return [n for n in names if n.startswith("qing_")]


def list_pretrained(pattern: str = "qing_*") -> list[str]:
    """All ``architecture.tag`` names with weights, e.g. ``qing_densenet121_tr2.chexnet``."""
    return [n for n in timm.list_pretrained(pattern) if n.startswith("qing_")]


def _check_model_name(model_name: str) -> None:
    """Raise ``ValueError`` listing close matches for an unknown registry name or tag."""
    arch, tag = split_model_name_tag(model_name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)  # qing_* names are among them
        raise ValueError(
            f"unknown model {arch!r}"
            + (f"; did you mean {', '.join(close)}?" if close else ".")
            + f" qing models: {', '.join(list_models())} (any timm model name works too)."
        )
    if tag:
        known = [t for t in (split_model_name_tag(n)[1] for n in get_arch_pretrained_cfgs(arch)) if t]
        if tag not in known:
            raise ValueError(
                f"unknown tag {tag!r} for {arch}; known tags: {', '.join(known) or 'none'}"
                + (f" (e.g. {arch}.{known[0]}); see qing.list_pretrained()" if known else "")
            )


def create_model(
    model_name: str,
    pretrained: bool = False,
    pretrained_cfg: Optional[Union[str, dict[str, Any], PretrainedCfg]] = None,
    pretrained_cfg_overlay: Optional[dict[str, Any]] = None,
    checkpoint_path: Optional[Union[str, Path]] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    scriptable: Optional[bool] = None,
    exportable: Optional[bool] = None,
    no_jit: Optional[bool] = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a model by name; ``timm.create_model`` with clearer errors.

    Accepts everything timm does: ``"qing_densenet121_tr2"``, ``"qing_densenet121_tr2.chexnet"``,
    ``"hf-hub:user/repo"``, ``"local-dir:/path"``, and any plain timm model.

    Args:
        model_name: Architecture, optionally with ``.tag``, or a ``hf-hub:``/``local-dir:`` source.
        pretrained: Load the tag's weights, converted from their format and checked after loading
            (see :func:`qing.models.build_model_with_weights`). Published weights are downloaded once
            into the qing weights directory ``$QING_WEIGHTS_DIR`` (default ``~/.cache/qing/weights``),
            e.g. CheXNet to ``chexnet/model.pth.tar``, and checked on every later load. A different
            ``num_classes`` re-initializes only the classifier (one warning names the random parts).
        pretrained_cfg: A tag name, dict or ``PretrainedCfg`` to use instead of the registry's.
        pretrained_cfg_overlay: Entries replacing those of the pretrained cfg, e.g.
            ``dict(file="model.pth.tar")`` to load weights from a file of any supported format.
        checkpoint_path: A checkpoint loaded after creation. For qing models it is read safely (as
            ``pretrained=True`` reads files) and may be in any format of :data:`qing.weights.FORMATS`:
            a CheXNet ``model.pth.tar`` or torchxrayvision file is converted (backbone-only weights leave
            the rest of the model as created).
        cache_dir: Cache directory for Hub and URL downloads.
        scriptable: Configure layers for ``torch.jit.script``.
        exportable: Configure layers for export.
        no_jit: Disable jit-scripted layers.
        **kwargs: Model arguments, e.g. ``num_classes=2``, ``in_chans=1``, ``img_size=320``.

    Returns:
        The model, in train mode, with ``pretrained_cfg`` describing its preprocessing (and, with
        ``pretrained=True``, ``qing_load_report`` saying what was loaded from where).

    Raises:
        ValueError: Unknown model name or tag (the message lists the valid ones).
        qing.weights.WeightsNotFoundError: ``pretrained=True`` but the weights are not available;
            the message lists where qing looked and the three ways to supply them.
        qing.weights.CheckpointError: A corrupt checkpoint, one that needs untrusted unpickling,
            or one for another architecture.

    Example:
        >>> import qing
        >>> model = qing.create_model("qing_test_tr1", num_classes=2)
        >>> model.num_classes
        2
    """
    timm_args = dict(
        pretrained=pretrained,
        pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=pretrained_cfg_overlay,
        checkpoint_path=None,
        cache_dir=cache_dir,
        scriptable=scriptable,
        exportable=exportable,
        no_jit=no_jit,
        **kwargs,
    )
    try:
        kind, location = parse_model_name(model_name)
    except ValueError:
        kind = None  # a malformed source prefix: timm raises its own error below
    if kind is None:
        _check_model_name(model_name)
        model = timm.create_model(model_name, **timm_args)
        if checkpoint_path:
            _load_checkpoint(model, checkpoint_path)
        return model

    # hf-hub: / local-dir: read the source's config first, so missing repos, revisions, files and
    # offline cache misses fail with a message that says how to fix them
    source = open_model_source(kind, location, cache_dir=cache_dir, pretrained=pretrained)
    with explain_source_errors(source):
        model = timm.create_model(model_name, **timm_args)
    if checkpoint_path:
        _load_checkpoint(model, checkpoint_path)
    if pretrained:
        restore_meta(model, source)
    elif not checkpoint_path:
        _logger.warning(
            "built the %s architecture from %s without its weights (pretrained=False); "
            "pass pretrained=True or use qing.from_pretrained to load them",
            source.config["architecture"],
            source.text,
        )
    return model


def _load_checkpoint(model: nn.Module, checkpoint_path: Union[str, Path]) -> None:
    """``checkpoint_path=``: qing models read it safely and convert its format; other timm models as timm does."""
    if not isinstance(model, (CNNTransformer, CXRDenseNet)):
        timm.models.load_checkpoint(model, str(checkpoint_path))
        return
    state_dict = strip_prefixes(unwrap_state_dict(read_checkpoint(checkpoint_path), source=checkpoint_path))
    model.load_state_dict(state_dict)  # converts CheXNet, torchxrayvision and original-hybrid layouts
    _logger.info("loaded %s into %s", checkpoint_path, type(model).__name__)


def from_pretrained(
    source: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    calibration: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Load a saved or pushed model with its weights and ``qing_meta``, in eval mode.

    Args:
        source: A Hub repo id (``"owner/name"``), a local folder (a ``Path``, or a string naming an
            existing folder; a training run folder means its ``checkpoints/best``), or a prefixed name
            (``"hf-hub:owner/name[@rev]"``, ``"local-dir:path"``).
        revision: Hub branch or commit sha to load (same as ``"@rev"`` in the name).
        cache_dir: Hub cache folder (default: the huggingface_hub cache).
        calibration: Keep the saved temperature scaling (``qing_meta.temperatures``, applied by
            ``qing.evaluate.probabilities`` and the CLI). ``False`` drops it and moves the thresholds to the
            uncalibrated probabilities, so every decision stays the same (:meth:`qing.ModelMeta.uncalibrated`).
        **kwargs: Passed to [create_model][qing.create_model], e.g. ``num_classes=3`` for a new head
            (thresholds and metrics of the old head are then dropped, with a warning).

    Returns:
        The model in eval mode; ``model.qing_meta`` holds the saved task, temperatures, thresholds and metrics.

    Raises:
        qing.hub.ModelSourceNotFoundError: Missing repo, revision, file or folder ("no such folder" for a
            local path), or not cached while offline.
    """
    model = create_model(source_name(source, revision), pretrained=True, cache_dir=cache_dir, **kwargs)
    if not calibration:
        model.qing_meta = get_meta(model).uncalibrated()
    return model.eval()
