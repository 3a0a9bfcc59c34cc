"""Patient-grouped, label-stratified splits: no patient's images on both sides."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from qing.data.samples import Sample

__all__ = ["patient_overlap", "split_by_patient"]


def _stratum(sample: Sample) -> int:
    """Class index, or for multi-label targets 1 if any label is positive (normal vs abnormal)."""
    return int(any(sample.target)) if isinstance(sample.target, tuple) else int(sample.target)


def _group(sample: Sample, index: int) -> str:
    return f"patient:{sample.patient}" if sample.patient is not None else f"image:{index}"


def split_by_patient(
    samples: Sequence[Sample], fraction: float, *, seed: int = 0, stratify: bool = True
) -> tuple[list[Sample], list[Sample]]:
    """Split off about ``fraction`` of the samples, whole patients at a time.

    Patients (samples with the same ``patient``; a sample without one is its own group) are
    shuffled with ``seed`` and taken into the split-off part while that brings its size closer
    to ``fraction`` of the samples. With ``stratify`` this runs per class (multi-label: normal
    vs any finding; a patient counts in its most frequent class), so both parts keep the class
    balance. scikit-learn's ``StratifiedGroupKFold`` only splits into ``1/k`` folds, hence this.

    Args:
        samples: The samples to split.
        fraction: Share of samples for the second part, in ``(0, 1)``.
        seed: Shuffling seed; the same seed gives the same split.
        stratify: Keep the class balance in both parts.

    Returns:
        ``(rest, split_off)``, each in the input order.

    Raises:
        ValueError: ``fraction`` out of range, or too few patients to give both parts a sample.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        groups[_group(sample, i)].append(i)
    strata: dict[int, list[str]] = defaultdict(list)
    for key in sorted(groups):
        counts = Counter(_stratum(samples[i]) for i in groups[key]) if stratify else Counter([0])
        strata[min(counts, key=lambda c: (-counts[c], c))].append(key)

    rng = np.random.default_rng(seed)
    taken: set[int] = set()
    for stratum in sorted(strata):
        keys = strata[stratum]
        order = rng.permutation(len(keys))
        goal = fraction * sum(len(groups[k]) for k in keys)
        size = 0
        for j in order:
            members = groups[keys[j]]
            if abs(size + len(members) - goal) < abs(size - goal):
                taken.update(members)
                size += len(members)
    if not taken or len(taken) == len(samples):
        raise ValueError(
            f"cannot split {len(samples)} images of {len(groups)} patient(s) with fraction {fraction}: "
            "one side would be empty; add images or change the fraction"
        )
    rest = [s for i, s in enumerate(samples) if i not in taken]
    split_off = [s for i, s in enumerate(samples) if i in taken]
    return rest, split_off


def patient_overlap(a: Sequence[Sample], b: Sequence[Sample]) -> set[str]:
    """Patient ids found in both ``a`` and ``b`` (samples without a patient id are ignored)."""
    return {s.patient for s in a if s.patient is not None} & {s.patient for s in b if s.patient is not None}
