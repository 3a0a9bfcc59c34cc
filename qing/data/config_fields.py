"""Type checks of configuration dataclasses (``DataConfig``, ``TrainConfig``) against their annotations.

Values come from YAML, JSON, ``--set key=value`` and Python, and YAML is loose with numbers: PyYAML
reads ``1e-4`` (no decimal point) as the *string* ``"1e-4"``. :func:`check_fields` turns such strings
into the number the field expects and rejects a value of the wrong type with the field's name, so a
config error is a message, not a ``TypeError`` deep in training.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Run:
    ...     lr: float = 0.1
    ...     epochs: int = 3
    >>> run = Run(lr="1e-4", epochs="5")
    >>> check_fields(run, "run"); run
    Run(lr=0.0001, epochs=5)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Union

__all__ = ["check_fields", "check_value"]

_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")


class _Mismatch(ValueError):
    """A value that does not fit a type (the caller names the field)."""


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return "any value"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin in (list, tuple) and args:
        if origin is tuple and Ellipsis not in args:
            return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a text"}.get(hint, str(hint))


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
            return value.strip().lower() in _TRUE
        raise _Mismatch
    if hint is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
            try:
                value = float(value)
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # YAML reads a class named 1 as a number
            return str(value)
        raise _Mismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, args[0]) for v in value] if args else list(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if args and Ellipsis not in args:
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        return tuple(_coerce(v, args[0]) for v in value) if args else tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return dict(value)
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _Mismatch


def check_value(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the type ``hint`` asks for (numeric strings become numbers).

    Raises:
        ValueError: ``value`` does not fit; the message names ``name`` and the expected type.
    """
    try:
        return _coerce(value, hint)
    except _Mismatch:
        raise ValueError(f"{name} must be {_describe(hint)}, got {_shown(value)}") from None


def check_fields(obj: Any, where: str, *, skip: tuple[str, ...] = ()) -> None:
    """Check (and coerce in place) every field of the dataclass instance ``obj`` against its annotation.

    Args:
        obj: A dataclass instance.
        where: Prefix of the field names in messages (``"data"`` gives ``data.val_fraction``; ``""`` none).
        skip: Fields to leave alone (e.g. nested configs checked on their own).

    Raises:
        ValueError: A field holds a value of the wrong type (named, with the expected type).
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        checked = check_value(value, hints[f.name], f"{where}.{f.name}" if where else f.name)
        if checked is not value:
            object.__setattr__(obj, f.name, checked)
