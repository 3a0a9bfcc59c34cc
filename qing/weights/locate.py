"""Where the weights of a pretrained cfg are: the qing weights directory, a download, the Hugging Face cache, a file.

Where weights are looked for, in order:

- ``pretrained_cfg_overlay=dict(file=...)`` (a file the caller names): that path, absolute or relative
  to the current directory, and nothing else.
- ``pretrained_cfg["file"]`` of a registry tag: only in the **qing weights directory**
  ``$QING_WEIGHTS_DIR`` (default ``~/.cache/qing/weights``), and for torchxrayvision files also in
  torchxrayvision's cache ``~/.torchxrayvision/models_data/``. Never in the current directory.
- ``pretrained_cfg["url"]``: downloaded on first use to that place in the weights directory
  (``<weights dir>/downloads/<hash>/<name>`` for a URL without a file), unless offline
  (``HF_HUB_OFFLINE=1`` or ``QING_OFFLINE=1``); see :mod:`qing.weights.download`.
- ``pretrained_cfg["hf_hub_id"]``: first ``<weights dir>/<repo id>/model.safetensors`` (or
  ``pytorch_model.bin``), then the Hugging Face cache (``cache_dir`` or ``$HF_HUB_CACHE``),
  downloading unless ``HF_HUB_OFFLINE=1``.
- ``hf-hub:`` and ``local-dir:`` models load from their repo or folder only: a ``file``, ``url`` or
  ``state_dict`` in the repo's ``config.json`` is ignored, so a downloaded config never chooses what is
  read from the local disk.

Nothing here reads or converts a file: :func:`locate_weights` answers where, and
:class:`WeightsNotFoundError` says where qing looked and how to supply the weights.
"""

from __future__ import annotations

import hashlib
import os
import re
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
    "OFFLINE_ENV",
    "WEIGHTS_DIR_ENV",
    "WeightsNotFoundError",
    "download_path",
    "hub_cached",
    "locate_weights",
    "not_found_error",
    "offline_mode",
    "split_sha256",
    "weights_dir",
    "weights_name",
]

#: Environment variable naming the qing weights directory.
WEIGHTS_DIR_ENV = "QING_WEIGHTS_DIR"
_DEFAULT_WEIGHTS_DIR = "~/.cache/qing/weights"
_HUB_FILES = (SAFETENSORS_SINGLE_FILE, PYTORCH_WEIGHTS_NAME)
#: Environment variable that forbids qing to download (as ``HF_HUB_OFFLINE`` does for the Hub).
OFFLINE_ENV = "QING_OFFLINE"
_SHA256_FRAGMENT = re.compile(r"#sha256=([0-9a-fA-F]{64})$")


class WeightsNotFoundError(FileNotFoundError):
    """``pretrained=True`` but the weights are not available; the message says where qing looked."""


def weights_dir() -> Path:
    """The qing weights directory: ``$QING_WEIGHTS_DIR``, default ``~/.cache/qing/weights``.

    It holds the files downloaded on first use (``chexnet/model.pth.tar``,
    ``xrv/<torchxrayvision release file>``, each with its ``.integrity.json`` record), files placed there
    by hand on machines without network, and local copies of Hub weights as
    ``<repo id>/model.safetensors`` (e.g. ``timm/densenet121.tv_in1k/model.safetensors``).
    """
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or _DEFAULT_WEIGHTS_DIR).expanduser()


def weights_name(cfg: PretrainedCfg, variant: str = "") -> str:
    """``architecture.tag`` of a pretrained cfg (``variant`` when the cfg names no architecture)."""
    arch = cfg.architecture or variant
    return f"{arch}.{cfg.tag}" if cfg.tag else arch


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def offline_mode() -> bool:
    """Whether downloading is forbidden: ``QING_OFFLINE=1`` or Hugging Face's ``HF_HUB_OFFLINE=1``."""
    return _truthy(os.environ.get(OFFLINE_ENV)) or bool(hf_constants.HF_HUB_OFFLINE)


def offline_variable() -> str:
    """The setting that turned offline mode on, for messages."""
    return f"{OFFLINE_ENV}=1" if _truthy(os.environ.get(OFFLINE_ENV)) else "HF_HUB_OFFLINE=1"


def split_sha256(url: str) -> tuple[str, Optional[str]]:
    """``("https://host/file", "<sha256>")`` for a URL ending in ``#sha256=<hex>`` (pip's pin); else ``(url, None)``."""
    match = _SHA256_FRAGMENT.search(url)
    if match is None:
        return url, None
    return url[: match.start()], match.group(1).lower()


def _foreign_cache_candidates(relative: Path) -> list[Path]:
    """Other libraries' caches that hold the same file (torchxrayvision's)."""
    if relative.parts and relative.parts[0] == "xrv":
        return [XRV_CACHE_DIR / relative.name]
    return []


