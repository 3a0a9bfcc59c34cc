"""``qing train``: fine-tune with :class:`qing.train.Trainer`; every ``TrainConfig``/``DataConfig`` field is a flag.

The flags are generated from the dataclass fields (types from the annotations, help from the
``Attributes:`` sections of their docstrings), so a new config field is a new flag without
touching this file. Values are merged in this order, later winning: ``--preset``, ``--config``
file, the DATA argument, the field flags, ``--set key=value``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

import yaml

from qing.cli._common import CLIError, HelpFormatter, add_common_flags, short_path
from qing.data import DataConfig
from qing.train import PRESETS, TrainConfig, Trainer
from qing.train.config import apply_overrides
from qing.train.wording import option_style

EPILOG = """\
examples:
  qing train data/chest_xray --model qing_densenet121_tr2 --img-size 224 --epochs 10 --output-dir runs/pneumonia
  qing train data/chest_xray --preset small_dataset --output-dir runs/original-recipe
  qing train --labels-csv nih/labels.csv --split-column repo_split --patient-column patient \\
      --model qing_xrv_densenet121.all --pretrained --in-chans 1 --output-dir runs/nih
  qing train --config run.yaml --epochs 5 --set data.cache_images=true
  qing train --config run.yaml --print-config > resolved.yaml

