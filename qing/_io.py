"""Durable, atomic file writes: a reader sees the old file or the new one, never half of either.

Every file qing writes for the user (metrics, reports, figures, heatmaps, configs, predictions)
goes through a temporary file in the target's folder, ``fsync``, ``os.replace`` and an ``fsync`` of
the folder, so a kill or a power cut leaves no partial file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

__all__ = ["atomic_path", "fsync_dir", "fsync_tree", "save_figure", "write_bytes_atomic", "write_text_atomic"]

PathLike = Union[str, os.PathLike]

#: Mode of the files qing writes (what ``open()`` gives under the usual umask 022; a temporary file is 0600).
FILE_MODE = 0o644


def fsync_dir(folder: PathLike) -> None:
    """Flush a folder's entries (new, renamed or removed names) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: PathLike) -> None:
    """Flush every file below ``folder``, then every folder bottom-up and ``folder`` itself, to disk.

    For a folder built beside its target before an ``os.replace`` moves it into place: after this,
    a power cut cannot leave the renamed folder with missing or empty files.
    """
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is flushed and renamed to ``path``.

    For writers that take a file name (``Figure.savefig``, ``Image.save``). On an exception the
    temporary file is removed and ``path`` is left as it was.

    Example:
        >>> with atomic_path("figure.png") as tmp:  # doctest: +SKIP
        ...     fig.savefig(tmp, format="png")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (newlines as given); returns ``path``."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_figure(fig: Any, path: PathLike, *, dpi: int = 100) -> Path:
    """Save a matplotlib ``Figure`` as a PNG atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)
