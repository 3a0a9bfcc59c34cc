"""The Trainer: fine-tune a qing (or timm) model on chest X-rays, on one process or many.

``Trainer(config).fit()`` runs the whole job::

    data (qing.data.load_splits)  ->  model (qing.create_model, freezing)  ->  epochs of
    train + validate  ->  checkpoints/{best,last}  ->  thresholds chosen on validation  ->
    test metrics  ->  report/ (qing.evaluate.write_report)

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
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

import qing
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
from qing.evaluate import choose_thresholds, compute_metrics, probabilities, threshold_method_name, write_report
from qing.meta import set_meta
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
from qing.train.tb import TensorBoardLogger

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


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped, the last good checkpoint is kept."""


class Callback:
    """Hooks into :meth:`Trainer.fit`; override what you need (every process calls them)."""

    def on_step_end(self, trainer: Trainer, *, epoch: int, step: int, loss: float) -> None:
        """After optimizer update ``step`` (0-based within ``epoch``, 0-based) with the global mean loss."""

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

    Args:
        config: The run.
        callbacks: :class:`Callback` objects.

    Example:
        >>> from qing.train import TrainConfig, Trainer
        >>> cfg = TrainConfig(model="qing_test_tr1", img_size=64, epochs=2,
        ...                   data={"root": "demo_data"}, output_dir="runs/demo")
        >>> result = Trainer(cfg).fit()  # doctest: +SKIP
        >>> result.test_metrics["roc_auc"]  # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig, *, callbacks: Sequence[Callback] = ()) -> None:
        self.config = config
        self.callbacks = list(callbacks)
        self.env = DistEnv()
        self.history: list[dict[str, Any]] = []
        self.global_step = 0
        self.start_epoch = 0
        self.stopped_early = False
        self.bad_files = BadFileLog()

    # ---- public ------------------------------------------------------------------------------

    def fit(self) -> RunResult:
        """Train, validate, checkpoint, choose thresholds, test and report.

        Returns:
            A :class:`RunResult` (the same on every process).

        Raises:
            NonFiniteLossError: The loss became NaN/inf (``checkpoints/last`` keeps the last good epoch).
            FileExistsError: ``output_dir`` holds an earlier run and neither ``resume`` nor ``overwrite`` is set.
        """
        self.device = self._resolve_device()
        self.env = init_distributed(self.device.type)
        self.tb: Optional[TensorBoardLogger] = None
        try:
            last = self._check_run_dir()
            self._load_data_and_model()  # configuration errors surface before the run folder is touched
            self._claim_run_dir()
            with self._log_to_file():
                _log.info(
                    "training %s (%.2fM parameters, %.2fM trainable) on %s x %d process(es); %s: %s, outputs %s, "
                    "%d train / %d val / %d test images",
                    self.config.model, _millions(self._model.parameters()),
                    _millions(p for p in self._model.parameters() if p.requires_grad), self.device,
                    self.env.world_size, self.splits.source, self.splits.task, self.splits.label_names,
                    len(self.splits.train), len(self.splits.val), len(self.splits.test),
                )  # fmt: skip
                self._prepare(last)
                self._train_loop()
                return self._finish()
        finally:
            if self.tb is not None:
                self.tb.close()
            shutdown_distributed(self.env)

    @property
    def model(self) -> nn.Module:
        """The model being trained (unwrapped from DDP / ``torch.compile``)."""
        return self._model

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved as best: the EMA weights if ``ema``, else the model."""
        return self.ema.module if self.ema is not None else self._model

    # ---- setup -------------------------------------------------------------------------------

    def _resolve_device(self) -> torch.device:
        wanted = self.config.device
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        if wanted.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError(f"device={self.config.device!r} but CUDA is not available; use device='cpu'")
            device = torch.device(wanted if ":" in wanted else f"cuda:{local_rank}")
            torch.cuda.set_device(device)
            return device
        return torch.device(wanted)

    @contextlib.contextmanager
    def _log_to_file(self) -> Iterator[None]:
        logger = logging.getLogger("qing")
        handler = None
        old_level = logger.level
        if self.env.is_main:
            self.config.run_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(self.config.run_dir / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            if logger.level == logging.NOTSET or logger.level > logging.INFO:
                logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            if handler is not None:
                logger.removeHandler(handler)
                handler.close()
                logger.setLevel(old_level)

    def _load_data_and_model(self) -> None:
        cfg = self.config
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.splits = load_splits(cfg.data)
        self.bad_files.update(self.splits.bad_files.to_list())
        if cfg.num_classes is not None and cfg.num_classes != self.splits.num_outputs:
            raise ValueError(
                f"num_classes={cfg.num_classes} but the data has {self.splits.num_outputs} output(s) "
                f"({self.splits.task}: {self.splits.label_names})"
            )
        self._model = self._create_model(self.splits)

    def _prepare(self, last: Optional[Path]) -> None:
        cfg = self.config
        self.amp_dtype = self._resolve_amp()
        self.data_config = resolve_image_config(self._model, img_size=cfg.img_size)
        self._build_data()
        self.loss_fn = self._build_loss()

        self.optimizer = build_optimizer(
            self._model,
            name=cfg.optimizer,
            lr=cfg.lr,
            backbone_lr=cfg.backbone_lr,
            encoder_lr=cfg.encoder_lr,
            encoder_weight_decay=cfg.encoder_weight_decay,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
        )
        steps_per_epoch = len(self.loaders["train"])
        self.schedule = LRSchedule(
            self.optimizer,
            kind=cfg.scheduler,
            total_steps=steps_per_epoch * cfg.epochs,
            warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
            min_lr=cfg.min_lr,
            plateau_factor=cfg.plateau_factor,
            plateau_patience=cfg.plateau_patience,
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.ema = ModelEmaV3(self._model, decay=cfg.ema_decay) if cfg.ema else None
        self.stopper = EarlyStopping(cfg.monitor_metric(self.splits.task), cfg.early_stopping_patience)
        if last is not None:
            self._resume(last)
        self.schedule.step_update(self.global_step)

        self.train_model: nn.Module = self._model
        if cfg.sync_batchnorm and self.env.enabled:
            if self.device.type != "cuda":
                raise ValueError("sync_batchnorm needs CUDA; on CPU freeze the backbone (frozen BatchNorm) instead")
            self.train_model = nn.SyncBatchNorm.convert_sync_batchnorm(self.train_model)
        if self.env.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)

        self.tb = TensorBoardLogger(
            cfg.tensorboard_path,
            enabled=cfg.tensorboard and self.env.is_main,
            purge_step=self.global_step + 1 if last is not None else None,
        )
        self.tb_images = self._sample_images("val", cfg.log_images)

    def _check_run_dir(self) -> Optional[Path]:
        """Refuse to clobber an earlier run; returns the checkpoint to resume from, if any.

        Every process checks, so all raise together; rank 0 repairs an interrupted checkpoint.
        """
        cfg = self.config
        last_dir = cfg.checkpoints_path / "last"
        if self._earlier_run() and not cfg.resume and not cfg.overwrite:
            raise FileExistsError(
                f"{cfg.run_dir} already holds a run ({', '.join(map(str, self._earlier_run()))}); set "
                "resume=True to continue it, overwrite=True to replace it, or choose another output_dir"
            )
        if self.env.is_main:
            find_checkpoint(last_dir)  # moves back a checkpoint left aside by a kill during its replacement
        barrier(self.env)
        if not cfg.resume:
            return None
        last = find_checkpoint(last_dir)
        if last is None:
            _log.info("resume=True but %s holds no checkpoint: starting a new run", last_dir)
        return last

    def _earlier_run(self) -> list[Path]:
        cfg = self.config
        return [p for p in (cfg.checkpoints_path, cfg.tensorboard_path, cfg.report_path) if _non_empty(p)]

    def _claim_run_dir(self) -> None:
        """Rank 0: remove the earlier run (``overwrite``, not ``resume``) and write ``config.yaml``."""
        cfg = self.config
        if self.env.is_main:
            if cfg.overwrite and not cfg.resume:
                for path in self._earlier_run():
                    shutil.rmtree(path)
                (cfg.run_dir / "train.log").unlink(missing_ok=True)
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(cfg.run_dir / "config.yaml")
        barrier(self.env)

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
            if not Path(cfg.pretrained_file).is_file():
                raise FileNotFoundError(f"pretrained_file not found: {cfg.pretrained_file}")
            if not cfg.pretrained:
                raise ValueError("pretrained_file is set but pretrained=False; set pretrained=True to load it")
            overlay["file"] = str(cfg.pretrained_file)
        overlay = overlay or None
        random_seed(cfg.seed, 0)  # the same initial weights on every process
        model = qing.create_model(cfg.model, pretrained=cfg.pretrained, pretrained_cfg_overlay=overlay, **kwargs)
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
                raise ValueError(f"freeze_backbone needs a qing CNN-Transformer; {cfg.model} has no freeze_backbone()")
            if not cfg.pretrained:
                _log.warning(
                    "freeze_backbone=True with pretrained=False freezes a randomly initialized backbone; "
                    "set pretrained=True (and pretrained_file) or freeze_backbone=False"
                )
            model.freeze_backbone(cfg.trainable_backbone_layers)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def _resolve_amp(self) -> Optional[torch.dtype]:
        amp = self.config.amp
        if self.device.type != "cuda":
            if amp in ("bf16", "fp16"):
                _log.warning("amp=%r needs CUDA; training in float32 on %s", amp, self.device)
            return None
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    def _build_data(self) -> None:
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
        self.datasets = build_datasets(
            self.splits, train_transform=train_tf, eval_transform=eval_tf, cache=data.cache_images
        )
        self.bad_files.update(self.splits.bad_files.to_list())
        if cfg.batch_size % self.env.world_size:
            raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {self.env.world_size} processes")
        per_rank = cfg.batch_size // self.env.world_size
        n_train = len(self.datasets["train"])
        if cfg.drop_last and n_train < cfg.batch_size:
            raise ValueError(
                f"the train split has {n_train} images, fewer than one batch of {cfg.batch_size}; "
                "lower batch_size or set drop_last=False"
            )
        self.loaders: dict[str, DataLoader] = {}
        for name, dataset in self.datasets.items():
            train = name == "train"
            sampler = DistributedSampler(
                dataset, num_replicas=self.env.world_size, rank=self.env.rank, shuffle=train, seed=cfg.seed
            )
            self.loaders[name] = DataLoader(
                dataset,
                batch_size=per_rank,
                sampler=sampler,
                num_workers=data.num_workers,
                collate_fn=collate_skip_bad,
                pin_memory=self.device.type == "cuda",
                drop_last=train and cfg.drop_last,
            )

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
                raise ValueError(f"{last} was saved without EMA weights; resume with ema=False")
            self.ema.module.load_state_dict(state["ema"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.history = list(state["history"])
        self.global_step = int(state["global_step"])
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
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if self.config.channels_last else torch.contiguous_format
        return images.to(self.device, non_blocking=True, memory_format=memory_format)

    def _train_epoch(self, epoch: int) -> tuple[float, int]:
        cfg = self.config
        self._reseed(epoch)
        loader = self.loaders["train"]
        loader.sampler.set_epoch(epoch)
        self._set_train_mode()
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
            global_loss = float(all_reduce_mean(loss.detach(), self.env))
            if not math.isfinite(global_loss):
                self._stop_non_finite(global_loss, epoch, step)
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

            n_global = len(images) * self.env.world_size if weight else 0
            total_loss += global_loss * n_global
            total_images += n_global
            rate = total_images / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{global_loss:.4f}", img_s=f"{rate:.1f}")
            if self.global_step % cfg.log_every_steps == 0:
                self.tb.scalars({"train/loss": global_loss}, self.global_step)
                self.tb.scalars({f"train/lr/{k}": v for k, v in self._lrs().items()}, self.global_step)
            for callback in self.callbacks:
                callback.on_step_end(self, epoch=epoch, step=step, loss=global_loss)
        bar.close()
        if total_images == 0:
            raise RuntimeError(f"epoch {epoch + 1} trained on no images: every training image was unreadable")
        return total_loss / total_images, total_images

    def _stop_non_finite(self, value: float, epoch: int, step: int) -> None:
        last = self.config.checkpoints_path / "last"
        saved = f"{last} (after epoch {self.history[-1]['epoch']})" if self.history else "none (first epoch)"
        message = (
            f"training loss is {value} at epoch {epoch + 1}, step {step + 1}: stopping. "
            f"Last good checkpoint: {saved}. Lower lr (now {self.config.lr:g}), set grad_clip_norm, "
            "check the inputs, then rerun with resume=True."
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

    @torch.no_grad()
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
        was_training = model.training
        model.eval()
        indices, outputs = [], []
        for batch in self.loaders[split]:
            self._record_bad(batch["bad"])
            if batch["image"] is None:
                continue
            with self._autocast():
                logits = model(self._to_device(batch["image"]))
            indices.append(batch["index"])
            outputs.append(logits.float().cpu())
        model.train(was_training)
        local = (torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long), _cat(outputs))
        merged: dict[int, torch.Tensor] = {}
        for idx, out in all_gather_objects(local, self.env):
            merged.update(zip(idx.tolist(), out))  # DistributedSampler pads with repeats: keep one
        order = sorted(merged)
        if not order:
            raise RuntimeError(f"no readable images in the {split} split")
        return torch.stack([merged[i] for i in order]), self.datasets[split].targets[order]

    def _validate(self) -> dict[str, float]:
        logits, targets = self.predict("val")
        loss = float(self.loss_fn(logits.to(self.device), targets.to(self.device)))
        metrics = self._metrics(logits, targets, n_bootstrap=0)
        out = {"val_loss": loss}
        for name, key in VAL_METRICS.items():
            value = metrics.get(key)
            out[f"val_{name}"] = float(value) if isinstance(value, (int, float)) else float("nan")
        return out

    def _metrics(self, logits: torch.Tensor, targets: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        task = self.splits.task
        negative = self.splits.class_names[0] if task == "binary" else None
        return compute_metrics(
            _evaluate_targets(targets),
            probabilities(logits.numpy(), task),
            task=task,
            label_names=self.splits.label_names,
            negative_label=negative,
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
            "format": 1,
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
        best = find_checkpoint(cfg.checkpoints_path / "best")
        last = cfg.checkpoints_path / "last"
        if best is None:
            raise RuntimeError(f"no best checkpoint in {cfg.checkpoints_path}; did any epoch finish?")
        model = self.eval_model
        load_model_weights(best, model)
        thresholds = metrics = report = None
        if cfg.report:
            task = self.splits.task
            val_logits, val_targets = self.predict("val", model)
            thresholds = choose_thresholds(
                _evaluate_targets(val_targets),
                probabilities(val_logits.numpy(), task),
                task=task,
                method=cfg.threshold_method,
                target_sensitivity=cfg.target_sensitivity,
                label_names=self.splits.label_names,
            )
            method = threshold_method_name(cfg.threshold_method, cfg.target_sensitivity)
            test_logits, test_targets = self.predict("test", model)
            for entry in all_gather_objects(self.bad_files.to_list(), self.env):
                self.bad_files.update(entry)
            if self.env.is_main:
                metrics = self._metrics(
                    test_logits,
                    test_targets,
                    thresholds=thresholds or None,
                    threshold_method=method if thresholds else None,
                    n_bootstrap=cfg.n_bootstrap,
                    seed=cfg.seed,
                )
                report = self._write_outputs(best, model, metrics, thresholds, method, test_logits, test_targets)
            metrics, report = all_gather_objects((metrics, report), self.env)[0]
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

    def _write_outputs(
        self,
        best: Path,
        model: nn.Module,
        metrics: dict[str, Any],
        thresholds: list[float],
        method: str,
        test_logits: torch.Tensor,
        test_targets: torch.Tensor,
    ) -> Path:
        """Store thresholds + metrics with the best checkpoint and write the report (rank 0)."""
        cfg, task = self.config, self.splits.task
        summary = {
            f"test_{k}": metrics[k]
            for k in ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "f1")
            if isinstance(metrics.get(k), (int, float))
        }
        if metrics.get("roc_auc_ci"):
            summary["test_roc_auc_ci"] = metrics["roc_auc_ci"]
        summary["n_test"] = metrics["n_samples"]
        set_meta(
            model,
            task=task,
            thresholds=thresholds or None,
            threshold_method=method if thresholds else None,
            metrics=summary,
        )
        state = {"epoch": self.stopper.best_epoch, "monitor": self.stopper.metric, "value": self.stopper.best}
        save_checkpoint(best, model, training_state=state, model_card=True, **self._checkpoint_kwargs())
        images = self._sample_images("test", min(_REPORT_IMAGES, cfg.log_images))
        explainable = images is not None and hasattr(model, "forward_attention")
        report = write_report(
            cfg.report_path,
            metrics=metrics,
            targets=_evaluate_targets(test_targets),
            probs=probabilities(test_logits.numpy(), task),
            label_names=self.splits.label_names,
            task=task,
            history=self.history,
            model=model if explainable else None,
            images=images if explainable else None,
            mean=self.data_config["mean"],
            std=self.data_config["std"],
            bad_files=self.bad_files.to_list(),
            title=f"{cfg.model} on {_dataset_name(cfg)}",
        )
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


def _millions(params: Iterator[nn.Parameter]) -> float:
    return sum(p.numel() for p in params) / 1e6


def _cat(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(outputs) if outputs else torch.zeros(0)


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _evaluate_targets(targets: torch.Tensor) -> np.ndarray:
    """Dataset targets -> qing.evaluate's: ``(N, C)`` 0/1 ints, or ``(N,)`` class indices."""
    return targets.numpy().astype(np.int64)


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
