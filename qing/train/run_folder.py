"""The run folder: what qing wrote in it, what it may replace, and the lock that keeps a second run out.

A run writes into four folders: the run folder (``output_dir``: ``train.log``, ``config.yaml``,
``splits.csv``) and its checkpoint, TensorBoard and report folders (inside it by default). Each gets a
marker file, ``.qing-run``: JSON naming the run folder and listing the entries qing wrote there. The
marker is the only thing that makes qing treat a file as its own:

- ``overwrite`` removes the entries a marker lists, and nothing else. Files qing did not write are
  left alone, and an output folder that holds files but no marker is refused before anything is
  removed;
- a folder whose marker names another run folder is refused, with or without ``overwrite``;
- a run that finds its own earlier outputs refuses to start unless it resumes or overwrites.

While a run trains it holds an exclusive lock on ``<run folder>/.qing-run.lock`` (the ``filelock``
package; the operating system releases it when the process ends, however it ends). A second run on
the same folder fails at once, naming the holder from ``.qing-run.owner`` (pid, host, start time and
command).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import filelock

from qing._io import write_text_atomic
from qing.version import __version__

__all__ = [
    "LOCK_FILE",
    "MARKER",
    "OWNER_FILE",
    "OutputFolder",
    "RunFolderBusyError",
    "RunFolderError",
    "RunFolderLock",
    "read_marker",
    "record_entries",
]

MARKER = ".qing-run"
LOCK_FILE = ".qing-run.lock"
OWNER_FILE = ".qing-run.owner"
_OWN_FILES = (MARKER, LOCK_FILE, OWNER_FILE)


class RunFolderError(FileExistsError):
    """An output folder holds something this run must not replace (the message names it and what to do)."""


class RunFolderBusyError(RunFolderError):
    """Another run holds the run folder's lock."""


@dataclass(frozen=True)
class OutputFolder:
    """One folder a run writes into.

    Attributes:
        kind: ``run``, ``checkpoints``, ``tensorboard`` or ``report``.
        path: The folder.
        setting: The ``TrainConfig`` field that names it (``output_dir``, ``checkpoint_dir``, ...).
        entries: The names a run writes there that are known before it starts.
    """

    kind: str
    path: Path
    setting: str
    entries: tuple[str, ...] = ()


# ---- markers ---------------------------------------------------------------------------------------


def read_marker(folder: Path) -> Optional[dict[str, Any]]:
    """The ``.qing-run`` marker of ``folder`` (``None`` when absent or not a qing marker)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("qing") != "run" or not isinstance(data.get("entries"), list):
        return None
    return data


def _same_folder(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def record_entries(folder: OutputFolder, run_dir: Path, names: Iterable[str], *, reset: bool = False) -> None:
    """Add ``names`` to the entries ``folder``'s marker lists as qing's (creating folder and marker)."""
    folder.path.mkdir(parents=True, exist_ok=True)
    marker = None if reset else read_marker(folder.path)
    entries = list(marker["entries"]) if marker else []
    entries += [name for name in names if name not in entries and name not in _OWN_FILES]
    data = {
        "qing": "run",
        "kind": folder.kind,
        "run": str(run_dir.resolve()),
        "version": __version__,
        "entries": sorted(entries),
    }
    write_text_atomic(folder.path / MARKER, json.dumps(data, indent=1) + "\n")


def _leftover_of(name: str, entries: set[str]) -> bool:
    """An interrupted atomic write of an entry: ``.<entry>.<random>.tmp`` or ``.<entry>.old-<random>``."""
    if not name.startswith("."):
        return False
    return any(name.startswith(f".{entry}.") and (name.endswith(".tmp") or ".old-" in name) for entry in entries)


@dataclass
class FolderState:
    """What an output folder holds, sorted by owner.

    Attributes:
        folder: The folder.
        ours: Entries qing wrote there for this run folder (present on disk).
        foreign: Entries qing did not write (or a whole folder it never marked).
        other_run: The run folder named by a marker of another run, else ``None``.
    """

    folder: OutputFolder
    ours: list[str]
    foreign: list[str]
    other_run: Optional[str] = None


def inspect_folder(folder: OutputFolder, run_dir: Path) -> FolderState:
    """Sort what ``folder`` holds into qing's entries of this run and everything else."""
    path = folder.path
    if not path.exists():
        return FolderState(folder, [], [])
    if not path.is_dir():
        return FolderState(folder, [], [path.name])
    marker = read_marker(path)
    names = sorted(p.name for p in path.iterdir() if p.name not in _OWN_FILES)
    if marker is None:
        if folder.kind == "run":  # a user's folder may hold anything; only the run's own file names collide
            return FolderState(folder, [], [n for n in names if n in folder.entries])
        return FolderState(folder, [], names)
    if not _same_folder(str(marker.get("run", "")), run_dir):
        return FolderState(folder, [], names, other_run=str(marker.get("run")))
    recorded = set(marker["entries"])
    ours = [n for n in names if n in recorded or _leftover_of(n, recorded)]
    foreign = [n for n in names if n not in ours and (folder.kind != "run" or n in folder.entries)]
    return FolderState(folder, ours, foreign)


def remove_entries(state: FolderState) -> None:
    """Delete qing's entries of a folder (files and folders it wrote), leaving everything else."""
    for name in state.ours:
        target = state.folder.path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


# ---- the lock --------------------------------------------------------------------------------------


class RunFolderLock:
    """An exclusive, non-blocking lock on a run folder, with a sidecar naming its holder.

    Args:
        run_dir: The run folder (created if needed).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._lock: Optional[filelock.BaseFileLock] = None
        self._created_lock_file = False

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunFolderBusyError` at once naming the holder."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunFolderError(f"the run folder {self.run_dir} is a file; give a folder")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._created_lock_file = not (self.run_dir / LOCK_FILE).exists()
        lock = filelock.FileLock(self.run_dir / LOCK_FILE, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise RunFolderBusyError(
                f"{self.run_dir} is in use by another run ({self.holder()}); wait for it to finish, or give this "
                "run another output folder"
            ) from None
        self._lock = lock
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python",
        }
        write_text_atomic(self.run_dir / OWNER_FILE, json.dumps(owner, indent=1) + "\n")

    def holder(self) -> str:
        """Who holds the lock, in words, from the sidecar file."""
        try:
            owner = json.loads((self.run_dir / OWNER_FILE).read_text(encoding="utf-8"))
            return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}: {owner.get('command', '?')}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"holder unknown: {self.run_dir / OWNER_FILE} is missing or unreadable"

    def release(self, *, refused: bool = False) -> None:
        """Release the lock (and remove the sidecar); a no-op when not held.

        Args:
            refused: The folder was refused (it holds files qing did not write): the lock file goes too
                when this lock created it, so a refused folder is left exactly as it was.
        """
        if self._lock is None:
            return
        (self.run_dir / OWNER_FILE).unlink(missing_ok=True)
        if refused and self._created_lock_file:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)  # still held: no other run can be using it
        self._lock.release()
        self._lock = None
