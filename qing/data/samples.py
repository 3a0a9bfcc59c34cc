"""Labelled samples and the readers that find them: class folders, list files, label CSVs.

A reader turns files on disk into :class:`Sample` records (path, target, patient) and the label
names; it checks that every file it names exists and says which do not. Nothing is decoded here.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from qing.data.image_io import scan_folder
from qing.weights import CXR14_LABELS  # the list files' label order

__all__ = [
    "NEGATIVE_CLASS_NAMES",
    "NIH_FINDINGS_COLUMN",
    "PATIENT_REGEX_KERMANY",
    "PATIENT_REGEX_NIH",
    "CsvRow",
    "Sample",
    "patient_from_name",
    "read_class_folders",
    "read_label_csv",
    "read_list_file",
]

PathLike = Union[str, os.PathLike]

_log = logging.getLogger("qing.data")

#: Patient id in NIH ChestX-ray14 file names: ``00000005_001.png`` -> ``00000005``.
PATIENT_REGEX_NIH = r"^(?P<patient>\d+)_\d+"
#: Patient id in the Kermany pediatric pneumonia file names: ``person102_virus_189.jpeg`` ->
#: ``person102``; ``NORMAL2-IM-1258-0001-0002.jpeg`` -> ``NORMAL2-IM-1258``.
PATIENT_REGEX_KERMANY = r"^(?P<patient>person\d+|(?:NORMAL2-)?IM-\d+)"


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes:
        path: The image file.
        target: Class index (binary: 1 = the positive class; multiclass: index into the class
            names) or, for multi-label data, a tuple of 0/1 per label.
        patient: Patient id used to keep a patient's images on one side of a split, or ``None``.
    """

    path: Path
    target: Union[int, tuple[int, ...]]
    patient: Optional[str] = None


def patient_from_name(path: PathLike, pattern: Union[str, re.Pattern]) -> str:
    """Patient id from a file name with ``pattern`` (``re.search`` on the name).

    The id is the group named ``patient``, else group 1, else the whole match.

    Raises:
        ValueError: The pattern does not match the file name.
    """
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    name = os.path.basename(path)
    match = regex.search(name)
    if match is None:
        raise ValueError(f"patient_regex {regex.pattern!r} does not match the file name {name!r} ({path})")
    if "patient" in regex.groupindex:
        return match.group("patient")
    return match.group(1) if regex.groups else match.group(0)


