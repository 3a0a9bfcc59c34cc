"""``qing push DIR REPO_ID`` and ``qing pull REPO_ID DIR``: the Hugging Face Hub round trip.

Both go through ``huggingface_hub``, so ``HF_ENDPOINT`` (another Hub), ``HF_TOKEN`` / ``hf auth login``,
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` work as everywhere else.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants

from qing._factory import from_pretrained
from qing.cli._common import CLIError, HelpFormatter, add_common_flags, check_new_folder, load_model, short_path
from qing.cli._space import push_space
from qing.hub import push_to_hub, save_pretrained

PUSH_EPILOG = """\
examples:
  qing push runs/pneumonia me/cxr-pneumonia                 # the run's checkpoints/best
  qing push chexnet-qing me/chexnet --private --message "CheXNet, converted"
  qing push runs/pneumonia me/cxr-pneumonia --revision experiment-2
  HF_ENDPOINT=https://hub.example.org qing push runs/pneumonia team/cxr
  qing push space/ me/cxr-pneumonia-demo --repo-type space  # a folder from qing app --export-space

The repo gets model.safetensors, config.json (preprocessing, labels, thresholds, metrics) and a model
card. The token comes from --token, HF_TOKEN or `hf auth login`. Pushing needs the network:
HF_HUB_OFFLINE=1 is refused. Load the result with qing predict hf-hub:REPO_ID or qing pull.
With --repo-type space, DIR is a Space folder and is uploaded as it is (the Space is created if needed).
"""

PULL_EPILOG = """\
examples:
  qing pull me/cxr-pneumonia models/cxr-pneumonia
  qing pull me/cxr-pneumonia models/pinned --revision 0123456789abcdef0123456789abcdef01234567
  HF_HUB_OFFLINE=1 qing pull me/cxr-pneumonia models/cxr    # from the local Hub cache only

The weights are checked by loading them; DIR is then a model folder for qing eval / predict / explain.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    push = subparsers.add_parser(
        "push",
        help="upload a model folder to the Hugging Face Hub",
        description="Upload a model folder (or a run's best checkpoint) to a Hugging Face Hub repo in one commit.",
        epilog=PUSH_EPILOG,
        formatter_class=HelpFormatter,
    )
    push.add_argument("dir", metavar="DIR", help="model folder or run folder (also any MODEL qing loads)")
    push.add_argument("repo_id", metavar="REPO_ID", help="owner/name (created if it does not exist)")
    push.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created from main if needed)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--token", metavar="TOKEN", help="Hub token (default: HF_TOKEN or the saved login)")
    push.add_argument("--message", metavar="TEXT", help="commit message (default: Upload model/Space with qing)")
    push.add_argument(
        "--repo-type",
        choices=("model", "space"),
        default="model",
        help="model: push a model folder; space: upload a Space folder from qing app --export-space",
    )
    add_common_flags(push)
    push.set_defaults(func=run_push)

    pull = subparsers.add_parser(
        "pull",
        help="download a model from the Hugging Face Hub into a folder",
        description="Download a qing/timm model repo from the Hugging Face Hub, check it loads, save it as a folder.",
        epilog=PULL_EPILOG,
        formatter_class=HelpFormatter,
    )
    pull.add_argument("repo_id", metavar="REPO_ID", help="owner/name, optionally hf-hub:owner/name@revision")
    pull.add_argument("dir", metavar="DIR", type=Path, help="model folder to write")
    pull.add_argument("--revision", metavar="REV", help="branch, tag or commit sha (default: main)")
    pull.add_argument("--cache-dir", type=Path, metavar="DIR", help="Hugging Face cache folder (default: HF_HUB_CACHE)")
    pull.add_argument("--overwrite", action="store_true", help="replace an existing model folder at DIR")
    add_common_flags(pull)
    pull.set_defaults(func=run_pull)


def run_push(args: argparse.Namespace) -> int:
    if constants.HF_HUB_OFFLINE:
        raise CLIError("pushing needs the network but HF_HUB_OFFLINE is set; unset it (or set HF_HUB_OFFLINE=0)")
    if args.repo_type == "space":
        return _push_space(args)
    loaded = load_model(args.dir, device=torch.device("cpu"))
    commit = push_to_hub(
        loaded.model, args.repo_id, revision=args.revision, private=args.private, token=args.token,
        commit_message=args.message or "Upload model with qing",
    )  # fmt: skip
    repo_id = _repo_from_url(str(commit), args.repo_id)
    oid = getattr(commit, "oid", None)
    print(f"pushed {loaded.source} to {repo_id} on {constants.ENDPOINT}")
    print(f"commit: {commit}" + (f" ({oid})" if oid else ""))
    pinned = f"hf-hub:{repo_id}@{oid}" if oid else f"hf-hub:{repo_id}"
    print(f"next: qing predict {pinned} IMAGE.png   |   qing pull {repo_id} DIR")
    return 0


def _push_space(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if not folder.is_dir():
        raise CLIError(f"{folder} is not a folder; --repo-type space uploads a Space folder (qing app --export-space)")
    repo_id, commit = push_space(
        folder,
        args.repo_id,
        revision=args.revision,
        private=args.private,
        token=args.token,
        commit_message=args.message or "Upload Space with qing",
    )
    print(f"pushed the Space {short_path(folder)} to {repo_id} on {constants.ENDPOINT}")
    print(f"commit: {commit}")
    print(f"the Space: {constants.ENDPOINT}/spaces/{repo_id} (it builds and starts there in a few minutes)")
    return 0


def _repo_from_url(url: str, given: str) -> str:
    """The ``owner/name`` of a commit URL (a bare name gets the token's user), else what was given."""
    parts = url.split("/commit/")[0].rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 and "/" not in given else given


def run_pull(args: argparse.Namespace) -> int:
    check_new_folder(args.dir, overwrite=args.overwrite, what="DIR")
    repo = args.repo_id.removeprefix("hf-hub:")
    if repo.startswith("local-dir:") or Path(repo).is_dir():
        raise CLIError(f"{args.repo_id} is a local folder; qing pull takes a Hub repo id (owner/name)")
    repo_id, _, revision = repo.partition("@")
    if revision and args.revision:
        raise CLIError(f"{args.repo_id} already names a revision; drop --revision {args.revision}")
    revision = revision or args.revision
    model = from_pretrained(repo_id, revision=revision, cache_dir=args.cache_dir)
    folder = save_pretrained(model, args.dir, repo_id=repo_id)
    meta = model.qing_meta
    labels = model.pretrained_cfg.get("label_names") or ()
    where = "the local Hub cache" if constants.HF_HUB_OFFLINE else constants.ENDPOINT
    print(f"pulled {repo_id}" + (f"@{revision}" if revision else "") + f" from {where}")
    print(
        f"model: {model.pretrained_cfg.get('architecture')}, {model.num_classes} output(s)"
        + (f" ({', '.join(map(str, labels))})" if labels else "")
        + (f", task {meta.task}" if meta.task else "")
    )
    if meta.thresholds is not None:
        print(f"thresholds: {', '.join(f'{t:.3g}' for t in meta.thresholds)}" + _method(meta))
    if meta.metrics:
        print("metrics: " + ", ".join(f"{k} {_value(v)}" for k, v in meta.metrics.items()))
    print(f"saved: {short_path(folder)} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    print(f"next: qing predict {short_path(folder)} IMAGE.png")
    return 0


def _method(meta: Any) -> str:
    return f" ({meta.threshold_method})" if meta.threshold_method else ""


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)
