"""Save, push and load qing models as timm-format folders and Hugging Face Hub repos.

A saved model is a folder (or a Hub repo) of three files:

- ``model.safetensors``: the state dict (never a pickle);
- ``config.json``: timm's config (``architecture``, ``num_classes``, ``label_names``, ``model_args``,
  ``pretrained_cfg`` with ``mean``/``std``/``input_size``), plus ``model.qing_meta`` (task, calibration
  temperatures, decision thresholds, metrics, datasets) under the ``"qing"`` key and transformers'
  ``problem_type`` (``multi_label_classification`` for the sigmoid tasks, so
  ``pipeline("image-classification")`` applies a sigmoid per label);
- ``README.md``: a model card (see [qing.model_card][]).

Writing goes through timm's ``save_for_hf`` and ``huggingface_hub.HfApi``; reading through timm's own
``hf-hub:`` / ``local-dir:`` sources, so a pushed model also loads with plain
``timm.create_model("hf-hub:owner/name", pretrained=True)`` after ``import qing``.
``qing.create_model`` (and ``qing.from_pretrained``) add what this module's :func:`open_model_source`,
:func:`explain_source_errors` and :func:`restore_meta` provide: clear errors (missing repo, revision or
file; offline cache misses) and ``model.qing_meta``. Revisions pin with
``"hf-hub:owner/name@<branch or commit sha>"``.

Example:
    >>> import qing
    >>> model = qing.create_model("qing_test_tr1", num_classes=1)
    >>> qing.save_pretrained(model, "my-model", label_names=["Pneumonia"])  # doctest: +SKIP
    >>> same = qing.create_model("local-dir:my-model", pretrained=True)  # doctest: +SKIP
    >>> qing.push_to_hub(model, "me/cxr-pneumonia", label_names=["Pneumonia"])  # doctest: +SKIP
    >>> pulled = qing.from_pretrained("me/cxr-pneumonia", revision="main")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import timm
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.constants import CONFIG_NAME, REPOCARD_NAME, SAFETENSORS_SINGLE_FILE
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from timm.models import save_for_hf
from timm.utils import unwrap_model
from torch import nn

from qing._io import FILE_MODE, fsync_dir, fsync_tree
from qing.meta import ModelMeta, default_label_names, get_meta, model_task
from qing.model_card import generate_model_card
from qing.version import __version__

__all__ = [
    "ModelSource",
    "ModelSourceNotFoundError",
    "download_model_folder",
    "explain_source_errors",
    "is_model_folder",
    "open_model_source",
    "push_to_hub",
    "resolve_model_folder",
    "restore_meta",
    "save_pretrained",
    "source_name",
]

_logger = logging.getLogger(__name__)

# The file names of a saved model folder are huggingface_hub's: model.safetensors, config.json, README.md.
_RESERVED = (SAFETENSORS_SINGLE_FILE, CONFIG_NAME, REPOCARD_NAME)
# Files timm's ``local-dir:`` loader accepts as weights.
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pth.tar")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# transformers' problem_type per qing task: which activation its image-classification pipeline applies.
_PROBLEM_TYPES = {
    "binary": "multi_label_classification",
    "multilabel": "multi_label_classification",
    "multiclass": "single_label_classification",
}
_CARD_FIELDS = frozenset(inspect.signature(generate_model_card).parameters) - {"config", "model_id", "num_params"}


class ModelSourceNotFoundError(FileNotFoundError):
    """A Hub repo, revision or file, a cached copy, or a local model folder that is not there."""


# ---------------------------------------------------------------------------------------------
# Saving and pushing
# ---------------------------------------------------------------------------------------------


def save_pretrained(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    *,
    label_names: Optional[list[str]] = None,
    data_config: Optional[dict[str, Any]] = None,
    model_card: bool = True,
    repo_id: Optional[str] = None,
    extra_files: Optional[Mapping[str, Union[str, bytes]]] = None,
    overwrite: bool = False,
    **card_fields: Any,
) -> Path:
    """Save a model as a folder that ``qing.create_model("local-dir:...")`` and timm load.

    Writes ``model.safetensors``, ``config.json`` (timm's ``save_for_hf`` layout plus
    ``"qing": model.qing_meta``) and a ``README.md`` model card. The folder is written
    completely into a temporary folder beside ``directory`` and then renamed into place; an
    existing model folder at ``directory`` is replaced only after the new one is complete.

    Args:
        model: A timm model (e.g. from ``qing.create_model``); DDP/compiled wrappers are unwrapped.
        directory: Target folder. An existing one is replaced only if it is empty or is a qing model
            folder (see :func:`is_model_folder`); anything else is refused unless ``overwrite=True``.
        label_names: One name per output (``len == model.num_classes``; binary: the positive
            class). Default: ``model.pretrained_cfg["label_names"]`` when it has the right length,
            else ``class_0``, ... (with a warning).
        data_config: Preprocessing to record instead of the model's pretrained cfg, e.g.
            ``dict(input_size=(3, 320, 320), mean=..., std=...)`` (timm ``save_for_hf`` semantics).
        model_card: Write ``README.md``.
        repo_id: Hub repo the folder is meant for; the card's usage snippet then loads
            ``"hf-hub:<repo_id>"`` instead of the local folder.
        extra_files: More files to place in the folder, ``{relative name: text or bytes}``,
            written before the rename so they appear atomically with the model (e.g. training state).
        overwrite: Replace ``directory`` even when it is not a qing model folder (everything in it is lost).
        **card_fields: Model card fields: ``title``, ``description``, ``license``, ``datasets``,
            ``tags``, ``base_model``, ``limitations``, ``citation`` (see
            [generate_model_card][qing.model_card.generate_model_card]).

    Returns:
        The folder path.

    Raises:
        FileExistsError: ``directory`` exists and is not a qing model folder (and ``overwrite`` is false).
        ValueError: Label names or thresholds that do not match ``model.num_classes``.
        TypeError: Not a timm model, or an unknown card field.
    """
    _check_card_fields(model_card, card_fields)
    directory = Path(directory)
    _check_replaceable(directory, overwrite=overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        os.chmod(staging, 0o755)
        model_id = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{directory}"
        _write_model_folder(
            model,
            staging,
            model_id=model_id,
            label_names=label_names,
            data_config=data_config,
            model_card=model_card,
            card_fields=card_fields,
            extra_files=extra_files,
        )
        _replace_dir(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    revision: Optional[str] = None,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: str = "Upload model with qing",
    label_names: Optional[list[str]] = None,
    data_config: Optional[dict[str, Any]] = None,
    model_card: bool = True,
    **card_fields: Any,
) -> str:
    """Upload a model to a Hugging Face Hub repo in one commit; create the repo (and branch) if needed.

    The files are those of [save_pretrained][qing.hub.save_pretrained], built with timm's ``save_for_hf`` and uploaded
    with ``huggingface_hub.HfApi.upload_folder`` (timm's ``push_to_hf_hub`` does the same but writes
    its own generic card). Files that did not change are not re-uploaded; other files already in the
    repo are kept.

    Args:
        model: A timm model (e.g. from ``qing.create_model``).
        repo_id: ``"owner/name"`` (a bare ``"name"`` goes to the token's user).
        revision: Branch to commit to; created from ``main`` if it does not exist. ``None``: ``main``.
        private: Create the repo as private (ignored if it exists).
        token: Hub token; default: ``HF_TOKEN`` or the one saved by ``hf auth login``.
        commit_message: Commit title.
        label_names: See [save_pretrained][qing.hub.save_pretrained].
        data_config: See [save_pretrained][qing.hub.save_pretrained].
        model_card: Write ``README.md`` (replacing the repo's); ``False`` leaves the repo's card alone.
        **card_fields: Model card fields, see [save_pretrained][qing.hub.save_pretrained].

    Returns:
        The commit: a ``str`` (its URL) whose ``.oid`` is the commit sha, which pins this exact
        upload: ``qing.create_model(f"hf-hub:{repo_id}@{commit.oid}", pretrained=True)``.
    """
    _check_card_fields(model_card, card_fields)
    if revision is not None and _COMMIT_SHA.match(revision):
        raise ValueError(f"revision={revision!r} is a commit sha; push to a branch name (or None for 'main')")
    api = HfApi(token=token, library_name="qing", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and revision != hf_constants.DEFAULT_REVISION:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    model_id = f"hf-hub:{repo_id}" + (f"@{revision}" if revision not in (None, hf_constants.DEFAULT_REVISION) else "")
    with tempfile.TemporaryDirectory(prefix="qing-push-") as folder:
        _write_model_folder(
            model,
            Path(folder),
            model_id=model_id,
            label_names=label_names,
            data_config=data_config,
            model_card=model_card,
            card_fields=card_fields,
            extra_files=None,
        )
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message)


def _check_card_fields(model_card: bool, card_fields: Mapping[str, Any]) -> None:
    unknown = sorted(set(card_fields) - _CARD_FIELDS)
    if unknown:
        raise TypeError(f"unknown model card field(s) {unknown}; expected some of {sorted(_CARD_FIELDS)}")
    if card_fields and not model_card:
        raise TypeError(f"model card fields {sorted(card_fields)} given with model_card=False")


def _write_model_folder(
    model: nn.Module,
    folder: Path,
    *,
    model_id: str,
    label_names: Optional[list[str]],
    data_config: Optional[dict[str, Any]],
    model_card: bool,
    card_fields: Mapping[str, Any],
    extra_files: Optional[Mapping[str, Union[str, bytes]]],
) -> None:
    model = unwrap_model(model)
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "pretrained_cfg", None), dict):
        raise TypeError(
            f"expected a timm model (from qing.create_model or timm.create_model), got {type(model).__name__}"
        )
    if any(not t.is_contiguous() for t in model.state_dict().values()):  # channels_last: safetensors needs contiguous
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    num_classes = int(model.num_classes)
    meta = get_meta(model)
    for name in ("thresholds", "temperatures"):
        values = getattr(meta, name)
        if values is not None and len(values) != num_classes:
            raise ValueError(f"model.qing_meta has {len(values)} {name} for {num_classes} outputs")
    if meta.task == "binary" and num_classes != 1:
        raise ValueError(f"model.qing_meta.task is 'binary' but the model has {num_classes} outputs (expected 1)")
    model_config: dict[str, Any] = {"qing": _jsonable(meta.to_dict(), "model.qing_meta")}
    model_config["problem_type"] = _PROBLEM_TYPES[model_task(model)]
    names = _resolve_label_names(model, label_names)
    if names:  # top level (timm's convention) and in the pretrained cfg, as a loaded model has them
        model_config["label_names"] = names
        model_config["pretrained_cfg"] = {"num_classes": num_classes, "label_names": names}
    save_for_hf(model, folder, model_config=model_config, safe_serialization=True, data_config=data_config)
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    # transformers' TimmWrapper passes num_classes=num_labels and then **model_args: a repeat is a TypeError.
    # timm reads num_classes from the top level, so model_args needs no copy.
    config.get("model_args", {}).pop("num_classes", None)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if model_card:
        num_params = sum(p.numel() for p in model.parameters())
        card = generate_model_card(config, model_id=model_id, num_params=num_params, **card_fields)
        (folder / REPOCARD_NAME).write_text(card, encoding="utf-8")
    for name, content in (extra_files or {}).items():
        target = _extra_file_path(folder, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            target.write_text(content, encoding="utf-8")
        else:
            target.write_bytes(bytes(content))
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, FILE_MODE)  # as every file qing writes (a library may have written through a 0600 temp)


def _resolve_label_names(model: nn.Module, label_names: Optional[list[str]]) -> Optional[list[str]]:
    num_classes = int(model.num_classes)
    if label_names is not None:
        if isinstance(label_names, str):
            raise ValueError(f"label_names must be a list of names, got the string {label_names!r}")
        names = [str(n) for n in label_names]
        if len(names) != num_classes:
            hint = " (binary: the name of the positive class)" if num_classes == 1 else ""
            raise ValueError(f"{len(names)} label_names for a model with {num_classes} outputs{hint}")
        return names
    names = model.pretrained_cfg.get("label_names")
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    if not num_classes:
        return None
    _logger.warning(
        "saving with the label names class_0..class_%d: the model has %d outputs and its pretrained_cfg has %s; "
        "pass label_names=[...] so the config and model card name the outputs",
        num_classes - 1,
        num_classes,
        f"{len(names)} label names" if names else "none",
    )
    return list(default_label_names(num_classes))


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(value.tolist(), where)
    raise TypeError(f"{where} holds a {type(value).__name__}, which config.json cannot store (JSON types only)")


def _extra_file_path(folder: Path, name: str) -> Path:
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"extra_files name {name!r} must be a relative path inside the model folder")
    if relative.as_posix() in _RESERVED:
        raise ValueError(f"extra_files name {name!r} would overwrite the model's own {relative.as_posix()}")
    return folder / relative


def is_model_folder(directory: Union[str, os.PathLike]) -> bool:
    """Whether ``directory`` is a qing model folder: its ``config.json`` names an architecture and has qing's entry.

    [save_pretrained][qing.hub.save_pretrained] replaces only such folders (and empty ones) unless told to.
    """
    config_path = Path(directory) / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("architecture"), str) and "qing" in config


def _check_replaceable(directory: Path, *, overwrite: bool) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder; choose another path for the model")
    entries = sorted(p.name for p in directory.iterdir())
    if not entries or overwrite or is_model_folder(directory):
        return
    why = (
        f"its {CONFIG_NAME} is not one qing wrote"
        if (directory / CONFIG_NAME).is_file()
        else f"it holds no {CONFIG_NAME} of a qing model"
    )
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise FileExistsError(
        f"{directory} is not a qing model folder ({why}); refusing to replace it and what it holds ({shown}). "
        "Choose a new folder, or pass overwrite=True to replace it with everything in it."
    )


def _replace_dir(staging: Path, directory: Path) -> None:
    """Move the complete ``staging`` folder to ``directory``, replacing an old one only at the end.

    Durable: the staged files and folders are flushed to disk before the rename, and the parent
    folder after each rename, so a power cut leaves the old folder or the complete new one. Between
    the two renames the old folder waits beside the target as ``.<name>.old-<id>``
    (``qing.train.find_checkpoint`` moves the newest complete copy back after a crash there).
    """
    parent = directory.parent
    fsync_tree(staging)
    if not directory.exists():
        os.replace(staging, directory)
        fsync_dir(parent)
        return
    old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(directory, old)
    fsync_dir(parent)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(old, directory)
        fsync_dir(parent)
        raise
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(parent)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


#: Where a training run keeps the model it selected (``qing train``'s output folder layout).
RUN_BEST = Path("checkpoints") / "best"


def resolve_model_folder(folder: Union[str, os.PathLike]) -> Path:
    """The model folder meant by ``folder``: itself, or ``checkpoints/best`` of a training run folder."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file() and (folder / RUN_BEST / CONFIG_NAME).is_file():
        _logger.info("%s is a training run: loading its %s", folder, RUN_BEST)
        return folder / RUN_BEST
    return folder


def _looks_like_path(text: str) -> bool:
    """A name that cannot be a Hub repo id (``owner/name``) and reads as a local path."""
    return text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def source_name(source: Union[str, os.PathLike], revision: Optional[str] = None) -> str:
    """The ``hf-hub:``/``local-dir:`` model name for a repo id, folder or prefixed name (see ``qing.from_pretrained``).

    A local folder may also be a training run folder (its ``checkpoints/best`` is loaded).

    Raises:
        ValueError: A revision for a local folder, or two revisions.
        ModelSourceNotFoundError: A local path (``./x``, ``/x``, ``a/b/c``) that does not exist.
    """
    text = os.fspath(source)
    if isinstance(source, os.PathLike) or (":" not in text and (Path(text).is_dir() or _looks_like_path(text))):
        if not Path(text).expanduser().is_dir():
            what = "is a file, not a folder" if Path(text).expanduser().exists() else "does not exist"
            raise ModelSourceNotFoundError(
                f"no such folder: {text} {what}; expected a model folder written by qing.save_pretrained, or a "
                "training run folder (its checkpoints/best), or a Hub repo id 'owner/name'"
            )
        if revision is not None:
            raise ValueError(f"revision={revision!r} given for the local folder {source}; revisions are Hub-only")
        return f"local-dir:{resolve_model_folder(Path(text).expanduser())}"
    name = str(source)
    prefix, colon, rest = name.partition(":")
    if not colon or prefix not in ("hf-hub", "local-dir"):
        name, prefix, rest = f"hf-hub:{name}", "hf-hub", name
    if revision is not None:
        if prefix != "hf-hub":
            raise ValueError(f"revision={revision!r} given for {name}; revisions are Hub-only")
        if "@" in rest:
            raise ValueError(f"{name} already names a revision; drop revision={revision!r} or the '@...'")
        name = f"{name}@{revision}"
    return name


def download_model_folder(
    repo_id: str,
    directory: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> Path:
    """Copy every file of a Hub model repo, byte for byte, into a folder; check that the model loads first.

    The files come through ``huggingface_hub.snapshot_download`` (the Hub cache, so ``HF_HUB_OFFLINE=1``
    works from a filled cache), are copied into a temporary folder beside ``directory``, loaded once as
    a check, and the folder is then renamed into place. Nothing is regenerated: the model card, its
    licence and any other file stay as the repo has them.

    Args:
        repo_id: ``owner/name``.
        directory: The folder to write; an existing one is replaced only if it is empty or a qing
            model folder (see :func:`is_model_folder`).
        revision: Branch, tag or commit sha.
        cache_dir: Hub cache folder.

    Returns:
        The folder.

    Raises:
        ModelSourceNotFoundError: Missing repo, revision or file, or not cached while offline.
        FileExistsError: ``directory`` is not a qing model folder.
        ValueError: The files do not make a loadable model.
    """
    directory = Path(directory)
    _check_replaceable(directory, overwrite=False)
    source = ModelSource("hf-hub", repo_id, revision, {}, None, os.fspath(cache_dir) if cache_dir else None)
    with explain_source_errors(source):
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, library_name="qing"))
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        os.chmod(staging, 0o755)
        for path in sorted(snapshot.rglob("*")):
            if path.is_file():  # the cache's symlinks to blobs are followed: real files, byte for byte
                target = staging / path.relative_to(snapshot)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                os.chmod(target, FILE_MODE)
        check = open_model_source("local-dir", str(staging))
        with explain_source_errors(check):
            timm.create_model(f"local-dir:{staging}", pretrained=True)
        _replace_dir(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


@dataclass
class ModelSource:
    """A resolved ``hf-hub:`` / ``local-dir:`` model: where it is, its config and qing metadata.

    Attributes:
        kind: ``"hf-hub"`` or ``"local-dir"``.
        location: Repo id or folder path.
        revision: Hub branch or commit sha, if one was named.
        config: The source's ``config.json``.
        meta: Its ``"qing"`` metadata, ``None`` when a non-qing tool saved it.
        cache_dir: Hub cache folder, if not the default.
    """

    kind: str
    location: str
    revision: Optional[str]
    config: dict[str, Any]
    meta: Optional[ModelMeta]
    cache_dir: Optional[str] = None

    @property
    def text(self) -> str:
        """The source in words, for messages."""
        if self.kind == "local-dir":
            return f"local model folder {self.location}"
        return f"Hub repo {self.location!r}" + (f" at revision {self.revision!r}" if self.revision else "")


def open_model_source(
    kind: str, location: str, *, cache_dir: Optional[Union[str, os.PathLike]] = None, pretrained: bool = True
) -> ModelSource:
    """Read and check the ``config.json`` of a ``hf-hub:`` or ``local-dir:`` model before it is built.

    Args:
        kind: ``"hf-hub"`` or ``"local-dir"`` (as ``timm.models.parse_model_name`` splits a name).
        location: ``owner/name[@revision]`` or a folder path.
        cache_dir: Hub cache folder.
        pretrained: The weights will be loaded too (a local folder must hold a weights file).

    Returns:
        The :class:`ModelSource`, its architecture registered and its qing metadata valid.

    Raises:
        ModelSourceNotFoundError: Missing repo, revision, file or folder, or not cached while offline.
        ValueError: A corrupt ``config.json``, an unregistered architecture, invalid qing metadata.
    """
    if kind == "local-dir":
        source = ModelSource(kind, location, None, {}, None)
        config_path = _check_local_dir(Path(location), pretrained=pretrained)
    else:
        repo_id, _, revision = location.partition("@")
        source = ModelSource(kind, repo_id, revision or None, {}, None, os.fspath(cache_dir) if cache_dir else None)
        with explain_source_errors(source, filename=CONFIG_NAME):
            config_path = Path(
                hf_hub_download(
                    repo_id, CONFIG_NAME, revision=source.revision, cache_dir=cache_dir, library_name="qing"
                )
            )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} of {source.text} is not valid JSON ({err}); the file is corrupt") from err
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise ValueError(f"{config_path} of {source.text} has no 'architecture': not a timm model config")
    if not timm.is_model(config["architecture"]):
        raise ValueError(
            f"{source.text} needs the architecture {config['architecture']!r} (from its {CONFIG_NAME}), which is "
            "not registered: import the package that defines it (`import qing` registers qing's), or upgrade qing"
        )
    source.config = config
    if config.get("qing") is not None:
        try:
            source.meta = ModelMeta.from_dict(config["qing"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"invalid 'qing' metadata in {CONFIG_NAME} of {source.text}: {err}") from err
    return source


def _check_local_dir(folder: Path, *, pretrained: bool) -> Path:
    files = f"{CONFIG_NAME}, {SAFETENSORS_SINGLE_FILE}"
    expected = f"expected a folder written by qing.save_pretrained or timm's save_for_hf ({files})"
    if not folder.exists():
        raise ModelSourceNotFoundError(f"local model folder {folder} does not exist; {expected}")
    if not folder.is_dir():
        raise ModelSourceNotFoundError(f"local model folder {folder} is a file, not a folder; {expected}")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ModelSourceNotFoundError(f"local model folder {folder} has no {CONFIG_NAME}; {expected}")
    if pretrained and not any(p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir()):
        raise ModelSourceNotFoundError(
            f"local model folder {folder} has no weights file ({SAFETENSORS_SINGLE_FILE}); {expected}"
        )
    return config_path


@contextlib.contextmanager
def explain_source_errors(source: ModelSource, filename: Optional[str] = None) -> Iterator[None]:
    """Re-raise Hub, cache and checkpoint errors met while reading ``source`` with a message naming it and the fix.

    Args:
        source: What is being read.
        filename: The file being fetched, when known (for the message).

    Raises:
        ModelSourceNotFoundError: A missing repo, revision, file, or a cache miss while offline.
        ValueError: A corrupt weights file, or weights for another architecture.
    """
    try:
        yield
    except RevisionNotFoundError as err:
        raise ModelSourceNotFoundError(
            f"revision {source.revision!r} was not found in Hub repo {source.location!r} at "
            f"{hf_constants.ENDPOINT}; use a branch name or a full 40-character commit sha (list them with "
            f"huggingface_hub.HfApi().list_repo_refs({source.location!r}) and .list_repo_commits(...))"
        ) from err
    except RepositoryNotFoundError as err:
        raise ModelSourceNotFoundError(
            f"Hub repo {source.location!r} was not found at {hf_constants.ENDPOINT} (HTTP "
            f"{err.response.status_code}); check the 'owner/name' spelling, log in for a private or gated repo "
            "(`hf auth login` or HF_TOKEN), or load a local folder with 'local-dir:PATH'"
        ) from err
    except LocalEntryNotFoundError as err:
        raise ModelSourceNotFoundError(_cache_miss_message(source, filename)) from err
    except EntryNotFoundError as err:  # the repo and revision exist, the file does not
        missing = filename or _filename_from_error(err) or "a weights file"
        raise ModelSourceNotFoundError(
            f"{source.text} has no {missing}: expected a timm model repo with {CONFIG_NAME} and "
            f"{SAFETENSORS_SINGLE_FILE} (as written by qing.push_to_hub or timm's push_to_hf_hub)"
        ) from err
    except OfflineModeIsEnabled as err:
        raise ModelSourceNotFoundError(_cache_miss_message(source, filename)) from err
    except SafetensorError as err:
        raise ValueError(
            f"the weights of {source.text} are not a readable safetensors file ({err}); the file is truncated or "
            "corrupt: save or download it again (Hub: hf_hub_download(..., force_download=True))"
        ) from err
    except RuntimeError as err:
        if "Error(s) in loading state_dict" not in str(err):
            raise
        architecture = source.config.get("architecture", "?")
        raise ValueError(
            f"the weights of {source.text} do not fit the architecture {architecture!r} named in its "
            f"{CONFIG_NAME} (checkpoint for another architecture or configuration?): {err}"
        ) from err


def _cache_miss_message(source: ModelSource, filename: Optional[str]) -> str:
    cache = source.cache_dir or hf_constants.HF_HUB_CACHE
    what = f"{source.text}" + (f" ({filename})" if filename else "")
    download = f"`hf download {source.location}"
    download += f" --revision {source.revision}" if source.revision else ""
    download += f" --cache-dir {source.cache_dir}`" if source.cache_dir else "`"
    fixes = (
        f"go online, download it beforehand with {download} (same cache), "
        "or load a local copy with 'local-dir:PATH' (see qing.save_pretrained)"
    )
    if hf_constants.is_offline_mode():
        return f"{what} is not in the local Hub cache ({cache}) and offline mode is on (HF_HUB_OFFLINE=1); {fixes}"
    return (
        f"{what} could not be fetched from {hf_constants.ENDPOINT} and is not in the local Hub cache ({cache}); "
        f"check the connection and HF_ENDPOINT, or {fixes}"
    )


def _filename_from_error(err: Exception) -> Optional[str]:
    response = getattr(err, "response", None)
    request = getattr(response, "request", None) if response is not None else None
    url = str(getattr(request, "url", "") or "")
    if "/resolve/" not in url:
        return None
    return url.rsplit("/", 1)[-1] or None


def restore_meta(model: nn.Module, source: ModelSource) -> None:
    """Set ``model.qing_meta`` from the source's saved metadata (dropping what described a replaced head)."""
    if source.meta is None:
        return  # not saved by qing: nothing to restore
    meta = source.meta
    saved_classes = source.config.get("num_classes")
    if saved_classes is not None and model.num_classes != saved_classes:
        stale = ("thresholds", "temperatures", "threshold_method", "metrics")
        dropped = [name for name in stale if getattr(meta, name)]
        keep_task = meta.task if meta.task != "binary" or model.num_classes == 1 else None
        if meta.task and keep_task is None:
            dropped.append("task")
        meta = dataclasses.replace(
            meta, task=keep_task, thresholds=None, temperatures=None, threshold_method=None, metrics={}
        )
        if dropped:
            _logger.warning(
                "%s was saved with %s outputs, the model has %s: dropped qing metadata %s (it described the old head)",
                source.text,
                saved_classes,
                model.num_classes,
                ", ".join(dropped),
            )
    model.qing_meta = meta
