"""Where the weights of a pretrained cfg are: the qing weights directory, the Hugging Face cache, a file.

Where weights are looked for, in order:

- ``pretrained_cfg["file"]``: an absolute path, or a path relative to the current directory and
  then to the **qing weights directory** ``$QING_WEIGHTS_DIR`` (default ``~/.cache/qing/weights``).
  CheXNet is expected at ``<weights dir>/chexnet/model.pth.tar``; torchxrayvision files at
  ``<weights dir>/xrv/<release file name>`` or in ``~/.torchxrayvision/models_data/``.
- ``pretrained_cfg["hf_hub_id"]``: first ``<weights dir>/<repo id>/model.safetensors`` (or
  ``pytorch_model.bin``), then the Hugging Face cache (``cache_dir`` or ``$HF_HUB_CACHE``),
  downloading unless ``HF_HUB_OFFLINE=1``.
- Any tag's weights can be replaced with ``pretrained_cfg_overlay=dict(file="/path/to/weights")``.

Nothing here reads or converts a file: :func:`locate_weights` answers where, and
:class:`WeightsNotFoundError` says where qing looked and how to supply the weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import timm
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.constants import PYTORCH_WEIGHTS_NAME, SAFETENSORS_SINGLE_FILE
from timm.models import PretrainedCfg

from qing.weights.xrv import XRV_CACHE_DIR

__all__ = [
    "WEIGHTS_DIR_ENV",
    "WeightsNotFoundError",
    "hub_cached",
    "locate_weights",
    "not_found_error",
    "weights_dir",
    "weights_name",
]

#: Environment variable naming the qing weights directory.
WEIGHTS_DIR_ENV = "QING_WEIGHTS_DIR"
_DEFAULT_WEIGHTS_DIR = "~/.cache/qing/weights"
_HUB_FILES = (SAFETENSORS_SINGLE_FILE, PYTORCH_WEIGHTS_NAME)


class WeightsNotFoundError(FileNotFoundError):
    """``pretrained=True`` but the weights are not available; the message says where qing looked."""


def weights_dir() -> Path:
    """The qing weights directory: ``$QING_WEIGHTS_DIR``, default ``~/.cache/qing/weights``.

    It holds weights that cannot be (or should not be) downloaded: ``chexnet/model.pth.tar``,
    ``xrv/<torchxrayvision release file>``, and local copies of Hub weights as
    ``<repo id>/model.safetensors`` (e.g. ``timm/densenet121.tv_in1k/model.safetensors``).
    """
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or _DEFAULT_WEIGHTS_DIR).expanduser()


def weights_name(cfg: PretrainedCfg, variant: str = "") -> str:
    """``architecture.tag`` of a pretrained cfg (``variant`` when the cfg names no architecture)."""
    arch = cfg.architecture or variant
    return f"{arch}.{cfg.tag}" if cfg.tag else arch


def _foreign_cache_candidates(relative: Path) -> list[Path]:
    """Other libraries' caches that hold the same file (torchxrayvision's)."""
    if relative.parts and relative.parts[0] == "xrv":
        return [XRV_CACHE_DIR / relative.name]
    return []


def _file_candidates(file: str) -> list[Path]:
    path = Path(file).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path.cwd() / path, weights_dir() / path, *_foreign_cache_candidates(path)]
    return [c / SAFETENSORS_SINGLE_FILE if c.is_dir() else c for c in candidates]  # a saved qing model folder


def _hub_filenames(cfg: PretrainedCfg) -> tuple[str, ...]:
    return (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES


def _split_revision(hf_hub_id: str) -> tuple[str, Optional[str]]:
    repo, _, revision = hf_hub_id.partition("@")
    return repo, revision or None


def _hub_cache_dir(cache_dir: Optional[Union[str, Path]]) -> Path:
    return Path(cache_dir or hf_constants.HF_HUB_CACHE)


def hub_cached(cfg: PretrainedCfg, cache_dir: Optional[Union[str, Path]] = None) -> bool:
    """Whether the Hub weights of ``cfg`` are in the Hugging Face cache (no network access).

    Args:
        cfg: A pretrained cfg with ``hf_hub_id`` (``repo`` or ``repo@revision``).
        cache_dir: Cache to look in; ``None`` is huggingface_hub's default cache.
    """
    repo, revision = _split_revision(cfg.hf_hub_id)
    for filename in _hub_filenames(cfg):
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(found, str):
            return True
    return False


def _hub_offline() -> bool:
    return bool(hf_constants.HF_HUB_OFFLINE)


def not_found_error(
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
        relative = cfg.file and not Path(cfg.file).is_absolute()
        local_name = str(cfg.file) if relative else f"{name}/{SAFETENSORS_SINGLE_FILE}"
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
    name = weights_name(cfg, variant)
    if cfg.state_dict:
        return "state_dict", str(cfg.file or "")
    if cfg.source == "local-dir":
        if cfg.file and Path(cfg.file).is_dir():
            return "local-dir", str(cfg.file)
        raise not_found_error(name, cfg, [f"{cfg.file} (local-dir: not a directory)"], cache_dir)
    looked: list[str] = []
    if cfg.file:
        candidates = _file_candidates(str(cfg.file))
        for path in candidates:
            if path.is_file():
                return "file", str(path)
        looked += [str(p) for p in candidates]
        if explicit_file:
            raise not_found_error(name, cfg, looked, cache_dir)
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
        raise not_found_error(name, cfg, looked, cache_dir, reason="Hugging Face offline mode is on: HF_HUB_OFFLINE=1")
    if cfg.url:
        return "url", str(cfg.url)
    if looked:
        raise not_found_error(name, cfg, looked, cache_dir)
    arch = cfg.architecture or variant
    tags = timm.list_pretrained(f"{arch}.*")
    raise WeightsNotFoundError(
        f"{name} has no pretrained weights of its own; choose a tag with weights"
        + (f" ({', '.join(tags)})" if tags else "")
        + ' or pass a file: pretrained_cfg_overlay=dict(file="/path/to/weights"). '
        "Use pretrained=False for random init."
    )
