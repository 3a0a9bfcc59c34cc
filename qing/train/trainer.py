"""The Trainer: fine-tune a qing (or timm) model on chest X-rays, on one process or many.

``Trainer(config)`` builds everything, ``.fit()`` runs the whole job::

    data (qing.data.load_splits)  ->  model (qing.create_model, freezing)  ->  epochs of
    train + validate (qing.evaluate.collect_logits)  ->  checkpoints/{best,last}  ->  thresholds
    chosen on validation, test metrics, report/ (qing.evaluate.evaluate_logits)

Launched with ``torchrun --nproc_per_node N``, every process runs the same code: each trains
on its shard of every global batch (``DistributedSampler``), gradients are averaged by
``DistributedDataParallel``, validation/test predictions are gathered from all processes, and
only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from timm.models import get_pretrained_cfg, split_model_name_tag
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from qing._factory import create_model
from qing._io import write_text_atomic
from qing.data import (
    BadFileLog,
    BadImage,
    CXRDataset,
    DataSplits,
    build_datasets,
    build_transforms,
    collate_skip_bad,
    load_splits,
    resolve_image_config,
)
from qing.data.split_record import SPLIT_RECORD, data_folder, split_record_csv
from qing.evaluate import (
    CUDAUnavailableError,
    Evaluation,
    autocast,
    collect_logits,
    evaluate_logits,
    resolve_device,
)
from qing.meta import set_meta
from qing.train.amp import resolve_amp
from qing.train.checkpoint import find_checkpoint, load_model_weights, load_training_state, save_checkpoint
from qing.train.config import TrainConfig
from qing.train.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from qing.train.early_stopping import EarlyStopping
from qing.train.optim import LRSchedule, build_optimizer
from qing.train.run_folder import (
    OutputFolder,
    RunFolderError,
    RunFolderLock,
    inspect_folder,
    record_entries,
    remove_entries,
)
from qing.train.tb import TensorBoardLogger
from qing.train.wording import current_style, option
from qing.weights import WeightsNotFoundError

__all__ = ["Callback", "NonFiniteLossError", "RunResult", "Trainer"]

_log = logging.getLogger("qing.train")

#: Validation metrics recorded every epoch (``val_<name>``), from ``qing.evaluate.compute_metrics``.
VAL_METRICS = {
    "auroc": "roc_auc",
    "pr_auc": "pr_auc",
    "accuracy": "accuracy",
    "f1": "f1",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}
_REPORT_IMAGES = 4
_TRAIN_LOG = "train.log"
_CONFIG_FILE = "config.yaml"
_STATE_FORMAT = 1  # of checkpoints/last/training_state.json


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped, the last good checkpoint is kept."""


class Callback:
    """Hooks into :meth:`Trainer.fit`; override what you need (every process calls them)."""

    def on_step_end(self, trainer: Trainer, *, epoch: int, step: int, loss: torch.Tensor) -> None:
        """After optimizer update ``step`` (0-based within ``epoch``, 0-based).

        ``loss`` is this process's loss of the step, a detached 0-d tensor still on the device:
        ``float(loss)`` makes the host wait for the device, which the trainer itself does only every
        ``log_every_steps`` steps.
        """

    def on_epoch_end(self, trainer: Trainer, *, epoch: int, record: dict[str, Any]) -> None:
        """After epoch ``epoch`` (0-based) was validated and checkpointed; ``record`` is its history row."""


@dataclass
class RunResult:
    """What :meth:`Trainer.fit` produced.

    Attributes:
        run_dir: The run folder.
        best_checkpoint: ``checkpoints/best``: the weights of the best validation epoch, with
            thresholds, task and test metrics in ``config.json`` (loadable with ``local-dir:``).
        last_checkpoint: ``checkpoints/last``: the final weights and the training state.
        best_epoch: Epoch (1-based) of the best checkpoint.
        monitor: The metric that chose it (``early_stopping_metric``).
        best_value: Its value.
        epochs_completed: Epochs trained (including before a resume).
        stopped_early: Whether early stopping ended the run.
        history: One dict per epoch (``epoch``, ``train_loss``, ``val_loss``, ``val_auroc``, ``lr``, ...).
        thresholds: Decision thresholds chosen on validation (``[]`` for multiclass).
        test_metrics: ``qing.evaluate.compute_metrics`` on the test split with those thresholds.
        report_path: ``report/report.html``.
        bad_files: Skipped unreadable images, ``[{"path", "reason"}]``.
    """

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    monitor: str
    best_value: float
    epochs_completed: int
    stopped_early: bool
    history: list[dict[str, Any]]
    thresholds: Optional[list[float]] = None
    test_metrics: Optional[dict[str, Any]] = None
    report_path: Optional[Path] = None
    bad_files: list[dict[str, str]] = field(default_factory=list)


