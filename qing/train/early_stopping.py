"""Early stopping (and best-checkpoint selection) on one validation metric."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

__all__ = ["EarlyStopping"]


@dataclass
class EarlyStopping:
    """Track the best value of a metric and count epochs without improvement.

    Attributes:
        metric: History key, e.g. ``"val_loss"`` (lower is better) or ``"val_auroc"`` (higher).
        patience: Epochs without improvement before :attr:`should_stop`; ``None`` never stops.
        min_delta: Smallest change that counts as an improvement.
        best: Best value so far.
        best_epoch: Epoch (1-based) of the best value; 0 before the first update.
        bad_epochs: Epochs since the last improvement.
    """

    metric: str = "val_loss"
    patience: Optional[int] = None
    min_delta: float = 0.0
    best: Optional[float] = None
    best_epoch: int = 0
    bad_epochs: int = 0

    @property
    def mode(self) -> str:
        """``"min"`` for losses, ``"max"`` for everything else."""
        return "min" if self.metric.endswith("loss") else "max"

    def update(self, value: Optional[float], epoch: int) -> bool:
        """Record the epoch's value; returns whether it is a new best.

        Raises:
            ValueError: ``value`` is missing or not finite (e.g. AUROC on a one-class split).
        """
        if value is None or not math.isfinite(value):
            raise ValueError(
                f"{self.metric} is {value} at epoch {epoch}; it cannot select checkpoints or stop early "
                "(is a validation split missing a class?). Use early_stopping_metric='val_loss'."
            )
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best is None or sign * (self.best - value) > self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` epochs passed without improvement."""
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the metric must be the same)."""
        if state.get("metric") != self.metric:
            raise ValueError(f"checkpoint tracked {state.get('metric')!r}, this run {self.metric!r}")
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
