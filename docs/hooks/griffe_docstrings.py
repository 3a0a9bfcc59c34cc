"""griffe extension: docstrings written with Sphinx habits render as intended by mkdocstrings.

mkdocstrings renders docstrings as Markdown, so two common habits would show up broken:

- Sphinx roles (``:func:`load_checkpoint_file```, ``:class:`~qing.hub.ModelCard```) would print
  literally. They become cross-references (``[`load_checkpoint_file`][qing.weights.files.load_checkpoint_file]``)
  when the name resolves from the docstring's scope (the object, its parents, the package), and
  inline code otherwise.
- An ``Example:`` section holding doctest lines (``>>>``) would be read as an admonition of
  Markdown, where ``>>>`` makes nested quotes and ``x[6]`` a broken link. It is read as ``Examples:``,
  griffe's section for doctest code.

Loaded by mkdocstrings (``extensions`` in ``mkdocs.yml``); the source docstrings are not changed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj|const):`(?P<tilde>~?)(?P<name>[^`<>]+)`")
DOCTEST_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*\n(?=(?:[ \t]*\n)*[ \t]+>>>)", re.MULTILINE)


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    """``obj`` and every object defined below it (aliases skipped: their targets are visited)."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


def _lookup(pkg: griffe.Module, path: str) -> str | None:
    """The path mkdocstrings renders for ``path`` (an alias's target), or ``None`` if nothing is there."""
    if path == pkg.path:
        return path
    if not path.startswith(pkg.path + "."):
        return None
    try:
        found = pkg[path.removeprefix(pkg.path + ".")]
    except (KeyError, ValueError):
        return None
    if found.is_alias:
        try:
            target = found.final_target
        except griffe.AliasResolutionError:
            return None
        # a target in a private module is rendered under the public name only
        return path if any(part.startswith("_") for part in target.path.split(".")) else target.path
    return found.path


def resolve(pkg: griffe.Module, scope: griffe.Object, name: str) -> str | None:
    """Resolve ``name`` as Python would from ``scope``: absolute, then from each enclosing object."""
    name = name.strip().lstrip(".").removesuffix("()")
    found = _lookup(pkg, name)
    obj: Any = scope
    while found is None and obj is not None:
        found = _lookup(pkg, f"{obj.path}.{name}")
        obj = obj.parent
    return found


def convert(text: str, scope: griffe.Object, pkg: griffe.Module) -> str:
    """``text`` with roles turned into cross-references or code and doctest ``Example:`` into ``Examples:``."""

    def role(match: re.Match) -> str:
        name = match.group("name").strip()
        shown = name.rsplit(".", 1)[-1] if match.group("tilde") else name
        target = resolve(pkg, scope, name)
        return f"[`{shown}`][{target}]" if target else f"`{shown}`"

    text = DOCTEST_EXAMPLE.sub(lambda m: f"{m.group('indent')}Examples:\n", text)
    return ROLE.sub(role, text)


class SphinxHabits(griffe.Extension):
    """Rewrite the docstrings of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, obj, pkg)
