"""The split a run trained on, as a file list: ``splits.csv`` in the run folder.

One row per image: ``split`` (``train``/``val``/``test``), ``path`` (absolute, as read),
``relative_path`` (relative to the data folder: the class-folder root, or the folder the CSV / list
file paths start from; empty when the image lies elsewhere), ``patient`` and ``label`` (the class
name; for a multilabel task the positive labels joined with ``|``, empty for none). With it,
``qing eval RUN DATA --split test`` re-creates exactly the run's test set, and an evaluation on
images the run trained or validated on can say so.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from qing.data.builders import DataConfig, DataSplits

__all__ = ["SPLIT_RECORD", "RecordedImage", "data_folder", "read_split_record", "split_record_csv"]

#: File name of the split record in a run folder.
SPLIT_RECORD = "splits.csv"
_COLUMNS = ("split", "path", "relative_path", "patient", "label")
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RecordedImage:
    """One row of a split record.

    Attributes:
        split: ``train``, ``val`` or ``test``.
        path: The image as the run read it (absolute).
        relative_path: The image relative to the run's data folder (``None`` when outside it).
        patient: Patient id, if known.
        label: Class name, or for a multilabel task the positive labels joined with ``|``.
    """

    split: str
    path: Path
    relative_path: Optional[str]
    patient: Optional[str]
    label: str

    @property
    def labels(self) -> list[str]:
        """The positive labels of a multilabel row (``[]`` for none)."""
        return [name for name in self.label.split("|") if name]


def data_folder(cfg: DataConfig) -> Optional[Path]:
    """The folder a data source's image paths start from (``None`` for separate class folders)."""
    if cfg.root:
        return Path(cfg.root)
    for source in (cfg.labels_csv, cfg.train_list):
        if source:
            return Path(cfg.image_dir) if cfg.image_dir else Path(source).parent
    return None


def _relative(path: Path, base: Optional[Path]) -> str:
    if base is None:
        return ""
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return ""


def split_record_csv(splits: DataSplits, base: Optional[Union[str, os.PathLike]]) -> str:
    """The split record of ``splits`` as CSV text (see the module docs).

    Args:
        splits: What :func:`qing.data.load_splits` returned (after unreadable files were dropped).
        base: The data folder (:func:`data_folder`); relative paths are written against it.
    """
    base = Path(base) if base is not None else None
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_COLUMNS)
    for split in _SPLITS:
        for sample in getattr(splits, split):
            if splits.task == "multilabel":
                label = "|".join(name for name, v in zip(splits.class_names, sample.target) if v)
            else:
                label = splits.class_names[int(sample.target)]
            path = Path(sample.path)
            writer.writerow([split, str(path.resolve()), _relative(path, base), sample.patient or "", label])
    return buffer.getvalue()


def read_split_record(path: Union[str, os.PathLike], splits: Sequence[str] = _SPLITS) -> list[RecordedImage]:
    """The rows of a split record, those of ``splits`` only.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a split record (columns), or an unknown split name (the line is named).
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} is not a qing split record: no column(s) {', '.join(missing)}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if row["split"] not in _SPLITS:
                raise ValueError(f"{path}, line {line}: unknown split {row['split']!r} (expected {_SPLITS})")
            if row["split"] in splits:
                rows.append(
                    RecordedImage(
                        row["split"], Path(row["path"]), row["relative_path"] or None, row["patient"] or None,
                        row["label"] or "",
                    )
                )  # fmt: skip
    return rows
