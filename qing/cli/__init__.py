"""The ``qing`` command line: train, evaluate, predict, explain, convert, push and pull chest X-ray models.

Run ``qing --help`` or ``qing <command> --help`` (every command shows examples). ``python -m qing``
is the same command. Exit codes: 0 on success, 2 on a usage error (unknown option, missing
argument), 1 on a failure; a failure prints one ``qing: error: ...`` line (the traceback only with
``--debug``).

Commands:

- ``qing demo``: synthetic data -> fine-tuning -> evaluation report, a few minutes on a CPU;
- ``qing models [PATTERN]``: the registered architectures and weights;
- ``qing train``: fine-tune (every :class:`qing.train.TrainConfig` field is a flag, or ``--config``);
- ``qing eval MODEL DATA``: the evaluation report of a model on labelled images;
- ``qing compare A B DATA``: two models (or prediction CSVs) on the same images: DeLong, bootstrap, McNemar;
- ``qing predict MODEL INPUT...``: probabilities, decisions and Grad-CAM or attention heatmaps for image files;
- ``qing explain MODEL IMAGE``: Grad-CAM for chosen labels, or attention per block and head, in one figure;
- ``qing app [MODEL...]``: a local web page (Gradio) to run a model on dropped images, or a Hugging Face Space;
- ``qing export MODEL OUT.onnx``: an ONNX file checked against PyTorch, with labels and preprocessing inside;
- ``qing convert SRC DST``: CheXNet / original hybrid / torchxrayvision checkpoints to a qing model folder;
- ``qing push DIR REPO_ID`` and ``qing pull REPO_ID DIR``: the Hugging Face Hub round trip (and Spaces).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Optional

from qing.cli import _app, _compare, _convert, _demo, _eval, _explain, _export, _hub, _models, _predict, _train
from qing.cli._common import CLIError, HelpFormatter
from qing.version import __version__

__all__ = ["build_parser", "main"]

_EPILOG = """\
start here:
  qing demo                                   synthetic data -> trained model -> report (CPU, minutes)
  qing models                                 architectures and weights
  qing train DATA --model qing_densenet121_tr2 --img-size 224 --output-dir runs/pneumonia
  qing eval runs/pneumonia TEST_DATA          report on labelled images
  qing compare runs/a runs/b TEST_DATA        is model a better than model b on the same images?
  qing predict runs/pneumonia scans/ -o predictions.csv --heatmaps heatmaps/
  qing app runs/pneumonia                     a web page: drop X-rays, see predictions

qing is a research tool, not a medical device.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``qing`` argument parser with every subcommand (the docs' command-line page is made from it)."""
    parser = argparse.ArgumentParser(
        prog="qing",
        description="Chest X-ray classification models on timm: train, evaluate, predict, explain, share.",
        epilog=_EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qing {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what qing does (INFO level)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for module in (_demo, _models, _train, _eval, _compare, _predict, _explain, _app, _export, _convert, _hub):
        module.register(sub)
    return parser


class _ConsoleFormatter(logging.Formatter):
    """``qing: warning: ...`` for warnings and errors, ``qing.train: ...`` for progress records."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"qing: {record.levelname.lower()}: {message}"
        return f"{record.name}: {message}"


@contextlib.contextmanager
def _console(verbose: bool) -> Iterator[None]:
    """Log records and Python warnings as short ``qing`` lines on stderr, for the duration of a command."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter())
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or record.name.startswith("qing.train"))
    old_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"qing: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = old_format
        root.removeHandler(handler)
        root.setLevel(old_level)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a mistake in the input (files, names, values): one line, no traceback."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    return (CLIError, OSError, ValueError, HfHubHTTPError, OfflineModeIsEnabled, ImportError)


def _message(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, KeyError) or not text:
        return f"{type(err).__name__}: {text or 'no message'}"
    return text


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``qing`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Usage errors exit through argparse with code 2; failures return 1 after one ``qing: error:`` line.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _console(args.verbose):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("qing: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        if isinstance(err, _user_errors()):
            print(f"qing: error: {_message(err)}", file=sys.stderr)
        else:
            print(
                f"qing: error: {type(err).__name__}: {_message(err)} (run again with --debug for the traceback)",
                file=sys.stderr,
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
