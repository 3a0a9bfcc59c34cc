"""The trainer on generated data: config, state files, best vs last, NaN stop, early stopping,
bad files, TensorBoard events, report and a checkpoint that loads as a qing model."""

import json
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qing
from qing.train import (
    Callback,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    build_optimizer,
    load_training_state,
    param_groups,
)
from qing.train.checkpoint import pack_state, unpack_state
from tests.make_fake_data import write_class_folders, write_truncated_png
from tests.train_helpers import synthetic_root, tiny_config, weights


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic_root(tmp_path_factory.mktemp("synthetic"))


# ---- config -----------------------------------------------------------------------------------


def test_config_files_presets_and_errors(tmp_path):
    cfg = TrainConfig.preset("small_dataset", data={"root": "data"}, epochs=5)
    fields = ["img_size", "batch_size", "optimizer", "lr", "scheduler", "plateau_factor", "plateau_patience", "seed"]
    assert [getattr(cfg, f) for f in fields] == [224, 16, "adam", 5e-6, "plateau", 0.2, 3, 42]
    model_fields = [cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, cfg.depth, cfg.drop_rate]
    assert model_fields == [512, 8, 1024, 2, 0.2]
    assert (cfg.epochs, cfg.data.root, cfg.data.val_fraction, cfg.data.rotation) == (5, "data", 0.2, 15.0)
    assert (cfg.model, cfg.pretrained, cfg.freeze_backbone) == ("qing_densenet121_tr2.chexnet", True, True)
    for suffix in (".yaml", ".json"):
        assert TrainConfig.from_file(cfg.save(tmp_path / f"config{suffix}")) == cfg
    (tmp_path / "run.yaml").write_text("preset: small_dataset\nepochs: 3\ndata:\n  root: x\n  scale: [0.8, 1.2]\n")
    loaded = TrainConfig.from_file(tmp_path / "run.yaml")
    assert (loaded.lr, loaded.epochs, loaded.data.scale, loaded.data.hflip_prob) == (5e-6, 3, (0.8, 1.2), 0.5)
    assert TrainConfig().data.hflip_prob == 0.0  # flips are off by default

    with pytest.raises(ValueError, match=r"unknown config field\(s\): 'epoch' \(did you mean 'epochs'\?\)"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match=r"unknown data field\(s\): 'roots' \(did you mean 'root'\?\)"):
        TrainConfig.from_dict({"data": {"roots": "x"}})
    with pytest.raises(ValueError, match=r"scheduler must be one of \('cosine', 'plateau', 'none'\), got 'step'"):
        TrainConfig(scheduler="step")
    with pytest.raises(ValueError, match="unknown preset 'tiny'; known presets: small_dataset"):
        TrainConfig.preset("tiny")


def test_training_state_round_trips_through_strict_json():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.99))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    state = {"optimizer": opt.state_dict(), "scheduler": plateau.state_dict(), "value": np.float32(1.5)}
    packed, tensors = pack_state(state)
    text = json.dumps(packed, allow_nan=False)  # strict JSON: inf and tuples are encoded
    back = unpack_state(json.loads(text), tensors)
    assert set(tensors) == {f"optimizer/state/{i}/{k}" for i in (0, 1) for k in ("step", "exp_avg", "exp_avg_sq")}
    assert back["scheduler"]["best"] == math.inf and back["value"] == 1.5
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(back["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="training state at /x holds a object; only tensors and JSON types"):
        pack_state({"x": object()})


def test_param_groups_split_backbone_and_head():
    model = qing.create_model("qing_test_tr1", num_classes=1)
    model.freeze_backbone(1)
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, backbone_lr=1e-5, weight_decay=0.05)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert all(id(p) in backbone_ids for p in groups["backbone"]["params"] + groups["backbone_no_decay"]["params"])
    assert groups["backbone"]["lr"] == 1e-5 and groups["head"]["lr"] == 1e-3
    assert groups["head_no_decay"]["weight_decay"] == 0.0 and groups["head"]["weight_decay"] == 0.05
    assert any(p is model.cls_token for p in groups["head_no_decay"]["params"])
    n_grouped = sum(len(g["params"]) for g in groups.values())
    assert n_grouped == sum(1 for p in model.parameters() if p.requires_grad) < len(list(model.parameters()))
    optimizer = build_optimizer(model, name="adamw", lr=1e-3, backbone_lr=1e-5, weight_decay=0.05)
    assert type(optimizer).__name__ == "AdamW"
    assert sorted(g["lr"] for g in optimizer.param_groups) == [1e-5, 1e-5, 1e-3, 1e-3]


# ---- a full run -------------------------------------------------------------------------------


class Snapshot(Callback):
    """The model's weights at the end of every epoch."""

    def __init__(self):
        self.states = []

    def on_epoch_end(self, trainer, *, epoch, record):
        self.states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})


