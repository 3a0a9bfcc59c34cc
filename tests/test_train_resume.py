"""Resume: a training subprocess is killed with SIGKILL mid-epoch, resumed, and ends exactly where an
uninterrupted run ends (same weights, optimizer moments, EMA, LR schedule and history)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qing.train import Trainer, load_training_state
from tests.train_helpers import one_thread, synthetic_root, tiny_config, weights, without_timing

SCRIPT = Path(__file__).with_name("train_script.py")
REPO = SCRIPT.parents[1]


def _run_until_paused(config_path: Path, pause_at: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(config_path), "--pause-at", pause_at],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if line.startswith("PAUSED"):
            return proc
        assert time.monotonic() < deadline, "training subprocess did not reach the pause point"
    proc.wait()
    raise AssertionError(f"training subprocess exited ({proc.returncode}) before pausing:\n{log.read_text()}")


def test_kill_9_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    data = synthetic_root(tmp_path / "data")
    # dropout, augmentation, EMA and a per-step cosine schedule all have state that must survive
    options = dict(epochs=3, ema=True, ema_decay=0.9, scheduler="cosine", grad_clip_norm=1.0, log_every_steps=1)
    killed_cfg = tiny_config(data, tmp_path / "killed", **options)
    config_path = killed_cfg.save(tmp_path / "killed.json")

    proc = _run_until_paused(config_path, "1,1", tmp_path / "killed.log")  # epoch 2, after its 2nd step
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    last = killed_cfg.checkpoints_path / "last"
    assert load_training_state(last)["epoch"] == 1  # killed mid-epoch 2: only epoch 1 was saved

    with one_thread():
        resumed = Trainer(killed_cfg.replace(resume=True)).fit()
        reference = Trainer(tiny_config(data, tmp_path / "reference", **options)).fit()

    assert resumed.epochs_completed == reference.epochs_completed == 3
    assert without_timing(resumed.history) == without_timing(reference.history)
    for name in ("last_checkpoint", "best_checkpoint"):
        got, expected = weights(getattr(resumed, name)), weights(getattr(reference, name))
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    got, expected = load_training_state(resumed.last_checkpoint), load_training_state(reference.last_checkpoint)
    assert got["global_step"] == expected["global_step"] == 3 * 3
    for key in ("optimizer", "ema"):
        assert json.dumps(_shapes(got[key])) == json.dumps(_shapes(expected[key]))
        assert all(torch.equal(a, b) for a, b in zip(_tensors(got[key]), _tensors(expected[key]))), key
    assert got["scheduler"] == expected["scheduler"]
    # the first two steps of epoch 2 ran twice (before the kill and after the resume): TensorBoard
    # purges the orphaned events, so the resumed log equals the reference log step for step
    assert _losses(killed_cfg) == _losses(tiny_config(data, tmp_path / "reference", **options))
    assert "epoch 3/3" in (killed_cfg.run_dir / "train.log").read_text()


def _losses(cfg):
    events = EventAccumulator(str(cfg.tensorboard_path), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for key in sorted(state, key=str):
            yield from _tensors(state[key])
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)


def _shapes(state):
    if isinstance(state, torch.Tensor):
        return list(state.shape)
    if isinstance(state, dict):
        return {str(k): _shapes(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_shapes(v) for v in state]
    return state
