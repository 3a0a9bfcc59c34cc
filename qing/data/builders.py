"""From a :class:`DataConfig` to checked train/val/test samples and datasets.

Sources (exactly one):

* ``root`` with ``train/<CLASS>/*`` and ``test/<CLASS>/*`` (optionally ``val/``), the original
  layout; or ``root/<CLASS>/*`` alone, split into train/val/test for you;
* ``train_dir``/``val_dir``/``test_dir`` class folders given one by one;
* ``labels_csv``: a path column plus a class-name column or 0/1 label columns (optionally a
  patient and a split column), e.g. the NIH ``labels.csv``;
* ``train_list``/``val_list``/``test_list``: ChestX-ray14 / CheXNet list files.

A missing validation split is taken from train (``val_fraction``), patient-grouped and
class-stratified; a missing test split is an error unless ``test_fraction`` is set (a lone
class folder or an unsplit CSV gets ``test_fraction=0.2`` by default). Every file is checked
before training: missing files are an error, unreadable ones are skipped and counted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from qing.data.dataset import BadFileLog, CXRDataset
from qing.data.image_io import ImageLoadError, check_image_header, load_image
from qing.data.samples import (
    NEGATIVE_CLASS_NAMES,
    PATIENT_REGEX_KERMANY,
    PATIENT_REGEX_NIH,
    Sample,
    patient_from_name,
    read_class_folders,
    read_label_csv,
    read_list_file,
)
from qing.data.splits import patient_overlap, split_by_patient
from qing.data.synthetic import PATIENT_REGEX_SYNTHETIC
from qing.data.transforms import ImageTransform

__all__ = ["PATIENT_REGEXES", "DataConfig", "DataSplits", "build_datasets", "load_splits", "resolve_patient_regex"]

_log = logging.getLogger("qing.data")

_SPLIT_NAMES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}  # fmt: skip

#: Named patient-id patterns ``patient_regex`` accepts instead of a pattern (``--patient-regex nih``).
PATIENT_REGEXES = {
    "PATIENT_REGEX_NIH": PATIENT_REGEX_NIH,
    "PATIENT_REGEX_KERMANY": PATIENT_REGEX_KERMANY,
    "PATIENT_REGEX_SYNTHETIC": PATIENT_REGEX_SYNTHETIC,
}


def resolve_patient_regex(value: Optional[str]) -> Optional[str]:
    """The pattern ``value`` names (``PATIENT_REGEX_NIH``, or just ``nih``, any case), else ``value`` itself.

    Raises:
        ValueError: ``value`` is neither a known name nor a valid regular expression.
    """
    if value is None:
        return None
    key = value.strip().upper()
    named = PATIENT_REGEXES.get(key) or PATIENT_REGEXES.get(f"PATIENT_REGEX_{key}")
    if named is not None:
        return named
    try:
        re.compile(value)
    except re.error as e:
        names = ", ".join(PATIENT_REGEXES)
        raise ValueError(f"patient_regex {value!r} is not a regular expression ({e}) nor one of {names}") from e
    return value


@dataclass
class DataConfig:
    """Where the images and labels are, how to split them, and how to read and augment them.

    Attributes:
        root: Folder with ``train/`` + ``test/`` (+ optional ``val/``) class folders, or with
            class folders only (then split into train/val/test).
        train_dir: Class folders for training (instead of ``root``).
        val_dir: Class folders for validation (default: taken from train).
        test_dir: Class folders for testing.
        labels_csv: CSV with one row per image.
        image_dir: Folder the CSV / list-file paths are relative to (default: the file's folder).
        path_column: CSV column with the image path.
        label_column: CSV column with a class name (binary/multiclass), or with ``|``-separated
            findings (multi-label, e.g. NIH's ``Finding Labels``: ``Atelectasis|Effusion``, ``No Finding``).
        label_columns: CSV 0/1 columns (multi-label); default: every all-0/1 column.
        label_separator: Separator of the findings in ``label_column``; default: ``|`` when a value
            holds one or the column is ``Finding Labels``.
        split_column: CSV column with ``train``/``val``(``valid``)/``test`` per row.
        train_list: ChestX-ray14 list file (``image_name l1 ... lK``) for training.
        val_list: List file for validation.
        test_list: List file for testing.
        label_names: Names of the list-file label columns (default: the 14 ChestX-ray14 labels), or
            the findings of a separated ``label_column`` in output order (default: those found).
        patient_column: CSV column with the patient id (keeps a patient on one side of a split).
        patient_regex: Or a pattern taking the patient id from the file name (group ``patient``),
            or the name of a known one: ``nih`` (``00000005_001.png`` -> ``00000005``), ``kermany``
            (``person102_virus_189.jpeg`` -> ``person102``), ``synthetic``; ``PATIENT_REGEX_NIH``
            etc. work too.
        val_fraction: Share of train held out for validation when there is no validation split
            (the original ``VALIDATION_SPLIT``).
        test_fraction: Share held out for testing when there is no test split.
        split_seed: Seed of the train/val/test splits.
        task: ``"auto"``, ``"binary"``, ``"multiclass"`` or ``"multilabel"``. Auto: two classes ->
            binary (one logit), more -> multiclass, 0/1 label columns -> multilabel.
        positive_class: The positive class of a binary task (default: the class that is not
            ``NORMAL``/``No Finding``, else the second in sorted order).
        verify_images: Decode every image before training (finds truncated files up front);
            by default only headers are checked and truncated files are skipped when met.
        cache_images: Keep decoded, resized images in memory (epochs after the first skip decoding).
        num_workers: DataLoader worker processes.
        rotation: Augmentation: maximum rotation in degrees.
        translate: Augmentation: maximum shift as a fraction of the size.
        scale: Augmentation: zoom range.
        hflip_prob: Augmentation: horizontal flip probability (0 = off, the default for anatomy).
    """

    root: Optional[str] = None
    train_dir: Optional[str] = None
    val_dir: Optional[str] = None
    test_dir: Optional[str] = None
    labels_csv: Optional[str] = None
    image_dir: Optional[str] = None
    path_column: str = "path"
    label_column: Optional[str] = None
    label_columns: Optional[list[str]] = None
    label_separator: Optional[str] = None
    split_column: Optional[str] = None
    train_list: Optional[str] = None
    val_list: Optional[str] = None
    test_list: Optional[str] = None
    label_names: Optional[list[str]] = None
    patient_column: Optional[str] = None
    patient_regex: Optional[str] = None
    val_fraction: float = 0.2
    test_fraction: Optional[float] = None
    split_seed: int = 42
    task: str = "auto"
    positive_class: Optional[str] = None
    verify_images: bool = False
    cache_images: bool = False
    num_workers: int = 0
    rotation: float = 10.0
    translate: float = 0.05
    scale: tuple[float, float] = (0.9, 1.1)
    hflip_prob: float = 0.0

    def __post_init__(self) -> None:
        self.scale = tuple(self.scale)
        self.patient_regex = resolve_patient_regex(self.patient_regex)
        if self.task not in ("auto", "binary", "multiclass", "multilabel"):
            raise ValueError(f"task must be auto, binary, multiclass or multilabel, got {self.task!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.test_fraction is not None and not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")


@dataclass
class DataSplits:
    """Checked samples per split and what they mean.

    Attributes:
        train: Training samples.
        val: Validation samples.
        test: Test samples.
        task: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        label_names: One name per model output (binary: the positive class only).
        class_names: Binary/multiclass: all class names in target order; multilabel: the labels.
        bad_files: Files skipped as unreadable.
        source: Where the data came from, in words.
    """

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    task: str
    label_names: list[str]
    class_names: list[str]
    bad_files: BadFileLog = field(default_factory=BadFileLog)
    source: str = ""

    @property
    def num_outputs(self) -> int:
        """Model outputs: 1 for binary, else the number of classes/labels."""
        return len(self.label_names)


# ---- reading the sources -------------------------------------------------------------------------

_Raw = list[tuple[Path, Union[str, tuple[int, ...]], Optional[str]]]  # (path, class name or 0/1s, patient)


def _folders(folder: Union[str, Path], patient_regex: Optional[str]) -> _Raw:
    items, _ = read_class_folders(folder)
    return [(p, name, patient_from_name(p, patient_regex) if patient_regex else None) for p, name in items]


def _find_split_dir(root: Path, names: Sequence[str]) -> Optional[Path]:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _read_sources(cfg: DataConfig) -> tuple[dict[str, _Raw], str, bool, Optional[list[str]]]:
    """Raw items per split found in the sources; returns (splits, description, single_source, names)."""
    sources = {"root": cfg.root, "train_dir": cfg.train_dir, "labels_csv": cfg.labels_csv, "train_list": cfg.train_list}
    given = [name for name, value in sources.items() if value]
    if len(given) != 1:
        raise ValueError(
            "give exactly one data source: root (class folders), train_dir, labels_csv or train_list; "
            f"got {given or 'none'}"
        )
    regex = resolve_patient_regex(cfg.patient_regex)
    if cfg.patient_column and not cfg.labels_csv:
        raise ValueError("patient_column needs labels_csv; for image folders use patient_regex")

    if cfg.root:
        root = Path(cfg.root)
        if root.is_file():
            use = "labels_csv" if root.suffix.lower() == ".csv" else "train_list (a list file) or labels_csv"
            raise ValueError(f"root is a file, not a folder of class folders: {root}; use {use}={str(root)!r}")
        if not root.is_dir():
            raise FileNotFoundError(f"data root not found: {root}")
        train = _find_split_dir(root, ("train", "training"))
        test = _find_split_dir(root, ("test", "testing"))
        val = _find_split_dir(root, ("val", "valid", "validation"))
        if train is None:
            if test is not None or val is not None:
                raise FileNotFoundError(f"{root} has test/val folders but no train folder ({root}/train/<CLASS>)")
            return {"all": _folders(root, regex)}, f"class folders in {root}", True, None
        splits = {"train": _folders(train, regex)}
        if val is not None:
            splits["val"] = _folders(val, regex)
        if test is not None:
            splits["test"] = _folders(test, regex)
        return splits, f"class folders in {root}", False, None

    if cfg.train_dir:
        splits = {"train": _folders(cfg.train_dir, regex)}
        for name, folder in (("val", cfg.val_dir), ("test", cfg.test_dir)):
            if folder:
                splits[name] = _folders(folder, regex)
        return splits, f"class folders {cfg.train_dir}", False, None

    if cfg.labels_csv:
        rows, names = read_label_csv(
            cfg.labels_csv,
            image_dir=cfg.image_dir,
            path_column=cfg.path_column,
            label_column=cfg.label_column,
            label_columns=cfg.label_columns,
            label_separator=cfg.label_separator,
            label_names=cfg.label_names,
            patient_column=cfg.patient_column,
            patient_regex=regex,
            split_column=cfg.split_column,
        )
        multilabel_names = names if rows and isinstance(rows[0].labels, tuple) else None
        if not cfg.split_column:
            return {"all": [(r.path, r.labels, r.patient) for r in rows]}, f"{cfg.labels_csv}", True, multilabel_names
        splits: dict[str, _Raw] = {}
        for r in rows:
            split = _SPLIT_NAMES.get(r.split.lower()) if r.split else None
            if split is None:
                raise ValueError(
                    f"{cfg.labels_csv}: split column {cfg.split_column!r} has value {r.split!r} for {r.path}; "
                    f"expected one of {sorted(_SPLIT_NAMES)}"
                )
            splits.setdefault(split, []).append((r.path, r.labels, r.patient))
        return splits, f"{cfg.labels_csv}", False, multilabel_names

    splits, names = {}, None
    for name, list_file in (("train", cfg.train_list), ("val", cfg.val_list), ("test", cfg.test_list)):
        if list_file:
            samples, names = read_list_file(
                list_file, image_dir=cfg.image_dir, label_names=cfg.label_names, patient_regex=regex
            )
            splits[name] = [(s.path, s.target, s.patient) for s in samples]
    return splits, f"list file {cfg.train_list}", False, names


def _resolve_task(cfg: DataConfig, splits: dict[str, _Raw], multilabel_names: Optional[list[str]]):
    """(task, class_names, label_names, encode) for the raw labels."""
    if multilabel_names is not None:
        n = len(multilabel_names)
        task = cfg.task if cfg.task != "auto" else ("binary" if n == 1 else "multilabel")
        if task == "multiclass" or (task == "binary" and n != 1):
            raise ValueError(f"task={task!r} does not fit {n} 0/1 label column(s); use multilabel")
        return task, list(multilabel_names), list(multilabel_names), lambda labels: labels[0] if n == 1 else labels
    classes = sorted({labels for raw in splits.values() for _, labels, _ in raw})
    if len(classes) < 2:
        raise ValueError(f"found only one class {classes}; a classifier needs at least two")
    for name, raw in splits.items():
        missing = sorted(set(classes) - {labels for _, labels, _ in raw})
        if name in ("train", "all") and missing:
            raise ValueError(f"the {name} split has no images of class(es) {missing}")
    task = cfg.task if cfg.task != "auto" else ("binary" if len(classes) == 2 else "multiclass")
    if task == "multilabel":
        raise ValueError("task='multilabel' needs 0/1 label columns (labels_csv with label_columns, or list files)")
    if task == "binary":
        if len(classes) != 2:
            raise ValueError(f"task='binary' needs exactly two classes, found {len(classes)}: {classes}")
        positive = cfg.positive_class or next(
            (c for c in classes if classes[1 - classes.index(c)].lower() in NEGATIVE_CLASS_NAMES), classes[1]
        )
        if positive not in classes:
            raise ValueError(f"positive_class {positive!r} is not one of the classes {classes}")
        ordered = [c for c in classes if c != positive] + [positive]
        return task, ordered, [positive], lambda labels: int(labels == positive)
    if cfg.positive_class:
        raise ValueError("positive_class only applies to task='binary'")
    return task, classes, classes, classes.index


# ---- checks ---------------------------------------------------------------------------------------


def _check_files(samples: list[Sample], *, decode: bool, bad_files: BadFileLog, threads: int = 8) -> list[Sample]:
    """Drop (and record) unreadable files; missing files are an error."""

    def check(sample: Sample) -> Optional[str]:
        try:
            if decode:
                load_image(sample.path, channels=1)
            else:
                check_image_header(sample.path)
        except ImageLoadError as e:
            return e.reason
        return None

    with ThreadPoolExecutor(threads) as pool:
        reasons = list(pool.map(check, samples))
    for sample, reason in zip(samples, reasons):
        if reason is not None:
            bad_files.add(str(sample.path), reason)
    return [s for s, r in zip(samples, reasons) if r is None]


def load_splits(cfg: DataConfig) -> DataSplits:
    """Read, label, split and check the data described by ``cfg`` (no pixels decoded unless asked).

    Returns:
        A :class:`DataSplits` with non-empty train, val and test samples.

    Raises:
        FileNotFoundError: A folder, label file or named image is missing.
        ValueError: Empty class folders, a missing split, inconsistent labels, too few images to split.
    """
    raw, source, single, multilabel_names = _read_sources(cfg)
    task, class_names, label_names, encode = _resolve_task(cfg, raw, multilabel_names)

    def to_samples(items: _Raw) -> list[Sample]:
        return [Sample(path, encode(labels), patient) for path, labels, patient in items]

    samples = {name: to_samples(items) for name, items in raw.items()}
    test_fraction = cfg.test_fraction if cfg.test_fraction is not None else (0.2 if single else 0.0)
    pool = samples.pop("all", None)
    if pool is not None:
        if not test_fraction:
            raise ValueError(f"{source} is not split into train/test; set test_fraction > 0 to split it")
        samples["train"], samples["test"] = split_by_patient(pool, test_fraction, seed=cfg.split_seed)
    if "train" not in samples:
        raise ValueError(f"{source} has no training split")
    if "test" not in samples:
        if not test_fraction:
            raise FileNotFoundError(
                f"{source} has no test split: add test/<CLASS> folders (or test_dir/test_list/test rows), "
                "or set test_fraction to hold out part of train"
            )
        samples["train"], samples["test"] = split_by_patient(samples["train"], test_fraction, seed=cfg.split_seed)
    if "val" not in samples:
        if not cfg.val_fraction:
            raise ValueError(f"{source} has no validation split; set val_fraction > 0 to hold out part of train")
        samples["train"], samples["val"] = split_by_patient(samples["train"], cfg.val_fraction, seed=cfg.split_seed)

    bad_files = BadFileLog()
    for name in ("train", "val", "test"):
        samples[name] = _check_files(samples[name], decode=cfg.verify_images, bad_files=bad_files)
        if not samples[name]:
            raise ValueError(f"the {name} split of {source} has no readable images")
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = patient_overlap(samples[a], samples[b])
        if shared:
            _log.warning(
                "%d patient(s) have images in both %s and %s (e.g. %s): metrics may be optimistic",
                len(shared), a, b, sorted(shared)[:3],
            )  # fmt: skip
    _log.info(
        "%s: %s task, %d train / %d val / %d test images, outputs %s, %d unreadable skipped",
        source, task, len(samples["train"]), len(samples["val"]), len(samples["test"]), label_names, len(bad_files),
    )  # fmt: skip
    return DataSplits(
        samples["train"], samples["val"], samples["test"], task, label_names, class_names, bad_files, source
    )


def build_datasets(
    splits: DataSplits,
    *,
    train_transform: ImageTransform,
    eval_transform: ImageTransform,
    cache: bool = False,
    preload: bool = True,
) -> dict[str, CXRDataset]:
    """One :class:`CXRDataset` per split (training augmentation on train only).

    Args:
        splits: From :func:`load_splits`.
        train_transform: ``build_transforms(model, train=True, ...)``.
        eval_transform: ``build_transforms(model, train=False)``.
        cache: In-memory cache of decoded, resized images.
        preload: With ``cache``, fill the caches now (unreadable files found are added to
            ``splits.bad_files`` and dropped from the datasets).

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``.
    """
    if train_transform.input_size != eval_transform.input_size:
        raise ValueError(f"train/eval input sizes differ: {train_transform.input_size} vs {eval_transform.input_size}")
    datasets: dict[str, Any] = {}
    for name in ("train", "val", "test"):
        transform = train_transform if name == "train" else eval_transform
        dataset = CXRDataset(getattr(splits, name), task=splits.task, transform=transform, cache=cache)
        if cache and preload:
            bad = dataset.preload()
            for b in bad:
                splits.bad_files.add(b.path, b.reason)
            if bad:
                dataset.drop([b.index for b in bad])
                setattr(splits, name, list(dataset.samples))
        datasets[name] = dataset
    return datasets
