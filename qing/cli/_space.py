"""``qing app MODEL --export-space DIR``: a Hugging Face Space folder that serves ``qing app`` for one model.

The folder holds ``app.py`` (it runs ``qing app`` with the Space's host and port), ``requirements.txt``,
``README.md`` with the Space's YAML header (``sdk: gradio``), and the model: a copy in ``model/`` (weights,
config with labels, thresholds and preprocessing, model card), or, for an ``hf-hub:`` MODEL, a reference
to the Hub repo. ``qing push DIR owner/name --repo-type space`` publishes it.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Optional

import yaml
from huggingface_hub import HfApi, SpaceCardData
from huggingface_hub.constants import REPOCARD_NAME

from qing._io import write_text_atomic
from qing.cli._app_results import size_text
from qing.cli._common import CLIError, LoadedModel
from qing.evaluate import DISCLAIMER
from qing.hub import save_pretrained
from qing.version import __version__

__all__ = ["DEFAULT_SPACE_REQUIREMENT", "SPACE_MODEL_DIR", "push_space", "read_space_sdk", "write_space"]

#: How the Space installs qing (``--requirement`` replaces it, e.g. with a ``git+https://`` URL).
DEFAULT_SPACE_REQUIREMENT = f"qing[dicom]=={__version__}"
#: The model's folder inside the Space.
SPACE_MODEL_DIR = "model"
#: The Gradio version the Space runs when Gradio is not installed here (else the installed, tested one).
FALLBACK_GRADIO_VERSION = "6.31.0"

_APP_PY = '''\
"""A Hugging Face Space: chest X-ray predictions of {model_name} in the browser, served by `qing app`.

Written by `qing app ... --export-space`. Run it here with `python app.py` (after `pip install -r requirements.txt
gradio`); on the Hub the Space runs it. qing is a research tool, not a medical device.
"""

import os
import sys
from pathlib import Path

from qing.cli import main

os.chdir(Path(__file__).resolve().parent)  # the model path below is relative to this folder
MODEL = {model!r}
# Spaces set GRADIO_SERVER_NAME=0.0.0.0 and GRADIO_SERVER_PORT=7860; elsewhere this computer only.
HOST = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
PORT = os.environ.get("GRADIO_SERVER_PORT", "7860")

sys.exit(
    main(
        [
            "app",
            MODEL,
            "--only-these-models",
            "--host",
            HOST,
            "--port",
            PORT,
            "--device",
            "auto",
            "--max-file-size",
            "{max_file_size}",
            "--max-files",
            "{max_files}",
        ]
    )
)
'''


def _gradio_version() -> str:
    try:
        return importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        return FALLBACK_GRADIO_VERSION


def _hub_repo(spec: str) -> Optional[str]:
    """``owner/name`` of an ``hf-hub:owner/name[@revision]`` MODEL, else ``None``."""
    if not spec.startswith("hf-hub:"):
        return None
    return spec.removeprefix("hf-hub:").split("@", 1)[0]


def _default_title(loaded: LoadedModel) -> str:
    repo = _hub_repo(loaded.name)
    name = repo.split("/")[-1] if repo else Path(loaded.name.rstrip("/")).name or loaded.name
    return re.sub(r"[^\w .+-]", " ", name).strip()[:40] or "qing chest X-ray model"


def write_space(
    loaded: LoadedModel,
    folder: Path,
    *,
    title: Optional[str] = None,
    requirement: str = DEFAULT_SPACE_REQUIREMENT,
    max_file_size: int,
    max_files: int,
) -> list[str]:
    """Write the Space folder for one model; returns the names written, in order.

    Args:
        loaded: The model (from ``load_model``); an ``hf-hub:`` one is referenced, any other copied.
        folder: The Space folder (created; files in it with the same names are replaced).
        title: The Space's title (default: from the model's folder or repo name).
        requirement: The pip requirement line that installs qing in the Space.
        max_file_size: The page's upload limit in bytes.
        max_files: Files read per upload.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    repo = _hub_repo(loaded.name)
    written = []
    if repo is None:
        save_pretrained(loaded.model, folder / SPACE_MODEL_DIR, label_names=loaded.labels)
        model, written = SPACE_MODEL_DIR, [f"{SPACE_MODEL_DIR}/"]
    else:
        model = loaded.name
    title = title or _default_title(loaded)
    app = _APP_PY.format(model_name=title, model=model, max_file_size=max_file_size, max_files=max_files)
    write_text_atomic(folder / "app.py", app)
    write_text_atomic(folder / "requirements.txt", f"{requirement}\n")
    card = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=_gradio_version(),
        app_file="app.py",
        models=[repo] if repo else None,
        tags=["qing", "chest-x-ray", "medical-imaging", "image-classification"],
        emoji="🫁",
        colorFrom="indigo",
        colorTo="gray",
        pinned=False,
        short_description="Chest X-ray classification (research use only)",
    )
    where = f"[{repo}](https://huggingface.co/{repo})" if repo else f"`{SPACE_MODEL_DIR}/` in this Space"
    labels = ", ".join(loaded.labels)
    readme = (
        f"---\n{card.to_yaml()}\n---\n\n"
        f"# {title}\n\n"
        f"> **{DISCLAIMER}**\n\n"
        f"Drop chest X-rays (PNG, JPEG or DICOM, up to {max_files} files of {size_text(max_file_size)}) to see "
        f"what the model predicts: per-label probabilities ({labels}) against the decision thresholds stored "
        "with the model, the decision, each image as the model sees it after preprocessing and the attention "
        "rollout overlay. The results download as CSV.\n\n"
        f"The model: {where}. Its summary (labels, preprocessing, evaluation, intended use) is on the page.\n\n"
        "Made with [qing](https://github.com/qing-cxr/qing) (`qing app MODEL --export-space DIR`). To run this "
        "Space on your computer: `pip install -r requirements.txt gradio`, then `python app.py`.\n"
    )
    write_text_atomic(folder / REPOCARD_NAME, readme)
    return [*written, "app.py", "requirements.txt", REPOCARD_NAME]


def read_space_sdk(folder: Path) -> Optional[str]:
    """The ``sdk`` of a Space folder's ``README.md`` YAML header, or ``None`` when it has none."""
    readme = Path(folder) / REPOCARD_NAME
    if not readme.is_file():
        return None
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme.read_text(encoding="utf-8"), re.DOTALL)
    if match is None:
        return None
    try:
        header = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    sdk = header.get("sdk") if isinstance(header, dict) else None
    return str(sdk) if sdk else None


def push_space(
    folder: Path,
    repo_id: str,
    *,
    revision: Optional[str] = None,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: str = "Upload Space with qing",
) -> tuple[str, str]:
    """Upload a Space folder in one commit, creating the Space (with the SDK of its README) if needed.

    Returns:
        ``(owner/name, commit URL)``.
    """
    sdk = read_space_sdk(folder)
    if sdk is None:
        raise CLIError(
            f"{folder} is not a Space folder: its README.md has no YAML header with an sdk "
            "(write one with qing app MODEL --export-space DIR)"
        )
    api = HfApi(token=token, library_name="qing", library_version=__version__)
    repo = api.create_repo(repo_id, repo_type="space", space_sdk=sdk, private=private, exist_ok=True).repo_id
    if revision is not None and revision != "main":
        api.create_branch(repo, branch=revision, repo_type="space", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo,
        folder_path=folder,
        repo_type="space",
        revision=revision,
        commit_message=commit_message,
        ignore_patterns=["**/__pycache__/**", "*.pyc", ".git/**"],
    )
    return repo, str(commit)