class Trainer:
    """Fine-tune a model as described by a :class:`TrainConfig`.

    Building a trainer builds everything the run needs, one named step after another (as torchgeo's
    ``BaseTask`` does): the device, the ``torchrun`` job (if any), the data splits, the model, the
    transforms, datasets and loaders, the loss, optimizer, LR schedule, gradient scaler, EMA and early
    stopper, and the DDP / ``torch.compile`` wrapping. So ``Trainer(config).model``, ``.datasets``,
    ``.loaders`` and ``.optimizer`` can be looked at before :meth:`fit`, and a configuration error is
    raised here, before the run folder is touched. :meth:`fit` claims the run folder, resumes when
    asked, trains, tests and reports; it runs once per trainer, and leaves the ``torchrun`` job.

    Args:
        config: The run.
        callbacks: :class:`Callback` objects.

    Attributes:
        config: The run.
        callbacks: The :class:`Callback` objects.
        device: Where the model trains.
        env: This process's place in a ``torchrun`` job (:class:`~qing.train.DistEnv`).
        splits: The data splits (:func:`qing.data.load_splits`).
        data_config: The model's preprocessing (input size, mean, std, ...).
        amp_dtype: The autocast dtype, ``None`` for float32.
        datasets: ``{"train", "val", "test"}`` datasets.
        loaders: Their DataLoaders (each process's shard).
        loss_fn: The loss.
        optimizer: The optimizer.
        schedule: The LR schedule (:class:`~qing.train.LRSchedule`).
        scaler: The float16 gradient scaler, else ``None``.
        ema: The EMA of the weights (``ema``), else ``None``.
        stopper: The early stopper.
        train_model: What the training steps call: the model wrapped in SyncBatchNorm, DDP and
            ``torch.compile`` as configured.
        history: One dict per finished epoch.
        global_step: Optimizer updates so far.
        start_epoch: The first epoch :meth:`fit` trains (0-based; later when resumed).
        stopped_early: Whether early stopping ended the run.
        bad_files: The unreadable images met so far.
        tb: The TensorBoard logger while :meth:`fit` runs, else ``None``.
        tb_images: The validation images TensorBoard shows while :meth:`fit` runs, else ``None``.

    Example:
        >>> from qing.train import TrainConfig, Trainer
        >>> cfg = TrainConfig(model="qing_test_tr1", img_size=64, epochs=2,
        ...                   data={"root": "demo_data"}, output_dir="runs/demo")
        >>> trainer = Trainer(cfg)  # doctest: +SKIP
        >>> len(trainer.loaders["train"]), trainer.optimizer  # doctest: +SKIP
        >>> result = trainer.fit()  # doctest: +SKIP
        >>> result.test_metrics["roc_auc"]  # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig, *, callbacks: Sequence[Callback] = ()) -> None:
        self.config = config
        self.callbacks = list(callbacks)
        # the progress of the run: fit() advances it, a resumed checkpoint restores it
        self.history: list[dict[str, Any]] = []
        self.global_step = 0
        self.start_epoch = 0
        self.stopped_early = False
        self.bad_files = BadFileLog()
        # what exists only while fit() runs
        self.tb: Optional[TensorBoardLogger] = None
        self.tb_images: Optional[torch.Tensor] = None
        self._fitted = False
        self._setup_records: list[logging.LogRecord] = []  # what building logged, for train.log

        self.device = self._resolve_device()
        self.env = init_distributed(self.device.type)
        try:
            with self._record_setup_log():
                self._check_output_folders()
                self.config = self._resolve_pretrained()
                self._set_determinism()
                self.splits = self._load_splits()
                self._model = self._create_model(self.splits)
                self.data_config = resolve_image_config(self._model, img_size=self.config.img_size)
                self.amp_dtype = self._resolve_amp()
                self.datasets = self._build_datasets()
                self.loaders = self._build_loaders()
                self.loss_fn = self._build_loss()
                self.optimizer = self._build_optimizer()
                self.schedule = self._build_schedule()
                self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
                self.ema = ModelEmaV3(self._model, decay=config.ema_decay) if config.ema else None
                self.stopper = EarlyStopping(
                    self.config.monitor_metric(self.splits.task), self.config.early_stopping_patience
                )
                self._folders = self._output_folders()
                self.train_model = self._wrap_model()
        except BaseException:
            shutdown_distributed(self.env)
            raise

    # ---- public ------------------------------------------------------------------------------

    def fit(self) -> RunResult:
        """Claim the run folder, train, validate, checkpoint, choose thresholds, test and report.

        Before anything is written the run folder is locked (a second run on it fails at once)
        and checked: an earlier run there needs ``resume`` (continue it from ``checkpoints/last``)
        or ``overwrite`` (remove what it wrote, nothing else); files qing did not write are never
        replaced. ``config.yaml`` and ``splits.csv`` are written once a resume has succeeded.

        Returns:
            A :class:`RunResult` (the same on every process).

        Raises:
            NonFiniteLossError: The loss became NaN/inf (``checkpoints/last`` keeps the last good epoch).
            RunFolderError: The folders hold an earlier run (and neither ``resume`` nor ``overwrite``
                is set), files qing did not write, or another run's output.
            RunFolderBusyError: Another run is using the run folder.
            FileNotFoundError: ``resume`` but there is no complete, resumable ``checkpoints/last``.
            RuntimeError: ``fit()`` already ran on this trainer.
        """
        if self._fitted:
            raise RuntimeError("fit() already ran on this Trainer; create a new one (resume=True continues its run)")
        self._fitted = True
        cfg = self.config
        lock = RunFolderLock(cfg.run_dir) if self.env.is_main else None
        try:
            with self._record_setup_log():  # what preparing the folder logs goes to train.log too
                self._on_main(lock.acquire if lock is not None else None)
                try:
                    last = self._on_main(self._prepare_run_dir)
                except RunFolderError:
                    if lock is not None:
                        lock.release(refused=True)  # the later release in `finally` is then a no-op
                    raise
            barrier(self.env)
            if last is not None and not self.env.is_main:
                last = find_checkpoint(last, repair=False, require_state=True)
            with self._run_logging(train_log=True):
                _log.info(
                    "training %s (%.2fM parameters, %.2fM trainable) on %s x %d process(es); %s: %s, outputs %s, "
                    "%d train / %d val / %d test images",
                    cfg.model, _millions(self._model.parameters()),
                    _millions(p for p in self._model.parameters() if p.requires_grad), self.device,
                    self.env.world_size, self.splits.source, self.splits.task, self.splits.label_names,
                    len(self.splits.train), len(self.splits.val), len(self.splits.test),
                )  # fmt: skip
                if last is not None:
                    self._resume(last)
                self._on_main(self._write_run_files)
                self.tb = self._open_tensorboard(resumed=last is not None)
                self.tb_images = self._sample_images("val", cfg.log_images)
                self._train_loop()
                return self._finish()
        finally:
            if self.tb is not None:
                self.tb.close()
            if lock is not None:
                lock.release()
            shutdown_distributed(self.env)

    @property
    def model(self) -> nn.Module:
        """The model being trained (unwrapped from DDP / ``torch.compile``)."""
        return self._model

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved as best: the EMA weights if ``ema``, else the model."""
        return self.ema.module if self.ema is not None else self._model

    # ---- setup: the steps of __init__, in order ------------------------------------------------

    def _resolve_device(self) -> torch.device:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        try:
            device = resolve_device(self.config.device, local_rank=local_rank)
        except CUDAUnavailableError as err:
            raise RuntimeError(f"device={self.config.device!r} but CUDA is not available; use device='cpu'") from err
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    @contextlib.contextmanager
    def _record_setup_log(self) -> Iterator[None]:
        """Rank 0: log at INFO while the trainer is built (as :meth:`fit` does); keep the records for ``train.log``."""
        if not self.env.is_main:
            yield
            return
        with _qing_logging([_Records(self._setup_records)], console=True):
            yield

    def _check_output_folders(self) -> None:
        """The run's folders must differ (a marker file per folder says what qing wrote there)."""
        cfg = self.config
        named = {
            "output_dir": cfg.run_dir,
            "checkpoint_dir": cfg.checkpoints_path,
            "log_dir": cfg.tensorboard_path,
            "report_dir": cfg.report_path,
        }
        seen: dict[Path, str] = {}
        for setting, path in named.items():
            key = path.expanduser().resolve()
            if key in seen:
                raise ValueError(
                    f"{option(seen[key])} and {option(setting)} are the same folder ({path}); give each its own"
                )
            seen[key] = setting

    def _resolve_pretrained(self) -> TrainConfig:
        """Decide ``pretrained=None`` (the tag's published weights where it has them) and say which, first."""
        cfg = self.config
        if cfg.pretrained_file:
            if cfg.pretrained is False:
                raise ValueError(
                    f"{option('pretrained_file')} is set but {option('pretrained', False)}: drop one of them"
                )
            if not Path(cfg.pretrained_file).is_file():
                raise FileNotFoundError(f"{option('pretrained_file')}: no such file: {cfg.pretrained_file}")
            _log.info("%s: starting from the weights in %s", cfg.model, cfg.pretrained_file)
            return cfg.replace(pretrained=True)
        pretrained = cfg.pretrained
        weights = _published_weights(cfg.model)
        if pretrained is None:
            pretrained = weights is not None
            if pretrained:
                _log.info(
                    "%s: starting from the published weights of %s (the default; %s trains from scratch)",
                    cfg.model, weights, option("pretrained", False),
                )  # fmt: skip
            else:
                _log.info(
                    "%s: training from scratch (random initialization): %s has no published weights",
                    cfg.model, cfg.model,
                )  # fmt: skip
            return cfg.replace(pretrained=pretrained)
        if pretrained:
            _log.info("%s: starting from the published weights of %s", cfg.model, weights or cfg.model)
        else:
            _log.info("%s: training from scratch (random initialization): %s", cfg.model, option("pretrained", False))
        return cfg

    def _set_determinism(self) -> None:
        if self.config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _load_splits(self) -> DataSplits:
        cfg = self.config
        splits = load_splits(cfg.data)
        self.bad_files.update(splits.bad_files.to_list())
        if cfg.num_classes is not None and cfg.num_classes != splits.num_outputs:
            raise ValueError(
                f"num_classes={cfg.num_classes} but the data has {splits.num_outputs} output(s) "
                f"({splits.task}: {splits.label_names})"
            )
        return splits

    def _create_model(self, splits: DataSplits) -> nn.Module:
        cfg = self.config
        kwargs: dict[str, Any] = {
            key: getattr(cfg, key)
            for key in ("embed_dim", "num_heads", "mlp_dim", "depth", "drop_rate", "drop_path_rate")
            if getattr(cfg, key) is not None
        }
        kwargs.update(cfg.model_args)
        kwargs.update(num_classes=splits.num_outputs, in_chans=cfg.in_chans)
        if cfg.img_size and cfg.model.startswith("qing_"):
            kwargs["img_size"] = cfg.img_size
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})  # model_args may set preprocessing
        if cfg.pretrained_file:
            overlay["file"] = str(cfg.pretrained_file)
        overlay = overlay or None
        random_seed(cfg.seed, 0)  # the same initial weights on every process
        try:
            model = create_model(cfg.model, pretrained=cfg.pretrained, pretrained_cfg_overlay=overlay, **kwargs)
        except WeightsNotFoundError as err:
            raise WeightsNotFoundError(_weights_hint(str(err))) from None
        data_cfg = resolve_image_config(model, img_size=cfg.img_size)
        model.pretrained_cfg = {
            **model.pretrained_cfg,
            **{k: data_cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")},
            "num_classes": splits.num_outputs,
            "label_names": tuple(splits.label_names),
        }
        negative = splits.class_names[0] if splits.task == "binary" else None
        set_meta(model, task=splits.task, datasets=[_dataset_name(cfg)], negative_label=negative)
        if cfg.freeze_backbone:
            if not hasattr(model, "freeze_backbone"):
                raise ValueError(
                    f"{option('freeze_backbone')} needs a qing CNN-Transformer; {cfg.model} has no freeze_backbone()"
                )
            if not cfg.pretrained:
                _log.warning(
                    "%s with %s freezes a randomly initialized backbone; drop %s, or start from weights "
                    "(%s, or %s)",
                    option("freeze_backbone", True), option("pretrained", False), option("freeze_backbone", True),
                    option("pretrained", True), option("pretrained_file", "PATH"),
                )  # fmt: skip
            model.freeze_backbone(cfg.trainable_backbone_layers)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def _resolve_amp(self) -> Optional[torch.dtype]:
        dtype = resolve_amp(self.config.amp, self.device)
        if dtype is not None and self.config.amp == "auto":
            _log.info("amp='auto': %s autocast on %s", str(dtype).removeprefix("torch."), self.device)
        return dtype

    def _build_datasets(self) -> dict[str, CXRDataset]:
        cfg, data = self.config, self.config.data
        train_tf = build_transforms(
            self._model,
            train=True,
            img_size=cfg.img_size,
            rotation=data.rotation,
            translate=data.translate,
            scale=data.scale,
            hflip_prob=data.hflip_prob,
        )
        eval_tf = build_transforms(self._model, train=False, img_size=cfg.img_size)
        datasets = build_datasets(
            self.splits, train_transform=train_tf, eval_transform=eval_tf, cache=data.cache_images
        )
        self.bad_files.update(self.splits.bad_files.to_list())
        return datasets

    def _build_loaders(self) -> dict[str, DataLoader]:
        cfg = self.config
        if cfg.batch_size % self.env.world_size:
            raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {self.env.world_size} processes")
        per_rank = cfg.batch_size // self.env.world_size
        n_train = len(self.datasets["train"])
        if cfg.drop_last and n_train < cfg.batch_size:
            raise ValueError(
                f"the train split has {n_train} images, fewer than one batch of {cfg.batch_size}; "
                "lower batch_size or set drop_last=False"
            )
        loaders: dict[str, DataLoader] = {}
        for name, dataset in self.datasets.items():
            train = name == "train"
            sampler = DistributedSampler(
                dataset, num_replicas=self.env.world_size, rank=self.env.rank, shuffle=train, seed=cfg.seed
            )
            loaders[name] = DataLoader(
                dataset,
                batch_size=per_rank,
                sampler=sampler,
                num_workers=cfg.data.num_workers,
                collate_fn=collate_skip_bad,
                pin_memory=self.device.type == "cuda",
                drop_last=train and cfg.drop_last,
            )
        return loaders

    def _build_loss(self) -> nn.Module:
        cfg, task = self.config, self.splits.task
        if task == "multiclass":
            if cfg.pos_weight is not None:
                raise ValueError("pos_weight applies to binary and multilabel tasks, not multiclass")
            return nn.CrossEntropyLoss()
        pos_weight = None
        if cfg.pos_weight == "auto":
            targets = self.datasets["train"].targets
            positives = targets.sum(dim=0)
            if (positives == 0).any():
                empty = [n for n, p in zip(self.splits.label_names, positives) if p == 0]
                raise ValueError(f"pos_weight='auto': no positive training images for {empty}")
            pos_weight = (len(targets) - positives) / positives
            _log.info("pos_weight (negatives/positives in train): %s", [round(float(w), 3) for w in pos_weight])
        elif cfg.pos_weight is not None:
            values = cfg.pos_weight if isinstance(cfg.pos_weight, list) else [cfg.pos_weight]
            if len(values) not in (1, self.splits.num_outputs):
                raise ValueError(f"pos_weight has {len(values)} values for {self.splits.num_outputs} outputs")
            pos_weight = torch.tensor(values, dtype=torch.float32).expand(self.splits.num_outputs).clone()
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight.to(self.device) if pos_weight is not None else None)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        keys = ("lr", "backbone_lr", "encoder_lr", "encoder_weight_decay", "weight_decay", "momentum")
        options = {key: getattr(cfg, key) for key in keys}
        return build_optimizer(self._model, name=cfg.optimizer, **options)

    def _build_schedule(self) -> LRSchedule:
        cfg = self.config
        steps_per_epoch = len(self.loaders["train"])
        schedule = LRSchedule(
            self.optimizer,
            kind=cfg.scheduler,
            total_steps=steps_per_epoch * cfg.epochs,
            warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
            min_lr=cfg.min_lr,
            plateau_factor=cfg.plateau_factor,
            plateau_patience=cfg.plateau_patience,
        )
        schedule.step_update(self.global_step)  # the LR of the first update (the start of the warmup)
        return schedule

    def _wrap_model(self) -> nn.Module:
        """What the training steps call: the model with SyncBatchNorm, in DDP and compiled, as configured."""
        cfg = self.config
        model: nn.Module = self._model
        if cfg.sync_batchnorm and self.env.enabled:
            if self.device.type != "cuda":
                raise ValueError("sync_batchnorm needs CUDA; on CPU freeze the backbone (frozen BatchNorm) instead")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.env.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        if cfg.compile:
            model = torch.compile(model)
        return model

    # ---- the run folder (fit) ------------------------------------------------------------------

    def _output_folders(self) -> list[OutputFolder]:
        cfg = self.config
        return [
            OutputFolder("run", cfg.run_dir, "output_dir", (_TRAIN_LOG, _CONFIG_FILE, SPLIT_RECORD)),
            OutputFolder("checkpoints", cfg.checkpoints_path, "checkpoint_dir", ("best", "last")),
            OutputFolder("tensorboard", cfg.tensorboard_path, "log_dir"),
            OutputFolder("report", cfg.report_path, "report_dir"),
        ]

    def _on_main(self, step: Optional[Callable[[], Any]]) -> Any:
        """Run ``step`` on rank 0 only; every process returns its result or raises its error."""
        outcome: Any = None
        if self.env.is_main and step is not None:
            try:
                outcome = (step(), None)
            except Exception as err:  # handed to the other processes, raised on all
                outcome = (None, err)
        if self.env.enabled:
            outcome = all_gather_objects(outcome, self.env)[0]
        if outcome is None:
            return None
        value, error = outcome
        if error is not None:
            raise error
        return value

    def _prepare_run_dir(self) -> Optional[Path]:
        """Rank 0: check the folders, find the checkpoint to resume or remove an earlier run; mark the folders.

        Returns:
            ``checkpoints/last`` when resuming, else ``None``.
        """
        cfg = self.config
        run_dir = cfg.run_dir
        unused = {"tensorboard": not cfg.tensorboard, "report": not cfg.report}
        states = [inspect_folder(folder, run_dir) for folder in self._folders]
        problems = []
        for state in states:
            if unused.get(state.folder.kind):
                continue  # this run writes nothing there (an earlier run's output there may still go)
            where = f"{option(state.folder.setting)} {state.folder.path}"
            if state.other_run is not None:
                problems.append(f"{where} holds the output of another run ({state.other_run})")
            elif state.foreign:
                problems.append(f"{where} holds {_some(state.foreign)}, which qing did not write")
        if problems:
            raise RunFolderError(
                "; ".join(problems) + ". qing never removes or replaces files it did not write: give this run "
                "empty or new folders, or move those files away. Nothing was changed."
            )
        earlier = [state for state in states if state.ours]
        last = None
        if cfg.resume:
            last = self._resumable_last()
        if earlier and last is None:
            if not cfg.overwrite:
                found = ", ".join(f"{s.folder.path}/{_some(s.ours, 3)}" for s in earlier)
                raise RunFolderError(
                    f"{run_dir} already holds a run ({found}); {option('resume', True)} continues it, "
                    f"{option('overwrite', True)} replaces it (removing only what qing wrote), or give this run "
                    f"another folder ({option('output_dir', 'DIR')})"
                )
            for state in earlier:
                remove_entries(state)
            removed = "; ".join(f"{s.folder.path}: {', '.join(s.ours)}" for s in earlier)
            _log.info("overwrite: removed what the earlier run wrote (%s)", removed)
        for folder in self._folders:
            if unused.get(folder.kind):
                continue
            record_entries(folder, run_dir, folder.entries, reset=last is None)
        return last

    def _resumable_last(self) -> Optional[Path]:
        """Rank 0: the complete ``checkpoints/last`` (repaired), or ``None`` to start over (only with overwrite)."""
        cfg = self.config
        last_dir = cfg.checkpoints_path / "last"
        last = find_checkpoint(last_dir, require_state=True)
        why = None
        if last is None:
            why = "no complete checkpoint there" if not last_dir.exists() else "it is incomplete or unreadable"
        else:
            try:
                state_format = load_training_state(last).get("format")
            except (OSError, ValueError, KeyError) as err:
                state_format, why = None, f"its training state is unreadable: {err}"
            if why is None and state_format != _STATE_FORMAT:
                why = f"its training state has format {state_format!r}, this qing reads {_STATE_FORMAT}"
        if why is None:
            return last
        if cfg.overwrite:
            _log.warning("%s: cannot resume from %s (%s): starting a new run", option("overwrite", True), last_dir, why)
            return None
        raise FileNotFoundError(
            f"{option('resume', True)} but {last_dir} cannot be resumed: {why}. Nothing was changed. To start a new "
            f"run, drop {option('resume')} (with {option('overwrite', True)} if the folder holds an earlier run)"
        )

    def _write_run_files(self) -> None:
        """Rank 0, once a resume succeeded: ``config.yaml`` (the resolved config) and ``splits.csv``."""
        cfg = self.config
        cfg.replace(resume=False, overwrite=False).save(cfg.run_dir / _CONFIG_FILE)
        base = data_folder(cfg.data)
        write_text_atomic(cfg.run_dir / SPLIT_RECORD, split_record_csv(self.splits, base))

    def _open_tensorboard(self, *, resumed: bool) -> TensorBoardLogger:
        """The run's TensorBoard logger; rank 0 records its new event file as qing's in the folder marker."""
        cfg = self.config
        enabled = cfg.tensorboard and self.env.is_main
        folder = next(f for f in self._folders if f.kind == "tensorboard")
        before = set(os.listdir(folder.path)) if enabled else set()
        tb = TensorBoardLogger(
            cfg.tensorboard_path, enabled=enabled, purge_step=self.global_step + 1 if resumed else None
        )
        if enabled:
            tb.flush()
            record_entries(folder, cfg.run_dir, sorted(set(os.listdir(folder.path)) - before))
        return tb

    @contextlib.contextmanager
    def _run_logging(self, *, train_log: bool) -> Iterator[None]:
        """Rank 0: the ``qing`` loggers at INFO to ``train.log`` (what building logged first) and the console."""
        if not self.env.is_main:
            yield
            return
        handlers: list[logging.Handler] = []
        if train_log:
            handler = logging.FileHandler(self.config.run_dir / _TRAIN_LOG, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            for record in self._setup_records:
                handler.handle(record)
            handlers.append(handler)
        with _qing_logging(handlers, console=True):
            yield

    def _resume(self, last: Path) -> None:
        state = load_training_state(last)
        differing = _config_differences(state.get("config", {}), self.config.to_dict())
        if differing:
            _log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(differing))
        load_model_weights(last, self._model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError(f"{last} was saved without EMA weights; resume with {option('ema', False)}")
            self.ema.module.load_state_dict(state["ema"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.history = list(state["history"])
        self.global_step = int(state["global_step"])
        self.schedule.step_update(self.global_step)
        self.start_epoch = int(state["epoch"])
        self.stopped_early = bool(state.get("stopped_early", False))
        self.bad_files.update(state.get("bad_files", []))
        _log.info("resumed from %s after epoch %d (step %d)", last, self.start_epoch, self.global_step)

    # ---- training ----------------------------------------------------------------------------

    def _train_loop(self) -> None:
        cfg = self.config
        for epoch in range(self.start_epoch, cfg.epochs):
            if self.stopped_early:
                break
            started = time.perf_counter()
            train_loss, n_images = self._train_epoch(epoch)
            val = self._validate()
            elapsed = time.perf_counter() - started
            record = {"epoch": epoch + 1, "train_loss": train_loss, **val, **self._lrs()}
            record.update(epoch_time_s=elapsed, train_images_per_s=n_images / max(elapsed, 1e-9))
            self.schedule.step_epoch(record["val_loss"])
            if self.stopper.metric not in record:
                known = sorted(k for k in record if k.startswith("val_"))
                raise ValueError(f"early_stopping_metric {self.stopper.metric!r} is not one of {known}")
            improved = self.stopper.update(record[self.stopper.metric], epoch + 1)
            self.history.append(record)
            self.stopped_early = self.stopper.should_stop
            for entry in all_gather_objects(self.bad_files.to_list(), self.env):
                self.bad_files.update(entry)
            if self.env.is_main:
                if improved:
                    self._save_best(epoch + 1)
                self._save_last(epoch + 1)
                self.tb.scalars(record, self.global_step, prefix="epoch/")
                self.tb.images(
                    self.eval_model,
                    self.tb_images,
                    self.global_step,
                    mean=self.data_config["mean"],
                    std=self.data_config["std"],
                    inputs=epoch == self.start_epoch,
                )
                self.tb.flush()
                _log.info(
                    "epoch %d/%d: %s",
                    epoch + 1,
                    cfg.epochs,
                    ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)),
                )
            for callback in self.callbacks:
                callback.on_epoch_end(self, epoch=epoch, record=record)
            barrier(self.env)
            if self.stopped_early:
                _log.info(
                    "early stopping after epoch %d: %s has not improved for %d epochs (best %.4g at epoch %d)",
                    epoch + 1, self.stopper.metric, self.stopper.bad_epochs, self.stopper.best,
                    self.stopper.best_epoch,
                )  # fmt: skip

    def _set_train_mode(self) -> None:
        """Train mode, except BatchNorm layers whose parameters are all frozen (they keep their statistics)."""
        self._model.train()
        for module in self._model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                params = list(module.parameters(recurse=False))
                if params and not any(p.requires_grad for p in params):
                    module.eval()

    def _reseed(self, epoch: int) -> None:
        """Seed every RNG from (seed, epoch, rank): a resumed epoch replays exactly."""
        random_seed(self.config.seed + 1000 * (epoch + 1), self.env.rank)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp_dtype)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if self.config.channels_last else torch.contiguous_format
        return images.to(self.device, non_blocking=True, memory_format=memory_format)

    def _train_epoch(self, epoch: int) -> tuple[float, int]:
        """One epoch of optimizer steps; returns (mean training loss, images trained on).

        The host reads the loss only every ``log_every_steps`` steps and at the end of the epoch
        (:class:`_LossWindow`): until then the losses stay on the device, so the device is never
        waited for step by step. A NaN/inf loss is found at the next such read.
        """
        cfg = self.config
        self._reseed(epoch)
        loader = self.loaders["train"]
        loader.sampler.set_epoch(epoch)
        self._set_train_mode()
        window = _LossWindow()
        total_loss, total_images = 0.0, 0
        started = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            disable=not (cfg.progress and self.env.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        n_steps = len(loader)
        for step, batch in enumerate(bar):
            self._record_bad(batch["bad"])
            images, targets, weight = batch["image"], batch["target"], 1.0
            if images is None:  # every image of this batch was unreadable
                if not self.env.enabled:
                    continue
                # other processes wait in the gradient all-reduce: join with a zero-weight batch
                images = torch.zeros((1, *self.data_config["input_size"]))
                targets, weight = self.datasets["train"].targets[:1], 0.0
            images, targets = self._to_device(images), targets.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.train_model(images)
            loss = self.loss_fn(logits.float(), targets) * weight
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if cfg.grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(self._model.parameters(), cfg.grad_clip_norm)
            if step == 0:
                self.tb.grad_histograms(self._model, self.global_step + 1)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.global_step += 1
            self.schedule.step_update(self.global_step)
            if self.ema is not None:
                self.ema.update(self._model, step=self.global_step)

            window.add(loss.detach(), step, len(images) * self.env.world_size if weight else 0)
            if self.global_step % cfg.log_every_steps == 0 or step == n_steps - 1:
                loss_sum, n_images = self._read_losses(window, epoch, step)
                total_loss, total_images = total_loss + loss_sum, total_images + n_images
                rate = total_images / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(loss=f"{loss_sum / max(n_images, 1):.4f}", img_s=f"{rate:.1f}")
            for callback in self.callbacks:
                callback.on_step_end(self, epoch=epoch, step=step, loss=loss.detach())
        if window.losses:  # the last batch was skipped (unreadable)
            loss_sum, n_images = self._read_losses(window, epoch, n_steps - 1)
            total_loss, total_images = total_loss + loss_sum, total_images + n_images
        bar.close()
        if total_images == 0:
            raise RuntimeError(f"epoch {epoch + 1} trained on no images: every training image was unreadable")
        return total_loss / total_images, total_images

    def _read_losses(self, window: _LossWindow, epoch: int, step: int) -> tuple[float, int]:
        """Read the window's losses (stopping on NaN/inf), log them; returns (sum of loss x images, images)."""
        losses = window.read(self.env)  # the host waits for the device here, and only here
        for at, value in losses:
            if not math.isfinite(value):
                self._stop_non_finite(value, epoch, at, step)
        mean = window.mean(losses)
        loss_sum = sum(value * n for (_, value), n in zip(losses, window.images))
        n_images = sum(window.images)
        window.clear()
        self.tb.scalars({"train/loss": mean}, self.global_step)
        self.tb.scalars({f"train/lr/{k}": v for k, v in self._lrs().items()}, self.global_step)
        return loss_sum, n_images

    def _stop_non_finite(self, value: float, epoch: int, step: int, noticed: int) -> None:
        last = self.config.checkpoints_path / "last"
        saved = f"{last} (after epoch {self.history[-1]['epoch']})" if self.history else "none (first epoch)"
        when = f"at epoch {epoch + 1}, step {step + 1}"
        if noticed != step:
            when += (
                f" (noticed after step {noticed + 1}: the loss is read every "
                f"{option('log_every_steps')}={self.config.log_every_steps} steps and at the end of each epoch)"
            )
        message = (
            f"training loss is {value} {when}: stopping. Last good checkpoint: {saved}. "
            f"Lower {option('lr')} (now {self.config.lr:g}), set {option('grad_clip_norm')}, check the inputs, "
            f"then rerun with {option('resume', True)}."
        )
        _log.error(message)
        raise NonFiniteLossError(message)

    def _record_bad(self, bad: Sequence[BadImage]) -> None:
        for item in bad:
            self.bad_files.add(item.path, item.reason)

    def _lrs(self) -> dict[str, float]:
        lrs = {}
        for group in self.optimizer.param_groups:
            part = group.get("name", "head").removesuffix("_no_decay")
            lrs["lr" if part == "head" else f"{part}_lr"] = float(group["lr"])
        return lrs

    # ---- evaluation --------------------------------------------------------------------------

    def predict(self, split: str, model: Optional[nn.Module] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets of a split, gathered from all processes, in dataset order.

        Unreadable images are left out (and recorded in ``bad_files``).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            model: Model to run (default :attr:`eval_model`).

        Returns:
            ``(logits (N, C) float32 CPU, targets)``, targets as in :func:`qing.data.encode_targets`.
        """
        model = model if model is not None else self.eval_model
        local = collect_logits(
            model,
            self.loaders[split],
            device=self.device,
            amp_dtype=self.amp_dtype,
            channels_last=self.config.channels_last,
        )
        self._record_bad(local.bad)
        merged: dict[int, torch.Tensor] = {}
        for indices, logits in all_gather_objects((local.indices, local.logits), self.env):
            merged.update(zip(indices.tolist(), logits))  # DistributedSampler pads with repeats: keep one
        order = sorted(merged)
        if not order:
            raise RuntimeError(f"no readable images in the {split} split")
        return torch.stack([merged[i] for i in order]), self.datasets[split].targets[order]

    def _validate(self) -> dict[str, float]:
        logits, targets = self.predict("val")
        loss = float(self.loss_fn(logits.to(self.device), targets.to(self.device)))
        metrics = self._evaluate(logits, targets, n_bootstrap=0).metrics
        out = {"val_loss": loss}
        for name, key in VAL_METRICS.items():
            value = metrics.get(key)
            out[f"val_{name}"] = float(value) if isinstance(value, (int, float)) else float("nan")
        return out

    def _evaluate(self, logits: torch.Tensor, targets: torch.Tensor, **kwargs: Any) -> Evaluation:
        """:func:`qing.evaluate.evaluate_logits` with the task, labels and negative class of the data."""
        task = self.splits.task
        return evaluate_logits(
            logits,
            targets,
            task=task,
            label_names=self.splits.label_names,
            negative_label=self.splits.class_names[0] if task == "binary" else None,
            **kwargs,
        )

    # ---- checkpoints -------------------------------------------------------------------------

    def _checkpoint_kwargs(self) -> dict[str, Any]:
        return {"label_names": list(self.splits.label_names), "data_config": dict(self.data_config)}

    def _save_best(self, epoch: int) -> None:
        state = {"epoch": epoch, "monitor": self.stopper.metric, "value": self.stopper.best}
        save_checkpoint(
            self.config.checkpoints_path / "best", self.eval_model, training_state=state, **self._checkpoint_kwargs()
        )

    def _save_last(self, epoch: int) -> None:
        state = {
            "format": _STATE_FORMAT,
            "epoch": epoch,
            "global_step": self.global_step,
            "history": self.history,
            "early_stopping": self.stopper.state_dict(),
            "stopped_early": self.stopped_early,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "bad_files": self.bad_files.to_list(),
            "config": self.config.to_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        save_checkpoint(
            self.config.checkpoints_path / "last", self._model, training_state=state, **self._checkpoint_kwargs()
        )

    # ---- the end -----------------------------------------------------------------------------

    def _finish(self) -> RunResult:
        cfg = self.config
        barrier(self.env)
        best = find_checkpoint(cfg.checkpoints_path / "best", repair=self.env.is_main)
        last = cfg.checkpoints_path / "last"
        if best is None:
            raise RuntimeError(f"no best checkpoint in {cfg.checkpoints_path}; did any epoch finish?")
        model = self.eval_model
        load_model_weights(best, model)
        thresholds = metrics = report = None
        if cfg.report:
            val_logits, val_targets = self.predict("val", model)
            test_logits, test_targets = self.predict("test", model)
            for entry in all_gather_objects(self.bad_files.to_list(), self.env):
                self.bad_files.update(entry)
            outcome = None
            if self.env.is_main:
                evaluation = self._evaluate(
                    test_logits,
                    test_targets,
                    val_logits=val_logits,
                    val_targets=val_targets,
                    method=cfg.threshold_method,
                    target_sensitivity=cfg.target_sensitivity,
                    n_bootstrap=cfg.n_bootstrap,
                    seed=cfg.seed,
                )
                outcome = (evaluation.thresholds, evaluation.metrics, self._write_outputs(best, model, evaluation))
            thresholds, metrics, report = all_gather_objects(outcome, self.env)[0]
        barrier(self.env)
        return RunResult(
            run_dir=cfg.run_dir,
            best_checkpoint=best,
            last_checkpoint=last,
            best_epoch=self.stopper.best_epoch,
            monitor=self.stopper.metric,
            best_value=float(self.stopper.best),
            epochs_completed=len(self.history),
            stopped_early=self.stopped_early,
            history=list(self.history),
            thresholds=thresholds,
            test_metrics=metrics,
            report_path=report,
            bad_files=self.bad_files.to_list(),
        )

    def _write_outputs(self, best: Path, model: nn.Module, evaluation: Evaluation) -> Path:
        """Store thresholds + metrics with the best checkpoint and write the report (rank 0)."""
        cfg = self.config
        evaluation.store(model)
        state = {"epoch": self.stopper.best_epoch, "monitor": self.stopper.metric, "value": self.stopper.best}
        save_checkpoint(best, model, training_state=state, model_card=True, **self._checkpoint_kwargs())
        images = self._sample_images("test", min(_REPORT_IMAGES, cfg.log_images))
        explainable = images is not None and hasattr(model, "forward_attention")
        report = evaluation.write_report(
            cfg.report_path,
            history=self.history,
            model=model if explainable else None,
            images=images if explainable else None,
            mean=self.data_config["mean"],
            std=self.data_config["std"],
            bad_files=self.bad_files.to_list(),
            title=f"{cfg.model} on {_dataset_name(cfg)}",
        )
        folder = next(f for f in self._folders if f.kind == "report")
        record_entries(folder, cfg.run_dir, os.listdir(folder.path))
        _log.info("report: %s; best checkpoint (epoch %d): %s", report, self.stopper.best_epoch, best)
        return report

    def _sample_images(self, split: str, n: int) -> Optional[torch.Tensor]:
        """Up to ``n`` readable images spread evenly over a split (so over its class folders), ``(n, C, H, W)``."""
        if n <= 0:
            return None
        dataset: CXRDataset = self.datasets[split]
        step = max(1, len(dataset) // n)
        order = [*range(0, len(dataset), step), *(i for i in range(len(dataset)) if i % step)]
        images = []
        for i in order:
            if len(images) >= n:
                break
            item = dataset[i]
            if not isinstance(item, BadImage):
                images.append(item["image"])
        return torch.stack(images) if images else None


# ---- helpers ----------------------------------------------------------------------------------


class _LossWindow:
    """The training losses since the host last read them, kept on the device.

    :meth:`read` moves them to the host in one transfer (and, under ``torchrun``, one all-reduce
    averaging them over processes), as timm's ``train.py`` does every ``log_interval`` steps.
    """

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.images: list[int] = []

    def add(self, loss: torch.Tensor, step: int, images: int) -> None:
        """Keep a step's (detached, 0-d) loss and the number of images it averaged over (all processes)."""
        self.losses.append(loss)
        self.steps.append(step)
        self.images.append(images)

    def read(self, env: DistEnv) -> list[tuple[int, float]]:
        """``[(step, loss averaged over processes), ...]``: the one place the host waits for the device."""
        if not self.losses:
            return []
        values = all_reduce_mean(torch.stack(self.losses).float(), env).tolist()
        return list(zip(self.steps, values))

    def mean(self, losses: list[tuple[int, float]]) -> float:
        """The image-weighted mean of the losses read (the plain mean if no step had images)."""
        n = sum(self.images)
        if not n:
            return sum(value for _, value in losses) / max(len(losses), 1)
        return sum(value * k for (_, value), k in zip(losses, self.images)) / n

    def clear(self) -> None:
        self.losses, self.steps, self.images = [], [], []


class _Records(logging.Handler):
    """Keeps the records it handles in a list."""

    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _ConsoleFormatter(logging.Formatter):
    """``qing.train: epoch 1/5: ...`` for progress, ``qing: warning: ...`` for warnings (as the CLI prints them)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"qing: {record.levelname.lower()}: {message}"
        return f"{record.name}: {message}"


def _console_record(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.startswith("qing.train")


def _logging_configured() -> bool:
    """Whether the program set up handlers that would show qing's records (root or the qing loggers)."""
    return any(logging.getLogger(name).handlers for name in ("", "qing", "qing.train"))


class _Propagate(logging.Handler):
    """Passes on to the parent loggers' handlers what the program's own logger levels let through."""

    def __init__(self, parent: logging.Logger, saved_levels: dict[str, int]) -> None:
        super().__init__()
        self.parent, self.saved_levels = parent, saved_levels

    def _program_level(self, name: str) -> int:
        logger: Optional[logging.Logger] = logging.getLogger(name)
        while logger is not None:
            level = self.saved_levels.get(logger.name, logger.level)
            if level != logging.NOTSET:
                return level
            logger = logger.parent
        return logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= self._program_level(record.name):
            self.parent.handle(record)


@contextlib.contextmanager
def _qing_logging(handlers: Sequence[logging.Handler], *, console: bool) -> Iterator[None]:
    """``handlers`` on the ``qing`` logger at INFO meanwhile, plus a console handler if none is configured.

    ``handlers`` (``train.log``) get every INFO line in every case. When the program has not configured
    logging, ``qing.train`` progress (one line per epoch) and every ``qing`` warning go to stderr; a level
    set on ``logging.getLogger("qing.train")`` (e.g. ``WARNING``) is the console's. When it has configured
    logging, qing adds no console handler, and the program's handlers get what the levels it set on the
    ``qing`` / ``qing.train`` loggers let through (every INFO line where it set none).
    """
    loggers = [logging.getLogger("qing"), logging.getLogger("qing.train")]
    explicit = any(logger.level != logging.NOTSET for logger in loggers)
    configured = _logging_configured()
    added = list(handlers)
    if console and not configured:
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(loggers[1].getEffectiveLevel() if explicit else logging.INFO)
        stream.setFormatter(_ConsoleFormatter())
        stream.addFilter(_console_record)
        added.append(stream)
    levels = [logger.level for logger in loggers]
    propagate = loggers[0].propagate
    program_levels = configured and explicit
    # Handlers on the qing loggers themselves: their levels stay the program's (train.log gets what passes).
    if not (program_levels and any(logger.handlers for logger in loggers)):
        if program_levels and propagate and loggers[0].parent is not None:  # its levels still gate its handlers
            saved = {logger.name: level for logger, level in zip(loggers, levels)}
            added.append(_Propagate(loggers[0].parent, saved))
            loggers[0].propagate = False
        for logger in loggers:
            if logger.level == logging.NOTSET or logger.level > logging.INFO:
                logger.setLevel(logging.INFO)
    for handler in added:
        loggers[0].addHandler(handler)
    try:
        yield
    finally:
        for handler in added:
            loggers[0].removeHandler(handler)
            handler.close()
        loggers[0].propagate = propagate
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _some(names: Sequence[str], n: int = 5) -> str:
    """Up to ``n`` names, then how many more."""
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _weights_hint(message: str) -> str:
    """A missing-weights message with the ways to give this run weights, named as the front end spells them."""
    lines = message.splitlines()
    if current_style() != "python":  # a command line: no Python code to copy
        lines = [line for line in lines if "pretrained_cfg_overlay" not in line and "qing.create_model(" not in line]
    lines.append(
        f"For this run: {option('pretrained_file', 'PATH')} loads a weights file you have; "
        f"{option('pretrained', False)} trains from scratch (random initialization)."
    )
    return "\n".join(lines)


def _millions(params: Iterator[nn.Parameter]) -> float:
    return sum(p.numel() for p in params) / 1e6


def _published_weights(model: str) -> Optional[str]:
    """``architecture.tag`` whose weights ``model`` loads with ``pretrained=True``, ``None`` if it has none."""
    if model.startswith(("hf-hub:", "local-dir:")):
        return model
    architecture, tag = split_model_name_tag(model)
    cfg = get_pretrained_cfg(model, allow_unregistered=True) if architecture else None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
        return None
    return f"{architecture}.{cfg.tag or tag}" if (cfg.tag or tag) else architecture


def _dataset_name(cfg: TrainConfig) -> str:
    data = cfg.data
    source = data.root or data.train_dir or data.labels_csv or data.train_list or "data"
    path = Path(source)
    return (path.parent.name if path.suffix else path.name) or str(source)


def _config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    ignore = {"resume", "overwrite", "epochs", "progress", "tensorboard", "report", "n_bootstrap"}
    out = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in ignore:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out