def read_class_folders(root: PathLike) -> tuple[list[tuple[Path, str]], list[str]]:
    """Images in ``root/<CLASS>/**`` with their class names.

    Args:
        root: A folder with one subfolder per class (the original ``data/train`` layout).

    Returns:
        ``(items, class_names)``: ``(path, class_name)`` pairs and the sorted class names.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: No class subfolders, or a class folder without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class subfolders; expected {root}/<CLASS>/<image files>")
    items: list[tuple[Path, str]] = []
    empty, not_images = [], []
    for name in classes:
        scan = scan_folder(root / name)
        if not scan.images:
            empty.append(name)
        items.extend((f, name) for f in scan.images)
        not_images.extend(scan.not_images)
    if empty:
        raise ValueError(
            f"class folder(s) without images in {root}: {', '.join(empty)}; "
            f"add images or remove the folder (image endings: .png, .jpg, .dcm, ...)"
        )
    if not_images:
        shown = ", ".join(str(p) for p in not_images[:3]) + (", ..." if len(not_images) > 3 else "")
        _log.warning("%d file(s) in %s are not images and are not used: %s", len(not_images), root, shown)
    return items, classes


def _missing_files_error(paths: Sequence[Path], source: PathLike) -> FileNotFoundError:
    shown = ", ".join(str(p) for p in paths[:5])
    more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
    return FileNotFoundError(f"{len(paths)} image(s) named in {source} do not exist: {shown}{more}")


def read_list_file(
    list_file: PathLike,
    *,
    image_dir: Optional[PathLike] = None,
    label_names: Optional[Sequence[str]] = None,
    patient_regex: Optional[str] = None,
) -> tuple[list[Sample], list[str]]:
    """A ChestX-ray14 / CheXNet list file: one ``image_name l1 ... lK`` line per image (0/1 labels).

    Args:
        list_file: The text file (blank lines and ``#`` comments are skipped).
        image_dir: Folder the image names are relative to (default: the list file's folder).
        label_names: Names of the K label columns; defaults to the 14 ChestX-ray14 labels when K == 14.
        patient_regex: Pattern taking the patient id from each file name (see ``patient_from_name``).

    Returns:
        ``(samples, label_names)``, multi-label targets.

    Raises:
        ValueError: Inconsistent label counts, labels other than 0/1, or unknown label names.
        FileNotFoundError: The list file or images it names are missing.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"list file not found: {list_file}")
    image_dir = Path(image_dir) if image_dir is not None else list_file.parent
    samples, missing = [], []
    n_labels = None
    for line_no, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        name, values = fields[0], fields[1:]
        if n_labels is None:
            n_labels = len(values)
            if n_labels == 0:
                raise ValueError(f"{list_file}:{line_no}: expected 'image_name l1 ... lK', got {line.strip()!r}")
        if len(values) != n_labels or any(v not in ("0", "1") for v in values):
            raise ValueError(
                f"{list_file}:{line_no}: expected {n_labels} labels of 0/1 after the image name, got {values}"
            )
        path = image_dir / name
        if not path.is_file():
            missing.append(path)
        patient = patient_from_name(path, patient_regex) if patient_regex else None
        samples.append(Sample(path, tuple(int(v) for v in values), patient))
    if not samples:
        raise ValueError(f"list file {list_file} names no images")
    if missing:
        raise _missing_files_error(missing, list_file)
    if label_names is None:
        if n_labels != len(CXR14_LABELS):
            raise ValueError(f"{list_file} has {n_labels} label columns; pass label_names with {n_labels} names")
        label_names = CXR14_LABELS
    if len(label_names) != n_labels:
        raise ValueError(f"{len(label_names)} label_names for {n_labels} label columns in {list_file}")
    return samples, list(label_names)


@dataclass(frozen=True)
class CsvRow:
    """One row of a label CSV: image path, label(s), patient and split (as written in the file).

    ``labels`` is the class name for a class-name column, else a tuple of 0/1 per label (0/1 columns,
    or a column of separated findings such as NIH's ``Finding Labels``).
    """

    path: Path
    labels: Union[str, tuple[int, ...]]
    patient: Optional[str]
    split: Optional[str]


#: NIH ChestX-ray14's column of ``|``-separated findings (``Data_Entry_2017.csv``).
NIH_FINDINGS_COLUMN = "Finding Labels"

#: Class names meaning "no finding": the negative class of a binary task, and all-zero in a column of
#: separated findings (NIH's ``Finding Labels`` writes ``No Finding``). Compared case-insensitively.
NEGATIVE_CLASS_NAMES = ("normal", "no finding", "no_finding", "negative", "healthy")


def _read_csv_records(csv_file: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line number, {column: value})`` records; a BOM is dropped, field counts are checked."""
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            if not any(header):
                raise ValueError(f"label CSV {csv_file} has no header row; the first line must name the columns")
            records = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                if len(row) != len(header):
                    raise ValueError(
                        f"{csv_file}:{reader.line_num}: {len(row)} field(s) but the header has {len(header)} "
                        f"({', '.join(header)}); fix the missing or extra comma on that line"
                    )
                records.append((reader.line_num, dict(zip(header, row))))
    except UnicodeDecodeError as e:
        raise ValueError(f"label CSV {csv_file} is not UTF-8 text ({e}); save it as UTF-8") from e
    return header, records


def _looks_separated(column: str, values: Sequence[str]) -> bool:
    """NIH's ``Finding Labels`` column, or any column with ``|`` in a value."""
    return column == NIH_FINDINGS_COLUMN or any("|" in v for v in values)


def _finding_names(
    values: Sequence[tuple[int, str]], separator: str, csv_file: Path, column: str, label_names: Optional[Sequence[str]]
) -> tuple[list[str], list[tuple[int, ...]]]:
    """Labels and 0/1 tuples from separated findings (``"Atelectasis|Effusion"``; ``"No Finding"`` = none)."""
    parsed: list[list[str]] = []
    for line_no, value in values:
        findings = [f.strip() for f in value.split(separator)]
        if not value.strip() or any(not f for f in findings):
            raise ValueError(f"{csv_file}:{line_no}: empty finding in {column!r} value {value!r}")
        negatives = [f for f in findings if f.lower() in NEGATIVE_CLASS_NAMES]
        if negatives and len(findings) > 1:
            raise ValueError(f"{csv_file}:{line_no}: {negatives[0]!r} together with findings in {value!r}")
        parsed.append([] if negatives else findings)
    found = {f for findings in parsed for f in findings}
    if label_names is None:
        if not found:
            raise ValueError(f"{column!r} in {csv_file} lists no finding in any row (all 'No Finding')")
        label_names = [n for n in CXR14_LABELS if n in found] if found <= set(CXR14_LABELS) else sorted(found)
    unknown = sorted(found - set(label_names))
    if unknown:
        raise ValueError(f"{column!r} in {csv_file} has finding(s) {unknown} not in label_names {list(label_names)}")
    index = {name: i for i, name in enumerate(label_names)}
    targets = []
    for findings in parsed:
        target = [0] * len(label_names)
        for f in findings:
            target[index[f]] = 1
        targets.append(tuple(target))
    return list(label_names), targets


def read_label_csv(
    csv_file: PathLike,
    *,
    image_dir: Optional[PathLike] = None,
    path_column: str = "path",
    label_column: Optional[str] = None,
    label_columns: Optional[Sequence[str]] = None,
    label_separator: Optional[str] = None,
    label_names: Optional[Sequence[str]] = None,
    patient_column: Optional[str] = None,
    patient_regex: Optional[str] = None,
    split_column: Optional[str] = None,
) -> tuple[list[CsvRow], list[str]]:
    """Rows of a label CSV: class names in one column, separated findings in one column, or 0/1 columns.

    Give ``label_column`` (e.g. ``label`` with values ``NORMAL``/``PNEUMONIA``) or ``label_columns``
    (multi-label, as the NIH ``labels.csv``); with neither, every column whose values are all 0/1
    (other than the path, patient and split columns) is a label column. A ``label_column`` whose
    values hold ``|``, or that is named ``Finding Labels`` (NIH's native column: ``Atelectasis|Effusion``,
    ``No Finding``), is read as multi-label: one output per finding, ``No Finding``/``Normal`` = all zero.

    Args:
        csv_file: The CSV file (UTF-8, a byte-order mark is fine; header row required).
        image_dir: Folder the paths are relative to (default: the CSV's folder).
        path_column: Column with the image path.
        label_column: Column with a class name, or with separated findings, per row.
        label_columns: 0/1 label columns, in output order.
        label_separator: Separator of findings in ``label_column``; default: ``|`` when a value holds one.
        label_names: Findings of a separated column, in output order (default: those found, in
            ChestX-ray14 order when they are ChestX-ray14 findings, else sorted).
        patient_column: Column with the patient id.
        patient_regex: Or a pattern taking the patient id from the file name.
        split_column: Column assigning rows to ``train``/``val``/``test``.

    Returns:
        ``(rows, label_names)``; ``label_names`` are the sorted class names for a class-name column,
        else the labels in output order.

    Raises:
        ValueError: Unknown columns, a line with the wrong number of fields, non-0/1 values, empty values.
        FileNotFoundError: The CSV or images it names are missing.
    """
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise FileNotFoundError(f"label CSV not found: {csv_file}")
    if label_column and label_columns:
        raise ValueError("give label_column (class names) or label_columns (0/1 columns), not both")
    if label_separator is not None and not label_column:
        raise ValueError("label_separator needs label_column (the column of separated findings)")
    image_dir = Path(image_dir) if image_dir is not None else csv_file.parent
    header, records = _read_csv_records(csv_file)
    if not records:
        raise ValueError(f"label CSV {csv_file} has no rows")
    named = [c for c in (path_column, label_column, patient_column, split_column) if c] + list(label_columns or [])
    unknown = [c for c in named if c not in header]
    if unknown:
        raise ValueError(f"column(s) {unknown} not in {csv_file}; its columns are {header}")
    if not label_column and not label_columns:
        reserved = {path_column, patient_column, split_column}
        label_columns = [c for c in header if c not in reserved and all(r[c].strip() in ("0", "1") for _, r in records)]
        if not label_columns:
            raise ValueError(f"no 0/1 label columns found in {csv_file}; pass label_column or label_columns")

    separator = label_separator
    if separator is None and label_column and _looks_separated(label_column, [r[label_column] for _, r in records]):
        separator = "|"
    findings: Optional[list[tuple[int, ...]]] = None
    if separator:
        values = [(line_no, r[label_column]) for line_no, r in records]
        names, findings = _finding_names(values, separator, csv_file, label_column, label_names)

    rows, missing = [], []
    for i, (line_no, record) in enumerate(records):
        name = record[path_column].strip()
        if not name:
            raise ValueError(f"{csv_file}:{line_no}: empty {path_column!r}")
        path = image_dir / name
        if not path.is_file():
            missing.append(path)
        if findings is not None:
            labels: Union[str, tuple[int, ...]] = findings[i]
        elif label_column:
            labels = record[label_column].strip()
            if not labels:
                raise ValueError(f"{csv_file}:{line_no}: empty {label_column!r}")
        else:
            raw = [record[c].strip() for c in label_columns]
            bad = [(c, v) for c, v in zip(label_columns, raw) if v not in ("0", "1")]
            if bad:
                raise ValueError(f"{csv_file}:{line_no}: label columns must be 0 or 1, got {bad}")
            labels = tuple(int(v) for v in raw)
        if patient_column:
            patient = record[patient_column].strip() or None
        else:
            patient = patient_from_name(path, patient_regex) if patient_regex else None
        split = record[split_column].strip() if split_column else None
        rows.append(CsvRow(path, labels, patient, split))
    if missing:
        raise _missing_files_error(missing, csv_file)
    if findings is None:
        names = sorted({r.labels for r in rows}) if label_column else list(label_columns)
    return rows, names
