"""DDP: ``torchrun --nproc_per_node 2`` (gloo, CPU) trains to the same weights and metrics as one process.

What "the same" takes: the same global batch (8 = 2 x 4), the same sample order (DistributedSampler
interleaves one permutation, so the two ranks' batches together are the single process's batch),
full batches only (16 images), no batch-dependent layers in training (a frozen backbone keeps its
BatchNorm in eval mode; no dropout, no augmentation) and an optimizer that is linear in the
gradients (SGD), so only float summation order differs. A run whose ranks did not average
gradients, or saw all the data each, or used 8 per rank, would end elsewhere: the test checks that
a single process with the per-rank batch of 4 ends measurably far away.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from qing.train import Trainer
from tests.make_fake_data import write_class_folders
from tests.train_helpers import max_abs_diff, one_thread, tiny_config, weights

SCRIPT = Path(__file__).with_name("train_script.py")
REPO = SCRIPT.parents[1]
OPTIONS = dict(
    epochs=2,
    batch_size=8,
    optimizer="sgd",
    lr=0.05,
    momentum=0.9,
    weight_decay=0.0,
    scheduler="none",
    freeze_backbone=True,
    trainable_backbone_layers=0,
    drop_rate=0.0,
    report=True,
    log_images=0,
    data={"patient_regex": None, "rotation": 0.0, "translate": 0.0, "scale": (1.0, 1.0)},
)


def test_torchrun_two_processes_match_one_process(tmp_path):
    data = tmp_path / "data"
    write_class_folders(data / "train", {"normal": 8, "opacity": 8}, size=64)
    write_class_folders(data / "val", {"normal": 3, "opacity": 2}, size=64, seed=1)  # 5: one rank gets a pad
    write_class_folders(data / "test", {"normal": 3, "opacity": 3}, size=64, seed=2)

    ddp_cfg = tiny_config(data, tmp_path / "ddp", **OPTIONS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(SCRIPT), str(ddp_cfg.save(tmp_path / "ddp.json"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("DONE ") == 1  # only rank 0 reports

    with one_thread():
        single = Trainer(tiny_config(data, tmp_path / "single", **OPTIONS)).fit()
        small_batch = Trainer(tiny_config(data, tmp_path / "batch4", **{**OPTIONS, "batch_size": 4})).fit()

    ddp_last, single_last = weights(ddp_cfg.checkpoints_path / "last"), weights(single.last_checkpoint)
    assert max_abs_diff(ddp_last, single_last) < 1e-6  # measured: 4e-9
    assert max_abs_diff(weights(small_batch.last_checkpoint), single_last) > 1e-3  # measured: 0.02 (the test has teeth)

    # validation metrics come from predictions gathered over both ranks (5 images, one padded)
    ddp_history = json.loads(done.stdout.split("DONE ", 1)[1])["history"]
    for got, expected in zip(ddp_history, single.history):
        for key in ("train_loss", "val_loss", "val_auroc", "val_accuracy"):
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    ddp_metrics = json.loads((ddp_cfg.report_path / "metrics.json").read_text())
    assert ddp_metrics["n_samples"] == single.test_metrics["n_samples"] == 6
    np.testing.assert_allclose(ddp_metrics["roc_auc"], single.test_metrics["roc_auc"], atol=1e-9)
    np.testing.assert_allclose(ddp_metrics["thresholds"], single.thresholds, atol=1e-5)

    # rank 0 alone wrote the run folder
    assert len(list(ddp_cfg.tensorboard_path.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in ddp_cfg.checkpoints_path.iterdir()) == [".qing-run", "best", "last"]  # + marker