def _registry_candidates(file: str) -> list[Path]:
    """Where a registry tag's relative file may be: the qing weights directory, then foreign caches."""
    relative = Path(file)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"a registry weights file must be relative to the qing weights directory, got {file!r}")
    return [weights_dir() / relative, *_foreign_cache_candidates(relative)]


def _named_file(file: str) -> Path:
    """A file the caller named: absolute, or relative to the current directory; a model folder means its weights."""
    path = Path(file).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    return path / SAFETENSORS_SINGLE_FILE if path.is_dir() else path


def download_path(cfg: PretrainedCfg) -> Path:
    """Where the weights at ``cfg.url`` are downloaded to: ``<weights dir>/<cfg.file>``, else by the URL's hash.

    A URL without a registry file goes to ``<weights dir>/downloads/<first 16 hex of sha256(url)>/<file name>``.
    """
    url, _ = split_sha256(str(cfg.url))
    if cfg.file:
        file = Path(str(cfg.file)).expanduser()
        return file if file.is_absolute() else _registry_candidates(str(cfg.file))[0]
    name = Path(url.split("?", 1)[0].rstrip("/")).name or "weights"
    return weights_dir() / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16] / name


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


def _named_file_error(name: str, file: str) -> WeightsNotFoundError:
    path = _named_file(file)
    given = (
        "" if Path(file).expanduser().is_absolute() else f" ({file!r} relative to the current directory {Path.cwd()})"
    )
    return WeightsNotFoundError(
        f"pretrained weights for {name}: the file {path}{given} given as pretrained_cfg_overlay file does not exist; "
        "check the path (an absolute path avoids surprises)"
    )


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
    elif cfg.url:
        url, _ = split_sha256(str(cfg.url))
        when = f"offline mode is on ({offline_variable()}): fetch it" if offline_mode() else "or fetch it yourself"
        lines.append(f"  1. the download: qing fetches {url} on first use; {when} where the network is reachable")
        local_name = str(download_path(cfg).relative_to(weights_dir()))
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
    """Where the weights of a pretrained cfg are, without loading or downloading them.

    Args:
        cfg: The resolved pretrained cfg (tag plus overlay).
        variant: Architecture name, for messages when ``cfg.architecture`` is unset.
        cache_dir: Hugging Face cache directory (default ``$HF_HUB_CACHE``).
        explicit_file: ``cfg.file`` was named by the caller (``pretrained_cfg_overlay``): it is looked
            for as given (absolute, or relative to the current directory) and nowhere else.

    Returns:
        ``(kind, location)``: ``("file", path)``, ``("url", url)`` (to download to
        :func:`download_path`), ``("hf-hub", repo id)``, ``("local-dir", path)`` or ``("state_dict", "")``.

    Raises:
        WeightsNotFoundError: Nothing found; the message lists the places looked and the ways to
            supply the weights (download, Hugging Face cache, ``pretrained_cfg_overlay=dict(file=...)``,
            the qing weights directory ``$QING_WEIGHTS_DIR``).
    """
    name = weights_name(cfg, variant)
    if cfg.source == "local-dir":
        if cfg.file and Path(cfg.file).is_dir():
            return "local-dir", str(cfg.file)
        raise not_found_error(name, cfg, [f"{cfg.file} (local-dir: not a directory)"], cache_dir)
    if cfg.source == "hf-hub":  # the repo's own weights only (qing.models strips file/url/state_dict of its config)
        return "hf-hub", str(cfg.hf_hub_id)
    if cfg.state_dict:
        return "state_dict", str(cfg.file or "")
    looked: list[str] = []
    if cfg.file and (explicit_file or Path(str(cfg.file)).expanduser().is_absolute()):
        path = _named_file(str(cfg.file))
        if path.is_file():
            return "file", str(path)
        raise _named_file_error(name, str(cfg.file))
    if cfg.file:
        candidates = _registry_candidates(str(cfg.file))
        for path in candidates:
            if path.is_file():
                return "file", str(path)
        looked += [str(p) for p in candidates]
    if cfg.url:
        target = download_path(cfg)
        if target.is_file():  # downloaded before (a URL without a registry file)
            return "file", str(target)
        if str(target) not in looked:
            looked.append(str(target))
        if offline_mode():
            raise not_found_error(name, cfg, looked, cache_dir, reason=f"offline mode is on: {offline_variable()}")
        return "url", str(cfg.url)
    if cfg.hf_hub_id:
        repo, _ = _split_revision(cfg.hf_hub_id)
        for filename in _hub_filenames(cfg):  # a local copy in the qing weights directory wins
            path = weights_dir() / repo / filename
            if path.is_file():
                return "file", str(path)
            looked.append(str(path))
        looked.append(f"the Hugging Face cache {_hub_cache_dir(cache_dir)} ({repo}: {', '.join(_hub_filenames(cfg))})")
        if not _hub_offline() or hub_cached(cfg, cache_dir):
            return "hf-hub", cfg.hf_hub_id
        raise not_found_error(name, cfg, looked, cache_dir, reason="Hugging Face offline mode is on: HF_HUB_OFFLINE=1")
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
