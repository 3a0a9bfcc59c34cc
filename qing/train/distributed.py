"""Distributed data parallel helpers on ``torch.distributed`` (set up by ``torchrun``).

The same program runs as one process or as many: :func:`init_distributed` reads the
``torchrun`` environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and starts a process group
(``nccl`` on CUDA, ``gloo`` on CPU) only when there is more than one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "all_gather_objects", "all_reduce_mean", "barrier", "init_distributed", "shutdown_distributed"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank (0 writes checkpoints, logs and reports).
        world_size: Number of processes.
        local_rank: Rank on this machine (selects the GPU).
        owns_group: Whether :func:`init_distributed` created the process group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0."""
        return self.rank == 0


def init_distributed(device_type: str) -> DistEnv:
    """Join the ``torchrun`` job, if any.

    Args:
        device_type: ``"cuda"`` (``nccl`` backend) or ``"cpu"`` (``gloo``).

    Returns:
        The process's :class:`DistEnv`; single-process when ``WORLD_SIZE`` is unset or 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        owns = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def shutdown_distributed(env: DistEnv) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every process (no-op when single-process)."""
    if env.enabled:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of ``value`` over processes (a new tensor; ``value`` itself when single-process)."""
    if not env.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / env.world_size


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
