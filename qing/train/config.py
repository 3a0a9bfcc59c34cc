"""``TrainConfig``: everything a fine-tuning run needs, loadable from YAML or JSON.

The original single script's ``Config`` fields map to these names:

| original                | TrainConfig                                             |
|-------------------------|---------------------------------------------------------|
| ``IMG_SIZE``            | ``img_size``                                            |
| ``BATCH_SIZE``          | ``batch_size`` (global: split over DDP processes)       |
| ``VALIDATION_SPLIT``    | ``data.val_fraction`` (patient-grouped)                 |
| ``NUM_CLASSES``         | ``num_classes`` (checked against the data; found from it)|
| ``D_MODEL``             | ``embed_dim``                                           |
| ``NUM_HEADS``           | ``num_heads``                                           |
| ``FFN_DIM``             | ``mlp_dim``                                             |
| ``NUM_LAYERS``          | ``depth``                                               |
| ``DROPOUT_RATE``        | ``drop_rate``                                           |
| ``FREEZE_CNN``          | ``freeze_backbone``                                     |
| ``FINE_TUNE_LAYERS``    | ``trainable_backbone_layers``                           |
| ``INIT_LR``             | ``lr`` (``backbone_lr`` for the CNN, default the same)  |
| ``EPOCHS``              | ``epochs``                                              |
| ``MIN_LR``              | ``min_lr``                                              |
| ``PATIENCE``            | ``early_stopping_patience``                             |
| checkpoint/log/results  | ``checkpoint_dir`` / ``log_dir`` / ``report_dir``        |
| ``CHEXNET_WEIGHTS_PATH``| ``pretrained_file`` (with ``model="qing_densenet121_tr2.chexnet"``) |

``TrainConfig.preset("small_dataset")`` reproduces the original recipe (see :data:`PRESETS`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from qing._io import write_text_atomic
from qing.data import DataConfig
from qing.data.config_fields import check_fields

__all__ = ["PRESETS", "TrainConfig", "apply_overrides"]

#: Named starting points. ``small_dataset`` is the original script's recipe: values marked
#: "assumed" were not recorded in it and are our choice.
PRESETS: dict[str, dict[str, Any]] = {
    "small_dataset": {
        "model": "qing_densenet121_tr2.chexnet",
        "pretrained": True,  # the original loaded CheXNet weights (CHEXNET_WEIGHTS_PATH) before freezing
        "img_size": 224,
        "batch_size": 16,
        "embed_dim": 512,
        "num_heads": 8,
        "mlp_dim": 1024,
        "depth": 2,
        "drop_rate": 0.2,
        "freeze_backbone": True,
        "trainable_backbone_layers": 2,  # assumed: DenseNet121's denseblock4 + norm5
        "optimizer": "adam",
        "lr": 5e-6,
        "weight_decay": 0.0,
        "epochs": 20,
        "scheduler": "plateau",
        "plateau_factor": 0.2,
        "plateau_patience": 3,
        "min_lr": 1e-7,  # assumed
        "early_stopping_metric": "val_loss",
        "early_stopping_patience": 5,  # assumed
        "seed": 42,
        "data": {
            "val_fraction": 0.2,  # assumed
            "rotation": 15.0,
            "translate": 0.0,
            "scale": (1.0, 1.0),
            "hflip_prob": 0.5,  # the original flipped; qing's default does not
        },
    },
}

_SCHEDULERS = ("cosine", "plateau", "none")
_AMP = ("auto", "none", "bf16", "fp16")


@dataclass
class TrainConfig:
    """A fine-tuning run. Defaults are a modern recipe; ``preset("small_dataset")`` is the original.

    Attributes:
        model: qing/timm model name, optionally ``.tag`` (e.g. ``"qing_densenet121_tr2.chexnet"``).
        pretrained: Start from the tag's published weights. ``None`` (the default): where the tag
            has them (``qing models`` lists which do), else from scratch; the first log line says
            which. ``False`` trains from scratch.
        pretrained_file: Local weights file for the tag (e.g. CheXNet's ``model.pth.tar``); a
            missing file is an error.
        num_classes: Expected number of outputs; ``None`` takes it from the data.
        in_chans: 1 to read images as grayscale for ``in_chans=1`` models, else 3.
        img_size: Square input side; ``None`` uses the model's pretrained cfg.
        embed_dim: Token width (``None``: the architecture's).
        num_heads: Attention heads.
        mlp_dim: Encoder MLP width.
        depth: Encoder blocks.
        drop_rate: Dropout.
        drop_path_rate: Stochastic depth.
        model_args: Further ``create_model`` keyword arguments.
        data: Where the data is and how it is split, read and augmented (:class:`qing.data.DataConfig`).
        pos_weight: Binary/multilabel positive-class weight for the loss: a number, one per
            output, ``"auto"`` (negatives / positives in train) or ``None``.
        freeze_backbone: Freeze the CNN except its top ``trainable_backbone_layers`` units;
            frozen BatchNorm layers stay in eval mode.
        trainable_backbone_layers: Backbone units left trainable when frozen.
        optimizer: A ``timm.optim.create_optimizer_v2`` name (``adamw``, ``adam``, ``sgd``, ...).
        lr: Learning rate of everything after the backbone (token projection, encoder, head).
        backbone_lr: Learning rate of the backbone (``None``: ``lr``).
        encoder_lr: Learning rate of the Transformer encoder (token projection, class token,
            positions, blocks, the encoder's head MLP), apart from the classifier
            (``get_classifier()``), which keeps ``lr``. ``None``: ``lr``.
        encoder_weight_decay: Weight decay of those encoder parameters (``None``: ``weight_decay``).
        weight_decay: Weight decay (not applied to biases, norms and the class token).
        momentum: SGD-style momentum.
        batch_size: Global batch size (over all processes).
        epochs: Maximum epochs.
        scheduler: ``"cosine"`` (per step, with warmup), ``"plateau"`` (``ReduceLROnPlateau`` on
            validation loss, the original) or ``"none"``.
        warmup_epochs: Cosine warmup length (may be fractional).
        min_lr: Floor of both schedules.
        plateau_factor: LR multiplier on a plateau.
        plateau_patience: Epochs without improvement of the validation loss before the LR drops.
        early_stopping_metric: ``"auto"``, ``"val_loss"`` (lower is better) or a validation metric
            such as ``"val_auroc"``, ``"val_accuracy"``, ``"val_f1"`` (higher is better). It also
            picks the best checkpoint. ``"auto"``: ``val_auroc`` for multi-label data (whose
            validation loss flattens once the label base rates are learned, while the AUROC still
            climbs), ``val_loss`` otherwise.
        early_stopping_patience: Epochs without improvement before stopping; ``None`` never stops.
        grad_clip_norm: Clip the gradient norm to this value; ``None`` disables.
        ema: Keep an exponential moving average of the weights (``timm.utils.ModelEmaV3``); it is
            what is validated, saved as best and reported.
        ema_decay: EMA decay per step.
        amp: Mixed precision: ``"auto"`` (bf16 on CUDA GPUs and CPUs that support it, else float32),
            ``"bf16"`` (CUDA, or CPUs with bfloat16 instructions), ``"fp16"`` (CUDA) or ``"none"``.
        channels_last: Use the channels-last memory format.
        compile: ``torch.compile`` the training model.
        sync_batchnorm: Synchronize BatchNorm statistics across DDP processes (CUDA only).
        seed: Seed of weights init, data order, augmentation and dropout (reseeded every epoch,
            so a resumed run repeats exactly what an uninterrupted one does).
        deterministic: Deterministic algorithms (slower on GPU).
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``.
        drop_last: Drop the last incomplete training batch.
        threshold_method: How decision thresholds are chosen on validation: ``"youden"`` or
            ``"sensitivity"`` (with ``target_sensitivity``).
        target_sensitivity: Sensitivity to reach with ``threshold_method="sensitivity"``.
        n_bootstrap: Bootstrap resamples of the test AUROC interval.
        output_dir: Run folder: ``checkpoints/{best,last}``, ``tensorboard/``, ``report/``,
            ``train.log``, ``config.yaml``.
        checkpoint_dir: Override of ``output_dir/checkpoints``.
        log_dir: Override of ``output_dir/tensorboard``.
        report_dir: Override of ``output_dir/report``.
        resume: Continue the run in ``output_dir`` from ``checkpoints/last``.
        overwrite: Replace an earlier run in ``output_dir`` instead of refusing.
        tensorboard: Write TensorBoard events.
        log_images: Images shown in TensorBoard and the report (0 disables images, feature and
            attention maps).
        log_every_steps: Steps between reads of the training loss: the loss stays on the device
            in between (no per-step wait), TensorBoard gets the mean over those steps, and a
            NaN/inf loss is found at the next read.
        progress: Show tqdm progress bars.
        report: Choose thresholds, evaluate on test and write the report at the end.
    """

    model: str = "qing_densenet121_tr2"
    pretrained: Optional[bool] = None
    pretrained_file: Optional[str] = None
    num_classes: Optional[int] = None
    in_chans: int = 3
    img_size: Optional[int] = None
    embed_dim: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_dim: Optional[int] = None
    depth: Optional[int] = None
    drop_rate: Optional[float] = None
    drop_path_rate: Optional[float] = None
    model_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    pos_weight: Optional[Union[float, list[float], str]] = None
    freeze_backbone: bool = False
    trainable_backbone_layers: int = 0
    optimizer: str = "adamw"
    lr: float = 1e-4
    backbone_lr: Optional[float] = None
    encoder_lr: Optional[float] = None
    encoder_weight_decay: Optional[float] = None
    weight_decay: float = 0.01
    momentum: float = 0.9
    batch_size: int = 16
    epochs: int = 20
    scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    plateau_factor: float = 0.2
    plateau_patience: int = 3
    early_stopping_metric: str = "auto"
    early_stopping_patience: Optional[int] = 5
    grad_clip_norm: Optional[float] = None
    ema: bool = False
    ema_decay: float = 0.999
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    sync_batchnorm: bool = False
    seed: int = 42
    deterministic: bool = False
    device: str = "auto"
    drop_last: bool = True
    threshold_method: str = "youden"
    target_sensitivity: Optional[float] = None
    n_bootstrap: int = 1000
    output_dir: str = "runs/qing"
    checkpoint_dir: Optional[str] = None
    log_dir: Optional[str] = None
    report_dir: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    tensorboard: bool = True
    log_images: int = 8
    log_every_steps: int = 10
    progress: bool = True
    report: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = _from_dict(DataConfig, self.data, "data")
        if not isinstance(self.data, DataConfig):
            raise ValueError(f"data must be a mapping of DataConfig fields, got {self.data!r}")
        check_fields(self, "", skip=("data",))  # YAML reads 1e-4 as a string: numbers become numbers
        checks = [
            (self.scheduler in _SCHEDULERS, f"scheduler must be one of {_SCHEDULERS}, got {self.scheduler!r}"),
            (self.amp in _AMP, f"amp must be one of {_AMP}, got {self.amp!r}"),
            (self.in_chans in (1, 3), f"in_chans must be 1 or 3, got {self.in_chans}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.log_every_steps >= 1, f"log_every_steps must be >= 1, got {self.log_every_steps}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.trainable_backbone_layers >= 0, "trainable_backbone_layers must be >= 0"),
            (
                self.early_stopping_metric == "auto" or self.early_stopping_metric.startswith("val_"),
                f"early_stopping_metric must be auto, val_loss or val_<metric>, got {self.early_stopping_metric!r}",
            ),
            (self.threshold_method in ("youden", "sensitivity"), "threshold_method must be youden or sensitivity"),
            (
                self.threshold_method != "sensitivity" or self.target_sensitivity is not None,
                "threshold_method='sensitivity' needs target_sensitivity (e.g. 0.9)",
            ),
            (
                self.pos_weight is None or self.pos_weight == "auto" or not isinstance(self.pos_weight, str),
                f"pos_weight must be a number, a list, 'auto' or null, got {self.pos_weight!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def monitor_metric(self, task: str) -> str:
        """The validation metric that stops early and picks the best checkpoint for a ``task``.

        Args:
            task: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.

        Returns:
            ``early_stopping_metric``, with ``"auto"`` resolved: ``"val_auroc"`` for multi-label
            data, ``"val_loss"`` otherwise.
        """
        if self.early_stopping_metric != "auto":
            return self.early_stopping_metric
        return "val_auroc" if task == "multilabel" else "val_loss"

    # ---- paths -------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        """The run folder (``output_dir``)."""
        return Path(self.output_dir)

    @property
    def checkpoints_path(self) -> Path:
        """Folder holding ``best/`` and ``last/``."""
        return Path(self.checkpoint_dir) if self.checkpoint_dir else self.run_dir / "checkpoints"

    @property
    def tensorboard_path(self) -> Path:
        """TensorBoard event folder."""
        return Path(self.log_dir) if self.log_dir else self.run_dir / "tensorboard"

    @property
    def report_path(self) -> Path:
        """Report folder."""
        return Path(self.report_dir) if self.report_dir else self.run_dir / "report"

    # ---- (de)serialization -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict; a ``preset`` key starts from :data:`PRESETS` and the rest overrides it.

        Raises:
            ValueError: Unknown keys (with close matches) or invalid values.
        """
        values = dict(values)
        preset = values.pop("preset", None)
        if preset is not None:
            return cls.preset(preset, **values)
        return _from_dict(cls, values, "config")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """A named recipe from :data:`PRESETS` with ``overrides`` (``data`` merges key by key).

        Example:
            >>> cfg = TrainConfig.preset("small_dataset", data={"root": "data"}, epochs=5)
            >>> cfg.lr, cfg.scheduler, cfg.data.val_fraction
            (5e-06, 'plateau', 0.2)
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        values = {**PRESETS[name], **overrides}
        values["data"] = {**PRESETS[name].get("data", {}), **_as_dict(overrides.get("data", {}))}
        return _from_dict(cls, values, "config")

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> TrainConfig:
        """Load from a ``.yaml``/``.yml`` or ``.json`` file (see :meth:`from_dict`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of config fields, got {type(values).__name__}")
        return cls.from_dict(values)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        path = Path(path)
        data = self.to_dict()
        text = yaml.safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(data, indent=2)
        write_text_atomic(path, text)
        return path

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` (``data`` may be a dict of data fields to change)."""
        if isinstance(changes.get("data"), dict):
            changes["data"] = dataclasses.replace(self.data, **changes["data"])
        return dataclasses.replace(self, **changes)


def _as_dict(value: Any) -> dict[str, Any]:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)


def _from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown {where} field(s): {', '.join(hints)}")
    return cls(**values)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (YAML values; ``data.root=...`` for nested fields) to a config dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        target = values
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(raw)
    return values
