"""Fine-tuning: :class:`TrainConfig` (YAML/JSON), :class:`Trainer` (single process or ``torchrun``), checkpoints.

Example:
    >>> from qing.train import TrainConfig, Trainer
    >>> cfg = TrainConfig.preset("small_dataset", data={"root": "data"}, output_dir="runs/pneumonia")
    >>> result = Trainer(cfg).fit()  # doctest: +SKIP

From the shell (one process, or several with ``torchrun --nproc_per_node N -m qing.train ...``)::

    python -m qing.train config.yaml --set epochs=5 --set data.cache_images=true
"""

from qing.train.checkpoint import find_checkpoint, load_model_weights, load_training_state, save_checkpoint
from qing.train.config import PRESETS, TrainConfig, apply_overrides
from qing.train.distributed import DistEnv, init_distributed
from qing.train.early_stopping import EarlyStopping
from qing.train.optim import LRSchedule, build_optimizer, param_groups
from qing.train.run_folder import RunFolderBusyError, RunFolderError
from qing.train.trainer import Callback, NonFiniteLossError, RunResult, Trainer

__all__ = [
    "PRESETS",
    "Callback",
    "DistEnv",
    "EarlyStopping",
    "LRSchedule",
    "NonFiniteLossError",
    "RunFolderBusyError",
    "RunFolderError",
    "RunResult",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "build_optimizer",
    "find_checkpoint",
    "init_distributed",
    "load_model_weights",
    "load_training_state",
    "param_groups",
    "save_checkpoint",
]
