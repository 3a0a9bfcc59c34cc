"""How the trainer's messages name a setting: ``resume=True`` in Python, ``--resume`` from the shell.

The same :class:`~qing.train.Trainer` runs under Python, ``qing train`` and ``python -m qing.train``;
a message that tells the user what to change must name the setting the way they give it. The trainer
writes :func:`option` wherever a message names a setting, and each front end sets its style for the
duration of a run with :func:`option_style`::

    >>> option("resume", True), option("lr", 0.001)
    ('resume=True', 'lr=0.001')
    >>> with option_style("cli"):
    ...     option("resume", True), option("pretrained", False), option("lr", 0.001), option("data.val_fraction", 0.1)
    ('--resume', '--no-pretrained', '--lr 0.001', '--set data.val_fraction=0.1')
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

__all__ = ["STYLES", "current_style", "option", "option_style"]

#: ``python``: ``name=value`` (``TrainConfig`` fields); ``cli``: ``qing train`` flags; ``script``:
#: ``python -m qing.train`` (``--resume``, else ``--set name=value``).
STYLES = ("python", "cli", "script")

_UNSET = object()
_STYLE: contextvars.ContextVar[str] = contextvars.ContextVar("qing_option_style", default="python")


@contextlib.contextmanager
def option_style(style: str) -> Iterator[None]:
    """Name settings in ``style`` (one of :data:`STYLES`) inside the block (per thread and task)."""
    if style not in STYLES:
        raise ValueError(f"option style must be one of {STYLES}, got {style!r}")
    token = _STYLE.set(style)
    try:
        yield
    finally:
        _STYLE.reset(token)


def current_style() -> str:
    """The style settings are named in now (one of :data:`STYLES`; ``python`` outside :func:`option_style`)."""
    return _STYLE.get()


def _yaml_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def option(name: str, value: Any = _UNSET) -> str:
    """A ``TrainConfig`` setting as the current front end spells it.

    Args:
        name: A ``TrainConfig`` field, or ``data.<field>`` for a ``DataConfig`` field.
        value: The value to suggest; left out, just the setting's name (``--output-dir``, ``output_dir``).

    Returns:
        ``name=value`` (Python), ``--name VALUE`` / ``--name`` / ``--no-name`` (``qing train``),
        ``--resume`` or ``--set name=value`` (``python -m qing.train``).
    """
    style = _STYLE.get()
    if style == "python":
        return name if value is _UNSET else f"{name}={value!r}"
    if name == "resume" and value is True:
        return "--resume"
    if style == "script" or "." in name:
        return f"--set {name}" if value is _UNSET else f"--set {name}={_yaml_text(value)}"
    flag = "--" + name.replace("_", "-")
    if value is _UNSET:
        return flag
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {_yaml_text(value)}"
