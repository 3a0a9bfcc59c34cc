"""How numbers are shown to people: reports, model cards and the command line agree."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MISSING", "format_value"]

#: Shown where a metric has no value (AUROC of a label with one class, precision without positives).
MISSING = "undefined"


def format_value(value: Any, digits: int = 3) -> str:
    """``0.91234 -> "0.912"``; ints and strings as they are; ``None`` and NaN -> :data:`MISSING`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
