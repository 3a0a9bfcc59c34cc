"""mkdocs hook: the API reference, one generated page per public area of the ``qing`` package.

Every public module (no ``_``-prefixed part in its dotted name, inside a real package) is found
by walking ``qing/`` at build time and rendered by mkdocstrings with a ``::: module`` block, so a
new module cannot be forgotten. Areas are ``qing`` itself and each ``qing.<name>``: the page of
``qing.layers`` holds ``qing.layers`` and every public module below it. A name that a package only
re-exports from a public module (``qing.CNNTransformer``) is listed with a link to where it is
documented instead of being rendered twice (griffe, which mkdocstrings uses, resolves the aliases).
The ``API reference`` entry of ``mkdocs.yml``'s nav is replaced by the generated pages.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

PACKAGE = "qing"
NAV_TITLE = "API reference"
INDEX = "reference/index.md"


def public_modules(package: str = PACKAGE) -> list[str]:
    """Dotted names of the public modules of ``package``, parents before children.

    A module is public when no part of its dotted name starts with ``_``; it must sit in a
    directory with an ``__init__.py`` (what setuptools installs).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise PluginError(f"API reference: package {package!r} is not importable")
    root = Path(spec.origin).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if not all((root.parent.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
            continue  # not inside a package
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        names.append(".".join(parts))
    return sorted(names, key=lambda name: name.split("."))


def area_of(module: str) -> str:
    """``qing`` -> ``qing``; ``qing.layers.encoder`` -> ``qing.layers``."""
    return ".".join(module.split(".")[:2])


def load_package(package: str = PACKAGE) -> Any:
    """The package as mkdocstrings sees it: loaded statically by griffe with the docs' extension, aliases resolved."""
    import griffe

    root = Path(importlib.util.find_spec(package).origin).parent
    extensions = griffe.load_extensions(str(Path(__file__).with_name("griffe_docstrings.py")))
    return griffe.load(
        package, search_paths=[str(root.parent)], extensions=extensions, resolve_aliases=True, resolve_external=False
    )


def _documented_at(member: Any, module: str, modules: set[str]) -> str | None:
    """Where a re-exported member is rendered, or ``None`` when ``module``'s own section renders it."""
    import griffe

    if not member.is_alias:
        return None
    try:
        target = member.final_target
    except griffe.AliasResolutionError:
        return None
    home = target.parent.path if target.parent is not None else None
    if home == module or home not in modules or not target.is_public:
        return None  # defined here, in a private module, or private where defined: only this page documents it
    return target.path


def module_section(module: str, tree: Any, modules: set[str]) -> str:
    """Markdown for one module: its mkdocstrings block, plus links for names documented elsewhere."""
    node = tree if module == tree.path else tree[module.removeprefix(tree.path + ".")]
    # the runtime __all__: timm's @register_model appends the entrypoints to it
    exported = getattr(importlib.import_module(module), "__all__", None)
    if exported is None:
        return f"::: {module}\n"
    own, elsewhere = [], {}
    for name in exported:
        target = _documented_at(node.members[name], module, modules) if name in node.members else None
        if target:
            elsewhere[name] = target
        else:
            own.append(name)
    members = "\n".join(f"        - {name}" for name in own)
    text = f"::: {module}\n    options:\n" + (f"      members:\n{members}\n" if own else "      members: false\n")
    if elsewhere:
        text += f"\n`{module}` also exports these names, documented where they are defined:\n\n"
        text += "| Name | Documented at |\n|---|---|\n"
        text += "".join(f"| `{module}.{name}` | [`{target}`][{target}] |\n" for name, target in elsewhere.items())
    return text


def _summary(module: str, tree: Any) -> str:
    node = tree if module == tree.path else tree[module.removeprefix(tree.path + ".")]
    doc = node.docstring.value if node.docstring else ""
    return doc.split("\n\n")[0].replace("\n", " ").replace("|", "\\|")


def reference_pages(package: str = PACKAGE) -> dict[str, str]:
    """``{src_uri: markdown}`` of the API reference: an index and one page per area."""
    modules = public_modules(package)
    module_set = set(modules)
    tree = load_package(package)
    areas: dict[str, list[str]] = {}
    for module in modules:
        areas.setdefault(area_of(module), []).append(module)
    pages = {}
    index = [
        "# API reference",
        "",
        "Generated from the docstrings of every public module of `qing` at build time.",
        "",
        "| Module | Summary |",
        "|---|---|",
    ]
    for area, members in areas.items():
        sections = "\n".join(module_section(m, tree, module_set) for m in members)
        pages[f"reference/{area}.md"] = f"# {area}\n\n{sections}"
        index += [f"| [`{module}`]({area}.md#{module}) | {_summary(module, tree)} |" for module in members]
    pages[INDEX] = "\n".join(index) + "\n"
    return pages


def on_config(config: Any) -> Any:
    """Replace the nav's ``API reference`` entry by the generated pages."""
    pages = reference_pages()
    nav = config["nav"] or []
    for item in nav:
        if isinstance(item, dict) and NAV_TITLE in item:
            item[NAV_TITLE] = [{"Overview": INDEX}] + [
                {uri.removeprefix("reference/").removesuffix(".md"): uri} for uri in pages if uri != INDEX
            ]
            break
    else:
        raise PluginError(f"mkdocs.yml nav has no {NAV_TITLE!r} entry for the generated API pages")
    return config


def on_files(files: Files, config: Any) -> Files:
    """Add the generated reference pages to the site."""
    for uri, content in reference_pages().items():
        if files.get_file_from_path(uri) is not None:
            raise PluginError(f"docs/{uri} exists; the API reference pages are generated, remove it")
        files.append(File.generated(config, uri, content=content))
    return files
