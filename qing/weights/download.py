"""Downloading weights files on first use, and checking them on every later use.

A tag whose weights are published at a URL (CheXNet's ``model.pth.tar``, torchxrayvision's release
assets) is fetched once into the qing weights directory by :func:`download_weights`:

- the bytes stream into a temporary file beside the target (with a progress bar), and only a complete
  download, whose length matches the server's ``Content-Length`` and whose sha256 matches a pinned one,
  is renamed into place: an interrupted download leaves nothing half-written;
- the size and sha256 are recorded beside the file (``<file>.integrity.json``), and
  :func:`verify_integrity` checks them on every later load, so a changed or damaged file is refused;
- ``HF_HUB_OFFLINE=1`` or ``QING_OFFLINE=1`` forbid the network: the error says where to put the file;
- a network error or an HTTP error is one line naming the URL and the path the file belongs at.

A URL may pin the file's sha256 in pip's manner, ``https://host/file.pt#sha256=<64 hex digits>``: a
download (and a file placed by hand) must then match it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from huggingface_hub.utils import tqdm

from qing._io import atomic_path, write_text_atomic
from qing.version import __version__
from qing.weights.files import CheckpointError
from qing.weights.locate import WeightsNotFoundError, offline_mode, offline_variable, split_sha256

__all__ = [
    "IntegrityRecord",
    "WeightsDownloadError",
    "WeightsIntegrityError",
    "download_weights",
    "integrity_record_path",
    "verify_integrity",
]

_CHUNK = 1 << 20
_TIMEOUT_S = 30


class WeightsDownloadError(WeightsNotFoundError):
    """The weights could not be downloaded (offline mode, network error, HTTP error, cut connection)."""


class WeightsIntegrityError(CheckpointError):
    """A weights file whose size or sha256 differs from what was recorded or pinned."""


@dataclass(frozen=True)
class IntegrityRecord:
    """What was downloaded: the source URL, the size in bytes and the sha256 of the file."""

    url: str
    size: int
    sha256: str


def integrity_record_path(path: Union[str, Path]) -> Path:
    """Where the size and sha256 of a downloaded file are recorded: ``<file>.integrity.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".integrity.json")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_record(record_path: Path) -> IntegrityRecord:
    try:
        data = json.loads(record_path.read_text(encoding="utf-8"))
        return IntegrityRecord(url=str(data["url"]), size=int(data["size"]), sha256=str(data["sha256"]).lower())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightsIntegrityError(
            f"the integrity record {record_path} is unreadable ({type(err).__name__}: {err}); delete it and the "
            f"file beside it to download the weights again"
        ) from err


def _refetch_hint(path: Path, record_path: Optional[Path]) -> str:
    files = f"{path} and {record_path}" if record_path is not None else str(path)
    return f"to fetch the file again, delete {files} and load the model again (it downloads anew)"


def verify_integrity(path: Union[str, Path], *, expected_sha256: Optional[str] = None) -> Optional[IntegrityRecord]:
    """Check a weights file against the size and sha256 recorded when it was downloaded, and a pinned sha256.

    A file with no record (placed by hand) passes unless ``expected_sha256`` is given.

    Args:
        path: The weights file.
        expected_sha256: The sha256 the registry pins, if any.

    Returns:
        The record, or ``None`` when the file has none.

    Raises:
        WeightsIntegrityError: The size or a sha256 differs; the message says how to re-fetch.
    """
    path = Path(path)
    record_path = integrity_record_path(path)
    record = _read_record(record_path) if record_path.is_file() else None
    if record is None and expected_sha256 is None:
        return None
    size = path.stat().st_size
    if record is not None and size != record.size:
        raise WeightsIntegrityError(
            f"{path} has {size} bytes, but {record.size} were recorded in {record_path} when it was downloaded from "
            f"{record.url}: the file was changed or damaged; {_refetch_hint(path, record_path)}"
        )
    actual = _sha256_of(path)
    if record is not None and actual != record.sha256:
        raise WeightsIntegrityError(
            f"{path} has sha256 {actual}, but {record.sha256} was recorded in {record_path} when it was downloaded "
            f"from {record.url}: the file was changed or damaged; {_refetch_hint(path, record_path)}"
        )
    if expected_sha256 is not None and actual != expected_sha256.lower():
        raise WeightsIntegrityError(
            f"{path} has sha256 {actual}, but qing's registry pins {expected_sha256.lower()}: these are not the "
            f"published weights; {_refetch_hint(path, record_path if record is not None else None)}"
        )
    return record


def download_weights(url: str, path: Union[str, Path], *, progress: bool = True) -> Path:
    """Download ``url`` to ``path`` atomically and record its size and sha256 beside it.

    Args:
        url: An ``http(s)`` URL, optionally ending in ``#sha256=<hex>`` (the download must match it).
        path: Where the file goes (its folder is created).
        progress: Show a progress bar (``HF_HUB_DISABLE_PROGRESS_BARS=1`` hides it too).

    Returns:
        ``path``.

    Raises:
        WeightsDownloadError: Offline mode, a network or HTTP error, or a connection cut before the end;
            one line naming the URL and ``path``. Nothing is left at ``path``.
        WeightsIntegrityError: The download does not match the pinned sha256 (nothing is kept).
    """
    path = Path(path)
    plain_url, pinned = split_sha256(url)
    put_it = f"put the file at {path} yourself (download {plain_url} on a machine with network access)"
    if offline_mode():
        raise WeightsDownloadError(
            f"{plain_url} is not downloaded: offline mode is on ({offline_variable()}); {put_it}"
        )
    request = urllib.request.Request(plain_url, headers={"User-Agent": f"qing/{__version__}"})
    digest, received = hashlib.sha256(), 0
    try:
        with atomic_path(path) as tmp:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, tmp.open("wb") as out:
                total = response.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else None
                with tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name, disable=not progress
                ) as bar:
                    for block in iter(lambda: response.read(_CHUNK), b""):
                        out.write(block)
                        digest.update(block)
                        received += len(block)
                        bar.update(len(block))
            if total is not None and received != total:
                raise WeightsDownloadError(
                    f"could not download {plain_url}: the connection closed after {received} of {total} bytes; "
                    f"try again, or {put_it}"
                )
            sha256 = digest.hexdigest()
            if pinned is not None and sha256 != pinned:
                raise WeightsIntegrityError(
                    f"the file downloaded from {plain_url} has sha256 {sha256}, but qing's registry pins {pinned}; "
                    "it was not kept. The server holds other bytes than the published weights"
                )
            # the record first: a crash before the rename leaves a record without a file, which a new download replaces
            record = {"url": plain_url, "size": received, "sha256": sha256}
            write_text_atomic(integrity_record_path(path), json.dumps(record, indent=2) + "\n")
    except urllib.error.HTTPError as err:
        raise WeightsDownloadError(f"could not download {plain_url}: HTTP {err.code} {err.reason}; {put_it}") from err
    except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise WeightsDownloadError(f"could not download {plain_url}: network error ({reason}); {put_it}") from err
    except OSError as err:
        if isinstance(err, WeightsDownloadError):
            raise
        raise WeightsDownloadError(f"could not download {plain_url} to {path}: {err}; {put_it}") from err
    return path
