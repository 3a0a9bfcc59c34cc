"""``qing demo``: synthetic chest-X-ray-like data -> a trained qing model -> the full evaluation report.

Nothing is downloaded: the images are drawn by :func:`qing.data.make_synthetic_cxr` (seeded, and
labelled SYNTHETIC in every image, file name and the folder's README), and the model is trained
from scratch with :class:`qing.train.Trainer`, the same code ``qing train`` runs.

The standard size's recipe is chosen so that the log shows learning: the residual hybrid
``qing_test_r1`` (its CNN's pooled classifier learns from the first step; an encoder-only head
trained from scratch on 100 drawings barely moves in six epochs), batch 8 for enough optimizer
steps, AdamW at ``lr=1e-2`` with half an epoch of warmup. Six epochs end with a training loss near
0.1 and a validation accuracy near 1 (the demo test checks below 0.3 and at least 0.9).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qing._format import format_value
from qing.cli._common import CLIError, HelpFormatter, add_common_flags, check_new_folder, short_path
from qing.data import PATIENT_REGEX_SYNTHETIC, make_synthetic_cxr
from qing.train import TrainConfig, Trainer

EPILOG = """\
examples:
  qing demo                              # about a minute on a 2-core CPU
  qing demo --output /tmp/qing-demo --overwrite
  qing demo --size tiny                  # seconds: a smoke test of the installation

The data are drawings, not radiographs: lungs with (opacity) or without (normal) bright blurred
patches. Metrics on them say that the pipeline works, nothing about chest X-rays.
"""


@dataclass(frozen=True)
class DemoSize:
    """How much data and training a demo size means."""

    image_size: int
    train_patients_per_class: int
    test_patients_per_class: int
    epochs: int
    batch_size: int
    n_bootstrap: int
    lr: float = 1e-2
    warmup_epochs: float = 0.5


SIZES = {
    "standard": DemoSize(128, 32, 10, 6, 8, 1000),
    "tiny": DemoSize(64, 8, 4, 1, 8, 200),
}
DEFAULT_MODEL = "qing_test_r1"
DATA_FOLDER = "synthetic_cxr"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="synthetic data -> trained model -> evaluation report, offline, in minutes on a CPU",
        description=(
            "Generate a small seeded SYNTHETIC two-class chest-X-ray-like dataset, train a qing model on it,\n"
            "evaluate it and write the full report; nothing is downloaded."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("qing-demo"), metavar="DIR", help="demo folder (default: qing-demo)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in the folder")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="standard",
        help="standard (about a minute on a 2-core CPU) or tiny (seconds: a smoke test, too short to learn)",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"architecture to train (default: {DEFAULT_MODEL}, a tiny hybrid)"
    )
    parser.add_argument("--epochs", type=int, metavar="N", help="training epochs (default: by --size)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the data and the training")
    group = parser.add_argument_group("compute")
    group.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    group.add_argument("--batch-size", type=int, metavar="N", help="training batch size (default: by --size)")
    group.add_argument("--num-workers", type=int, default=0, metavar="N", help="image-reading worker processes")
    add_common_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    size = SIZES[args.size]
    out: Path = args.output
    check_new_folder(out, overwrite=args.overwrite, what="demo folder")
    if args.epochs is not None and args.epochs < 1:
        raise CLIError(f"--epochs must be >= 1, got {args.epochs}")

    data = out / DATA_FOLDER
    print(f"qing demo: drawing SYNTHETIC chest-X-ray-like images (not real X-rays) into {short_path(data)}")
    make_synthetic_cxr(
        data,
        train_patients_per_class=size.train_patients_per_class,
        test_patients_per_class=size.test_patients_per_class,
        images_per_patient=2,
        size=size.image_size,
        seed=args.seed,
    )
    n_train = 2 * 2 * size.train_patients_per_class
    n_test = 2 * 2 * size.test_patients_per_class
    print(f"  classes normal / opacity: {n_train} images to train and validate on, {n_test} to test on")

    config = TrainConfig.from_dict(
        {
            "model": args.model,
            "img_size": size.image_size,
            "batch_size": args.batch_size or size.batch_size,
            "epochs": args.epochs or size.epochs,
            "lr": size.lr,
            "warmup_epochs": size.warmup_epochs,
            "device": args.device,
            "seed": args.seed,
            "n_bootstrap": size.n_bootstrap,
            "log_images": 4,
            "progress": sys.stderr.isatty(),
            "output_dir": str(out / "run"),
            "overwrite": args.overwrite,
            "data": {
                "root": str(data),
                "patient_regex": PATIENT_REGEX_SYNTHETIC,
                "val_fraction": 0.2,
                "cache_images": True,
                "num_workers": args.num_workers,
            },
        }
    )
    print(f"qing demo: training {config.model} at {size.image_size} px for {config.epochs} epoch(s)")
    result = Trainer(config).fit()

    metrics = result.test_metrics or {}
    ci = metrics.get("roc_auc_ci")
    best = short_path(result.best_checkpoint)
    test_image = sorted((data / "test" / "opacity").glob("*.png"))[0]
    print()
    print("qing demo: done (SYNTHETIC data: these numbers show the pipeline works, nothing clinical)")
    print(f"  data:    {short_path(data)} (README.txt says what the images are)")
    print(f"  model:   {best} (best of {result.epochs_completed} epoch(s): epoch {result.best_epoch})")
    first, last = result.history[0], result.history[-1]
    print(
        f"  learned: training loss {format_value(first['train_loss'])} -> {format_value(last['train_loss'])}, "
        f"validation accuracy {format_value(first.get('val_accuracy'))} -> {format_value(last.get('val_accuracy'))} "
        f"(epoch 1 -> {last['epoch']})"
    )
    if metrics:
        print(
            f"  test:    AUROC {format_value(metrics.get('roc_auc'))}"
            + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
            + f", accuracy {format_value(metrics.get('accuracy'))}, "
            f"sensitivity {format_value(metrics.get('sensitivity'))}, "
            f"specificity {format_value(metrics.get('specificity'))} on {metrics.get('n_samples')} images"
        )
    print(f"  time:    {time.perf_counter() - started:.0f} s")
    print(f"  report:  {short_path(result.report_path) if result.report_path else 'not written'}")
    print()
    print("Next: look inside the model, then try real data (class folders such as NORMAL/ and PNEUMONIA/):")
    print(f"  qing predict {best} {short_path(data / 'test')} --output predictions.csv --heatmaps heatmaps/")
    print(f"  qing explain {best} {short_path(test_image)}")
    print("  qing train path/to/chest_xray --model qing_densenet121_tr2 --img-size 224 --output-dir runs/cxr")
    print("  qing eval runs/cxr path/to/chest_xray --split test")
    print("  qing models")
    return 0
