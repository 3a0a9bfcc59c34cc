"""``qing app [MODEL...]``: a local web page for point-and-click predictions, or a Hugging Face Space of it."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from qing.cli._app_results import DEFAULT_MAX_FILE_SIZE, DEFAULT_MAX_FILES, ModelStore, parse_size, size_text
from qing.cli._common import (
    CLIError,
    HelpFormatter,
    add_common_flags,
    add_device_flags,
    check_new_folder,
    load_model,
    positive_int,
    resolve_device,
    short_path,
)
from qing.cli._space import DEFAULT_SPACE_REQUIREMENT, write_space

_log = logging.getLogger("qing.cli")

INSTALL_HINT = "qing app needs Gradio, the optional app extra: pip install 'qing[app]'"

EPILOG = """\
examples:
  qing app runs/pneumonia                              # http://127.0.0.1:7860
  qing app runs/pneumonia hf-hub:me/cxr-nih --port 8080  # two models to switch between
  qing app                                             # type any MODEL in the page
  qing app runs/pneumonia --export-space space/        # a Hugging Face Space folder
  qing push space/ me/cxr-pneumonia-demo --repo-type space

MODEL is anything qing predict accepts: a model or run folder, hf-hub:owner/name[@revision], a registered
architecture.tag with weights, or a checkpoint file. The page runs the same predictions as qing predict
(the same numbers), shows each image as the model sees it, its probabilities against the stored thresholds,
the decision, the attention-rollout overlay and the model card summary, and offers the results as the CSV
of qing predict. Files that cannot be read are reported in the page. The page is served on 127.0.0.1
(this computer only) unless --host says otherwise; Gradio's usage statistics are switched off.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "app",
        help="a local web page to run a model on dropped images (Gradio), or a Hugging Face Space of it",
        description="Serve a web page where chest X-rays dropped in the browser get the model's predictions.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "models",
        metavar="MODEL",
        nargs="*",
        help="model(s) offered in the page, the first selected (any MODEL of qing predict; more can be typed)",
    )
    serve = parser.add_argument_group("serving")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every network interface)")
    serve.add_argument("--port", type=int, metavar="N", help="port (default: 7860, or the next free one)")
    serve.add_argument(
        "--only-these-models",
        action="store_true",
        help="the page may load only the MODELs given here (for a page others can reach)",
    )
    serve.add_argument(
        "--max-file-size",
        type=_size,
        default=DEFAULT_MAX_FILE_SIZE,
        metavar="SIZE",
        help=f"largest upload, e.g. 20mb (default: {size_text(DEFAULT_MAX_FILE_SIZE)})",
    )
    serve.add_argument(
        "--max-files",
        type=positive_int,
        default=DEFAULT_MAX_FILES,
        metavar="N",
        help=f"files read per upload (default: {DEFAULT_MAX_FILES})",
    )
    space = parser.add_argument_group("Hugging Face Space")
    space.add_argument(
        "--export-space",
        type=Path,
        metavar="DIR",
        help="write a Space folder (app.py, requirements.txt, README.md, the model) instead of serving",
    )
    space.add_argument(
        "--requirement",
        default=DEFAULT_SPACE_REQUIREMENT,
        metavar="SPEC",
        help="how the Space installs qing, a pip requirement line (default: %(default)s)",
    )
    space.add_argument("--title", metavar="TEXT", help="the Space's title (default: from the model)")
    space.add_argument("--overwrite", action="store_true", help="write into a non-empty --export-space folder")
    add_device_flags(parser, workers=False)
    add_common_flags(parser)
    parser.set_defaults(func=run)


def _size(text: str) -> int:
    """argparse type of ``--max-file-size``."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    if args.export_space is not None:
        return _export(args)
    if args.only_these_models and not args.models:
        raise CLIError("--only-these-models needs at least one MODEL")
    if importlib.util.find_spec("gradio") is None:
        raise CLIError(INSTALL_HINT)
    if not _is_loopback(args.host) and not args.only_these_models:
        _log.warning(
            "serving on %s: anyone who reaches this address can upload images and load any MODEL this computer "
            "can read; pass --only-these-models to serve only the MODELs given",
            args.host,
        )
    device = resolve_device(args.device)
    store = ModelStore(device, allowed=args.models if args.only_these_models else None)
    for spec in args.models[:1]:
        store.get(spec)  # a wrong first MODEL is an error here, before the page starts
    # Before Gradio is imported: no usage statistics, no telemetry, and uploads in a private folder that is
    # removed when the app stops (uploaded X-rays are not left in the shared /tmp/gradio).
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    workdir = Path(tempfile.mkdtemp(prefix="qing-app-"))
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "uploads")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # a stopped service also removes its uploads
    try:
        from qing.cli import _app_page  # Gradio takes seconds to import: only when the page is served

        _app_page.serve(
            store,
            models=args.models,
            host=args.host,
            port=args.port,
            max_file_size=args.max_file_size,
            max_files=args.max_files,
            workdir=workdir / "downloads",
            batch_size=args.batch_size,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # SystemExit runs the finally blocks that close the page and delete the uploads


def _export(args: argparse.Namespace) -> int:
    if len(args.models) != 1:
        raise CLIError(f"--export-space takes exactly one MODEL, got {len(args.models)}")
    check_new_folder(args.export_space, overwrite=args.overwrite, what="--export-space folder")
    loaded = load_model(args.models[0], device=resolve_device("cpu"))
    written = write_space(
        loaded,
        args.export_space,
        title=args.title,
        requirement=args.requirement,
        max_file_size=args.max_file_size,
        max_files=args.max_files,
    )
    folder = short_path(args.export_space)
    print(f"wrote a Hugging Face Space to {folder}: {', '.join(written)}")
    print(f"try it here: python {folder}/app.py   (needs: pip install 'qing[app]')")
    print(f"publish it:  qing push {folder} USER/SPACE_NAME --repo-type space")
    return 0