DATA is a folder of class folders (DATA/<CLASS>/* or DATA/{train,val,test}/<CLASS>/*), a labels CSV
(--labels-csv) or a ChestX-ray14 list file (--train-list). The run folder gets checkpoints/best and
checkpoints/last (model folders that qing eval/predict/push take), tensorboard/, report/, train.log,
config.yaml and splits.csv (the images of each split: qing eval RUN DATA --split test evaluates on
exactly the run's test images). The model starts from the tag's published weights where it has them
(--no-pretrained: from scratch; --pretrained-file: your own file); the first log line says which.
An existing run is never replaced: --resume continues it, --overwrite removes what qing wrote there
(never other files). A second run on the same folder fails at once, naming the first one.
Flags map to TrainConfig / DataConfig fields (python -m qing.train runs a config file as well).
"""

_RESERVED = {"config", "preset", "set", "print_config", "debug", "verbose", "help"}
_DATA_SOURCES = ("root", "train_dir", "labels_csv", "train_list")


def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` section of a Google-style class docstring."""
    doc = inspect.getdoc(cls) or ""
    docs: dict[str, str] = {}
    inside, current = False, None
    for line in doc.splitlines():
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):
            break
        match = re.match(r"^ {4}(\w+)(?: \([^)]*\))?: (.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return {k: v.replace("``", "").replace("%", "%%") for k, v in docs.items()}


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) < len(typing.get_args(hint)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return hint, False


def _nullable(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null", "") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not a YAML value: {text!r}") from err


_yaml_value.__name__ = "value"


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, _yaml_value(raw)


_key_value.__name__ = "KEY=VALUE"


def _flag_kwargs(name: str, hint: Any, default: Any, doc: str) -> dict[str, Any]:
    """argparse keyword arguments for one dataclass field (default SUPPRESS: only given flags count)."""
    inner, optional = _unwrap_optional(hint)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    shown = default if not callable(default) else None
    if inner is bool and default is None:
        shown = "auto"
    help_text = f"{doc} [default: {shown}]" if doc else f"[default: {shown}]"
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
    if inner is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif inner in (int, float, str):
        kwargs["type"] = _nullable(inner) if optional else inner
        kwargs["metavar"] = {int: "N", float: "X", str: "TEXT"}[inner]
        if inner is str and re.search(r"(^root|_dir|_file|_csv|_list)$", name):
            kwargs["metavar"] = "PATH"
    elif origin is list and args and args[0] in (str, int, float):
        kwargs.update(nargs="+", type=args[0], metavar="ITEM")
    elif origin is tuple and args and all(a in (int, float) for a in args):
        kwargs.update(nargs=len(args), type=args[0], metavar="X")
    elif origin is dict:
        kwargs.update(action="append", type=_key_value, metavar="KEY=VALUE")
    else:
        kwargs.update(type=_yaml_value, metavar="VALUE")
    return kwargs


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _add_fields(group: argparse._ArgumentGroup, cls: type, *, prefix: str, skip: set[str], taken: set[str]) -> None:
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = f.name
        if flag in _RESERVED or flag in taken:  # a clash with a command option or the other config
            flag = f"{prefix.rstrip('.')}_{f.name}" if prefix else f"train_{f.name}"
        taken.add(flag)
        kwargs = _flag_kwargs(f.name, hints[f.name], _field_default(f), docs.get(f.name, ""))
        group.add_argument(f"--{flag.replace('_', '-')}", dest=f"{prefix or 'cfg.'}{f.name}", **kwargs)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model (every TrainConfig field is a flag)",
        usage="qing train [DATA] [--config FILE] [--preset NAME] [--FIELD VALUE ...] [--set KEY=VALUE ...]",
        description="Fine-tune a model and write a run folder: checkpoints, TensorBoard logs and the report.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("data", nargs="?", metavar="DATA", help="class-folder root, labels CSV or list file")
    parser.add_argument("--config", type=Path, metavar="FILE", help="a YAML or JSON TrainConfig file")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="start from a named recipe (small_dataset: the original script's)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any field, data.* for data fields (YAML values), e.g. --set data.val_fraction=0.1",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    taken: set[str] = set()
    _add_fields(
        parser.add_argument_group("training (TrainConfig fields)"), TrainConfig, prefix="", skip={"data"}, taken=taken
    )
    data_group = parser.add_argument_group("data (DataConfig fields)")
    _add_fields(data_group, DataConfig, prefix="data.", skip=set(), taken=taken)
    add_common_flags(parser)
    parser.set_defaults(func=run)


def _data_source(data: str) -> dict[str, Any]:
    path = Path(data)
    if path.is_dir():
        key = "root"
    elif path.is_file():
        key = "labels_csv" if path.suffix.lower() == ".csv" else "train_list"
    else:
        raise CLIError(f"DATA {data} does not exist; give a folder of class folders, a labels CSV or a list file")
    return {k: (str(path) if k == key else None) for k in _DATA_SOURCES}


def resolve_config(args: argparse.Namespace) -> Any:
    """The :class:`~qing.train.TrainConfig` the arguments describe."""
    values: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise CLIError(f"config file not found: {args.config}")
        loaded = yaml.safe_load(args.config.read_text())
        if not isinstance(loaded, dict):
            raise CLIError(f"{args.config} must hold a mapping of TrainConfig fields, got {type(loaded).__name__}")
        values = loaded
    if args.preset is not None:
        if values.get("preset") not in (None, args.preset):
            raise CLIError(f"--preset {args.preset} but {args.config} sets preset: {values['preset']}")
        values["preset"] = args.preset
    data = dict(values.get("data") or {})
    if args.data is not None:
        data.update(_data_source(args.data))
    for dest, value in vars(args).items():
        if dest.startswith("cfg."):
            field = dest[4:]
            values[field] = {**(values.get(field) or {}), **dict(value)} if field == "model_args" else value
        elif dest.startswith("data."):
            data[dest[5:]] = value
    if "progress" not in values and not any(o.startswith("progress=") for o in args.overrides):
        values["progress"] = sys.stderr.isatty()
    values["data"] = data
    values = apply_overrides(values, args.overrides)
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    with option_style("cli"):  # the trainer's messages name --resume, --lr 0.001, ... as flags
        result = Trainer(config).fit()
    best = short_path(result.best_checkpoint)
    print(f"run folder: {short_path(result.run_dir)}")
    print(f"best checkpoint: {best} (epoch {result.best_epoch}, {result.monitor}={result.best_value:.4g})")
    if result.test_metrics:
        auroc = result.test_metrics.get("roc_auc")
        if isinstance(auroc, float):
            print(f"test AUROC: {auroc:.3f} on {result.test_metrics['n_samples']} images")
    if result.report_path:
        print(f"report: {short_path(result.report_path)}")
    print("next:")
    print(f"  qing eval {best} OTHER_DATA")
    print(f"  qing predict {best} IMAGES... --output predictions.csv --heatmaps heatmaps/")
    return 0
