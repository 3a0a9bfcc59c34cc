"""mkdocs hook: the command-line reference of ``docs/cli.md``, generated from ``qing.cli.build_parser()``.

The ``<!-- qing:cli-reference -->`` marker is replaced by the ``--help`` text of ``qing`` and of every
subcommand (nested ones included), formatted 88 columns wide, so the page is the parser's own words.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from typing import Any

from mkdocs.exceptions import PluginError

PAGE = "cli.md"
MARKER = "<!-- qing:cli-reference -->"
WIDTH = "88"


def iter_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = (), help_line: str = ""
) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """``(command path, one-line help, parser)`` for ``parser`` and every subcommand below it, depth first."""
    yield path, help_line, parser
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        seen = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias of a subcommand already listed
                continue
            seen.add(id(sub))
            yield from iter_commands(sub, (*path, name), helps.get(name, ""))


def cli_markdown() -> str:
    """Markdown with a section per command: its one-line help and its full ``--help`` text."""
    from qing.cli import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH  # argparse wraps to the terminal width; keep the page stable
    try:
        parser = build_parser()
        sections = []
        for path, help_line, sub in iter_commands(parser):
            command = " ".join((parser.prog, *path))
            level = "#" * min(3 + len(path), 6)  # under the page's "## Reference"
            intro = f"{help_line}\n\n" if help_line else ""
            sections.append(f"{level} `{command}`\n\n{intro}```text\n{sub.format_help().rstrip()}\n```\n")
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(sections)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Fill the marker of ``cli.md``; a missing marker is an error, not an empty page."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/{PAGE} lost its {MARKER} marker: the command reference has nowhere to go")
    return markdown.replace(MARKER, cli_markdown())
