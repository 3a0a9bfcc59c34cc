"""Helpers of tests/test_docs.py: find the Python blocks of Markdown pages, read a rendered DOM.

A fenced block whose info string is ``python`` (or ``py``) is run by the docs test unless the line
right before it (blank lines aside) is an opt-out marker with a reason::

    <!-- docs-test: skip needs a GPU -->
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional

RUNNABLE = {"python", "py"}
FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)")
SKIP_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*skip\b(?P<reason>.*?)-->\s*$")
ANY_MARKER = re.compile(r"<!--\s*docs-test:")


@dataclass
class CodeBlock:
    """One fenced code block of a Markdown page."""

    page: Path
    line: int  #: 1-based line number of the block's first code line
    lang: str
    source: str
    skip_reason: Optional[str] = None  #: set when a ``docs-test: skip`` marker precedes the block


class MarkdownError(ValueError):
    """A page whose blocks or markers cannot be read unambiguously."""


def code_blocks(page: Path) -> list[CodeBlock]:
    """Every fenced block of ``page`` in order, with its opt-out marker if any.

    Raises:
        MarkdownError: An unclosed fence, a marker without a reason, or a marker that is not
            directly followed by a Python block.
    """
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[CodeBlock] = []
    pending: Optional[tuple[int, str]] = None  # (line number, reason) of a marker awaiting its block
    i = 0
    while i < len(lines):
        text = lines[i]
        marker = SKIP_MARKER.match(text)
        if marker:
            reason = marker.group("reason").strip()
            if not reason:
                raise MarkdownError(f"{page}:{i + 1}: docs-test skip marker without a reason")
            pending = (i + 1, reason)
            i += 1
            continue
        if ANY_MARKER.search(text):
            raise MarkdownError(f"{page}:{i + 1}: unknown docs-test marker {text.strip()!r}")
        opened = FENCE_OPEN.match(text)
        if opened:
            indent, fence, lang = opened.group("indent"), opened.group("fence"), opened.group("lang").lower()
            close = re.compile(rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
            end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])), None)
            if end is None:
                raise MarkdownError(f"{page}:{i + 1}: code fence {fence} is never closed")
            body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : end]]
            reason = None
            if pending is not None:
                if lang not in RUNNABLE:
                    raise MarkdownError(f"{page}:{pending[0]}: docs-test skip marker before a {lang or 'plain'} block")
                reason = pending[1]
                pending = None
            blocks.append(CodeBlock(page, i + 2, lang, "\n".join(body) + "\n", reason))
            i = end + 1
            continue
        if pending is not None and text.strip():
            raise MarkdownError(f"{page}:{pending[0]}: docs-test skip marker not followed by a code block")
        i += 1
    if pending is not None:
        raise MarkdownError(f"{page}:{pending[0]}: docs-test skip marker at the end of the page")
    return blocks


# ---- a small DOM for Chromium's --dump-dom output --------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    """An element of a parsed HTML document."""

    def __init__(self, tag: str, attrs: dict[str, str], parent: Optional[Node]) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        """All text below this element, whitespace collapsed."""
        return " ".join(self._raw_text().split())

    def _raw_text(self) -> str:
        return "".join(c if isinstance(c, str) else c._raw_text() for c in self.children)

    def iter(self) -> list[Node]:
        """This element and every element below it, in document order."""
        out = [self]
        for child in self.children:
            if isinstance(child, Node):
                out += child.iter()
        return out

    def find_all(self, predicate: Callable[[Node], bool]) -> list[Node]:
        return [node for node in self.iter() if predicate(node)]

    def by_id(self, element_id: str) -> Optional[Node]:
        return next((node for node in self.iter() if node.attrs.get("id") == element_id), None)


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(node)
        if tag not in _VOID:
            self.current = node

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        self.current.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag: str) -> None:
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:  # ignore a stray end tag
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(data)


def parse_html(html: str) -> Node:
    """Parse a whole HTML document into a :class:`Node` tree."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root