class SpoilFrom(Callback):
    """From epoch ``start`` on, push the head bias up every step: validation gets worse each epoch."""

    def __init__(self, start: int):
        self.start = start

    def on_step_end(self, trainer, *, epoch, step, loss):
        if epoch >= self.start:
            with torch.no_grad():
                trainer.model.head.bias.fill_(6.0 * epoch)


def test_fit_best_is_a_real_copy_and_every_artifact_is_written(tmp_path, data_root):
    import shutil

    root = shutil.copytree(data_root, tmp_path / "data")
    zero = root / "train" / "normal" / "synthetic_p0900_0.png"
    zero.write_bytes(b"")
    cut = write_truncated_png(root / "train" / "opacity" / "synthetic_p0901_0.png", size=64)
    cfg = tiny_config(root, tmp_path / "run", report=True, log_every_steps=1)
    snapshot = Snapshot()
    result = Trainer(cfg, callbacks=[snapshot, SpoilFrom(1)]).fit()

    # best = epoch 1, a real copy of its weights; last = epoch 2
    assert result.epochs_completed == 2 and result.best_epoch == 1
    assert result.history[1]["val_loss"] > result.history[0]["val_loss"]
    best, last = weights(result.best_checkpoint), weights(result.last_checkpoint)
    assert all(torch.equal(best[k], snapshot.states[0][k]) for k in best)
    assert all(torch.equal(last[k], snapshot.states[1][k]) for k in last)
    assert not torch.equal(best["head.bias"], last["head.bias"])

    # the best checkpoint is a qing model with its task, thresholds and test metrics
    model = qing.create_model(f"local-dir:{result.best_checkpoint}", pretrained=True)
    assert all(torch.equal(model.state_dict()[k], best[k]) for k in best)
    assert model.qing_meta.task == "binary" and model.qing_meta.threshold_method == "youden"
    assert list(model.pretrained_cfg["label_names"]) == ["opacity"] and model.qing_meta.negative_label == "normal"
    assert model.qing_meta.thresholds == result.thresholds and len(result.thresholds) == 1
    assert model.qing_meta.metrics["test_roc_auc"] == result.test_metrics["roc_auc"]
    # calibrated at the end of the run: one temperature fitted on validation, thresholds chosen after it
    calibration = result.test_metrics["calibration"]
    assert calibration["source"].startswith("fitted on validation data")
    assert model.qing_meta.temperatures == calibration["temperatures"] and len(calibration["temperatures"]) == 1
    assert model.qing_meta.metrics["test_ece"] == result.test_metrics["ece"]
    assert model.pretrained_cfg["input_size"] == (3, 64, 64) and list(model.pretrained_cfg["label_names"]) == [
        "opacity"
    ]
    assert load_training_state(result.last_checkpoint)["epoch"] == 2

    # unreadable files: skipped, each listed once (the truncated one was met in every epoch)
    assert sorted(b["path"] for b in result.bad_files) == sorted([str(zero), str(cut)])
    report_md = (result.report_path.parent / "report.md").read_text()
    assert str(zero) in report_md and str(cut) in report_md
    metrics = json.loads((result.report_path.parent / "metrics.json").read_text())
    assert metrics["thresholds"] == result.thresholds and metrics["n_samples"] == 8
    for name in ("report.html", "curves.png", "roc.png", "pr.png", "confusion_matrix.png", "attention.png",
                 "reliability.png", "gradcam.png"):  # fmt: skip
        assert (result.report_path.parent / name).stat().st_size > 0
    assert "epoch 2/2" in (cfg.run_dir / "train.log").read_text()
    # the resolved config: pretrained=None became False (qing_test_tr1 has no published weights)
    assert TrainConfig.from_file(cfg.run_dir / "config.yaml") == cfg.replace(pretrained=False)

    # TensorBoard events, read back
    events = EventAccumulator(str(cfg.tensorboard_path), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    val_loss = [e.value for e in events.Scalars("epoch/val_loss")]
    np.testing.assert_allclose(val_loss, [h["val_loss"] for h in result.history], rtol=1e-6)
    steps = len(events.Scalars("train/loss"))
    assert steps == load_training_state(result.last_checkpoint)["global_step"] > 2
    assert {"train/lr/lr", "train/lr/backbone_lr", "epoch/val_auroc", "epoch/lr"} <= set(tags["scalars"])
    assert {"grad/backbone", "grad/blocks", "grad/head"} <= set(tags["histograms"])
    assert {"images/input", "images/feature_maps", "images/attention"} <= set(tags["images"])
    image = events.Images("images/input")[0]
    assert (image.width, image.height) == (2 * 64, 64)  # log_images=2 inputs side by side


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, data_root):
    class Poison(Callback):
        def on_step_end(self, trainer, *, epoch, step, loss):
            if (epoch, step) == (1, 0):
                with torch.no_grad():
                    trainer.model.head.weight.fill_(float("nan"))

    cfg = tiny_config(data_root, tmp_path / "run", epochs=3)
    with pytest.raises(NonFiniteLossError) as error:
        Trainer(cfg, callbacks=[Poison()]).fit()
    last = cfg.checkpoints_path / "last"
    # the loss is read every log_every_steps=10 steps and at the end of an epoch (3 steps): found after step 3
    assert str(error.value) == (
        "training loss is nan at epoch 2, step 2 (noticed after step 3: the loss is read every log_every_steps=10 "
        f"steps and at the end of each epoch): stopping. Last good checkpoint: {last} (after epoch 1). "
        "Lower lr (now 0.001), set grad_clip_norm, check the inputs, then rerun with resume=True."
    )
    assert load_training_state(last)["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in weights(last).values())

    with pytest.raises(FileExistsError, match=r"already holds a run .*; resume=True continues it, overwrite=True"):
        Trainer(cfg).fit()
    assert "training loss is nan" in (cfg.run_dir / "train.log").read_text()
    Trainer(cfg.replace(overwrite=True, epochs=1)).fit()  # replaces the failed run
    assert "training loss is nan" not in (cfg.run_dir / "train.log").read_text()
    assert TrainConfig.from_file(cfg.run_dir / "config.yaml").epochs == 1


def test_early_stopping_pos_weight_and_resume_of_a_finished_run(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path / "run", epochs=5, early_stopping_patience=1, pos_weight="auto")
    trainer = Trainer(cfg, callbacks=[SpoilFrom(1)])
    result = trainer.fit()
    assert result.stopped_early and result.epochs_completed == 2 and result.best_epoch == 1
    targets = trainer.datasets["train"].targets
    positives = float(targets.sum())
    assert torch.allclose(trainer.loss_fn.pos_weight, torch.tensor([(len(targets) - positives) / positives]))

    before = weights(result.last_checkpoint)
    again = Trainer(cfg.replace(resume=True)).fit()  # nothing left to do
    assert again.epochs_completed == 2 and again.stopped_early
    assert all(torch.equal(before[k], v) for k, v in weights(again.last_checkpoint).items())


def test_trainer_builds_everything_before_fit(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path / "run", epochs=1, pos_weight="auto", report=True)
    trainer = Trainer(cfg)
    assert not cfg.run_dir.exists()  # building touches no file

    assert isinstance(trainer.model, qing.CNNTransformer) and trainer.model.num_classes == 1
    assert trainer.train_model is trainer.model and trainer.eval_model is trainer.model  # no DDP, compile, EMA
    assert trainer.device == torch.device("cpu") and trainer.env.world_size == 1 and trainer.amp_dtype is None
    assert set(trainer.datasets) == set(trainer.loaders) == {"train", "val", "test"}
    sizes = {name: len(dataset) for name, dataset in trainer.datasets.items()}
    assert sizes == {"train": 12, "val": 4, "test": 8}  # 16 train images, a quarter of the patients to val
    assert len(trainer.loaders["train"]) == 3 and trainer.loaders["train"].batch_size == 4
    assert trainer.data_config["input_size"] == (3, 64, 64)
    assert {g["name"] for g in trainer.optimizer.param_groups} >= {"backbone", "head"}
    assert trainer.schedule.kind == "cosine" and trainer.scaler is None and trainer.ema is None
    positives = float(trainer.datasets["train"].targets.sum())
    assert torch.allclose(trainer.loss_fn.pos_weight, torch.tensor([(12 - positives) / positives]))
    assert (
        cfg.early_stopping_metric == "auto" and trainer.stopper.metric == "val_loss" and trainer.stopper.best_epoch == 0
    )
    assert (trainer.history, trainer.global_step, trainer.start_epoch, trainer.stopped_early) == ([], 0, 0, False)
    assert trainer.tb is None and trainer.tb_images is None  # only while fit() runs

    logits, targets = trainer.predict("test")  # the untrained model already predicts
    assert logits.shape == (8, 1) and torch.equal(targets, trainer.datasets["test"].targets)

    result = trainer.fit()
    assert result.epochs_completed == 1 and result.test_metrics["n_samples"] == 8
    assert trainer.global_step == 3 and len(trainer.history) == 1
    log = (cfg.run_dir / "train.log").read_text()
    assert (
        log.index("pos_weight (negatives/positives in train)")
        < log.index("training qing_test_tr1")
        < log.index("epoch 1/1")
    )  # what building logged comes first
    with pytest.raises(RuntimeError, match=r"fit\(\) already ran on this Trainer; create a new one"):
        trainer.fit()


def test_multiclass_run_with_a_plain_timm_model(tmp_path):
    for split, n in (("train", 6), ("test", 2)):
        write_class_folders(tmp_path / "data" / split, {"a": n, "b": n, "c": n}, size=64, seed=len(split))
    cfg = tiny_config(
        tmp_path / "data",
        tmp_path / "run",
        model="test_resnet",  # any timm classifier trains; backbone = everything but get_classifier()
        pretrained=False,  # test_resnet.r160_in1k has weights on the Hub: stay offline
        backbone_lr=1e-4,
        channels_last=True,
        epochs=1,
        report=True,
        log_images=0,
        data={"patient_regex": None},
        model_args={"pretrained_cfg_overlay": {"crop_mode": "squash", "crop_pct": 1.0}},  # preprocessing via cfg
    )
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert (trainer.model.pretrained_cfg["crop_mode"], trainer.model.pretrained_cfg["crop_pct"]) == ("squash", 1.0)
    assert isinstance(trainer.loss_fn, torch.nn.CrossEntropyLoss)
    assert {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}["head"] != 1e-4
    assert result.thresholds == [] and result.test_metrics["task"] == "multiclass"
    model = qing.create_model(f"local-dir:{result.best_checkpoint}", pretrained=True)
    assert model.num_classes == 3 and list(model.pretrained_cfg["label_names"]) == ["a", "b", "c"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights(result.best_checkpoint).items())

    with pytest.raises(ValueError, match="freeze_backbone needs a qing CNN-Transformer; test_resnet has no"):
        Trainer(cfg.replace(freeze_backbone=True, overwrite=True)).fit()
    assert weights(result.best_checkpoint)  # a bad config does not delete the run it would overwrite


def test_command_line_overrides():
    from qing.train.config import apply_overrides

    values = apply_overrides({"data": {"root": "a"}}, ["epochs=3", "data.cache_images=true", "pos_weight=[1, 2.5]"])
    assert values == {"data": {"root": "a", "cache_images": True}, "epochs": 3, "pos_weight": [1, 2.5]}
    with pytest.raises(ValueError, match="--set expects key=value, got 'epochs'"):
        apply_overrides({}, ["epochs"])
