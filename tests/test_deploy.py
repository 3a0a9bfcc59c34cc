"""Deployment: ``qing export`` / ``qing.export_onnx`` parity and metadata, ONNX models in ``qing predict`` and
``qing eval`` (same outputs as PyTorch), the runtime flags, and the fast PyTorch paths.

Parity is checked on a binary, a multi-label and a 1-channel ``qing_test_tr1`` at 64 px, against the
PyTorch model and on real X-rays from ../shared/data, with onnxruntime run directly as well as through qing.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

import qing
from qing.cli import main
from qing.cli._common import load_model
from qing.cli._runtime import build_runner
from qing.data import build_transforms, load_image, resolve_image_config
from qing.deploy import METADATA_KEYS, OnnxModel, OnnxParityError, export_onnx
from qing.evaluate import TorchRunner, collect_logits, iter_logits
from qing.meta import set_meta
from tests.conftest import REPO_ROOT
from tests.docs_helpers import code_blocks
from tests.model_helpers import randomize_batchnorm
from tests.test_cli import read_csv
from tests.train_helpers import one_thread

SIZE = 64
CASES = {
    "binary": dict(num_classes=1, in_chans=3, labels=["PNEUMONIA"], task="binary", thresholds=[0.3]),
    "multilabel": dict(  # calibrated: the ONNX file carries the temperatures its thresholds were chosen with
        num_classes=3,
        in_chans=3,
        labels=["Effusion", "Mass", "Hernia"],
        task="multilabel",
        thresholds=[0.5, 0.4, 0.2],
        temperatures=[1.5, 0.8, 2.0],
    ),
    "one-channel": dict(num_classes=1, in_chans=1, labels=["PNEUMONIA"], task="binary", thresholds=None),
}


def _save_model(folder, *, num_classes, in_chans, labels, task, thresholds, temperatures=None, seed=0):
    torch.manual_seed(seed)
    model = qing.create_model("qing_test_tr1", num_classes=num_classes, in_chans=in_chans).eval()
    randomize_batchnorm(model)
    with torch.no_grad():
        model.get_classifier().bias.uniform_(-2, 2)  # probabilities away from 0.5, so decisions differ
    method = "youden" if thresholds else None
    set_meta(model, task=task, thresholds=thresholds, threshold_method=method, temperatures=temperatures)
    qing.save_pretrained(model, folder, label_names=labels, data_config={"input_size": (in_chans, SIZE, SIZE)})
    return qing.create_model(f"local-dir:{folder}", pretrained=True).eval()


def _real_images(pneumonia_200, n=6):
    normal = sorted((pneumonia_200 / "NORMAL").iterdir())[: n // 2]
    sick = sorted((pneumonia_200 / "PNEUMONIA").iterdir())[: n - n // 2]
    return [*normal, *sick]


def _torch_logits(model, paths, channels):
    transform = build_transforms(model, train=False)
    batch = torch.stack([transform(load_image(p, channels=channels)) for p in paths])
    with one_thread(), torch.no_grad():
        return model(batch).numpy(), batch.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{case: (folder, onnx path, model)}``: each case saved and exported once with ``qing export``."""
    pneumonia_200 = REPO_ROOT.parent / "shared" / "data" / "cxr-pneumonia-200"
    root = tmp_path_factory.mktemp("deploy")
    out = {}
    for name, case in CASES.items():
        folder = root / name
        model = _save_model(folder, **case)
        path = root / f"{name}.onnx"
        checks = ["--check-images", str(pneumonia_200 / "NORMAL")] if pneumonia_200.is_dir() else []
        assert main(["export", str(folder), str(path), *checks]) == 0
        out[name] = (folder, path, model)
    return out


# ---- export: parity and metadata ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_export_matches_pytorch_in_plain_onnxruntime(exported, name, pneumonia_200):
    folder, path, model = exported[name]
    case = CASES[name]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    assert (image_input.name, image_input.shape[1]) == ("image", case["in_chans"])
    assert [o.name for o in session.get_outputs()] == ["logits"]

    paths = _real_images(pneumonia_200)
    expected, batch = _torch_logits(model, paths, case["in_chans"])
    for size in (1, len(paths)):  # the batch dimension is dynamic
        (got,) = session.run(None, {"image": batch[:size]})
        assert got.shape == (size, case["num_classes"])
        assert np.abs(got - expected[:size]).max() <= 1e-4
    other = torch.randn(2, case["in_chans"], SIZE + 32, SIZE + 64)  # and so are height and width (sin-cos positions)
    with torch.no_grad():
        reference = model(other).numpy()
    assert np.abs(session.run(None, {"image": other.numpy()})[0] - reference).max() <= 1e-4

    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert set(meta) == set(METADATA_KEYS)
    assert (
        meta["labels"] == case["labels"] and meta["task"] == case["task"] and meta["thresholds"] == case["thresholds"]
    )
    assert meta["activation"] == "sigmoid" and meta["spatial"] == "dynamic" and meta["spatial_multiple"] == 32
    assert meta["color_mode"] == ("L" if case["in_chans"] == 1 else "RGB")
    config = resolve_image_config(model)
    assert meta["input_size"] == [case["in_chans"], SIZE, SIZE]
    assert (meta["mean"], meta["std"]) == (list(config["mean"]), list(config["std"]))
    assert (meta["interpolation"], meta["crop_mode"], meta["crop_pct"]) == ("bilinear", "squash", 1.0)
    assert (meta["architecture"], meta["source"], meta["opset"]) == ("qing_test_tr1", str(folder), 17)


def test_export_prints_what_it_checked(tmp_path, capsys, pneumonia_200):
    _save_model(tmp_path / "model", **CASES["multilabel"])
    argv = ["export", str(tmp_path / "model"), str(tmp_path / "m.onnx"), "--check-images", str(pneumonia_200)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r".*m\.onnx: [\d.]+ MiB, opset 17 \(torchscript exporter\)", lines[0])
    assert lines[1].strip() == (
        "input  image (N, 3, 64, 64) float32, batch dynamic, size dynamic (sides that are multiples of 32)"
    )
    assert lines[2].strip() == "output logits (N, 3): multilabel, sigmoid; Effusion, Mass, Hernia"
    assert "resize the whole image to 64x64" in lines[3]
    diffs = dict(re.findall(r"([a-z][a-z0-9 ()+x]*?) ([\d.e-]+)(?:,|$| \()", lines[4].split(": ", 1)[1]))
    assert set(diffs) == {"random", "images (200 + 2 synthetic)", "another size (96x128)"}
    assert all(float(v) <= 1e-4 for v in diffs.values())

    assert main(argv) == 1  # never replaces a file without --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "m.onnx"), str(tmp_path / "n.onnx")]) == 1
    assert "is already an ONNX file" in capsys.readouterr().err


class _ShapeBranch(nn.Module):
    """A classifier whose Python code branches on the batch size: tracing records the traced batch's branch."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x)
        return out if x.shape[0] == 2 else out + 1.0


def test_a_graph_that_disagrees_with_pytorch_writes_nothing(tmp_path):
    model = qing.create_model("qing_test_tr1", num_classes=2, img_size=SIZE).eval()
    model.head = _ShapeBranch(model.head)
    target = tmp_path / "model.onnx"
    with pytest.raises(
        OnnxParityError, match=r"differs from PyTorch by up to 1 in the logits \(tolerance 0.0001; random: 1"
    ):
        export_onnx(model, target)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one

    target.write_bytes(b"the user's file")
    with pytest.raises(OnnxParityError):
        export_onnx(model, target, overwrite=True)
    assert target.read_bytes() == b"the user's file"
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        export_onnx(qing.create_model("qing_test_tr1", num_classes=1), target)


def test_learned_positions_export_for_their_input_size_only(tmp_path):
    model = qing.create_model("qing_test_tr1", num_classes=2, pos_embed="learned").eval()  # 160 px: a 5 x 5 grid
    report = export_onnx(model, tmp_path / "fixed.onnx")
    assert report.spatial == "fixed" and report.spatial_multiple is None
    assert set(report.max_abs_diff) == {"random", "images (0 + 2 synthetic)"}
    onnx_model = OnnxModel(tmp_path / "fixed.onnx")
    x = torch.randn(3, 3, 160, 160)
    with torch.no_grad():
        assert (onnx_model(x) - model(x)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match=r"exported for 160x160 inputs only \(fixed spatial size\), got 96x96"):
        onnx_model(torch.randn(1, 3, 96, 96))
    with pytest.raises(OnnxParityError, match="cannot be exported with dynamic height and width"):
        export_onnx(model, tmp_path / "dynamic.onnx", spatial="dynamic")
    assert not (tmp_path / "dynamic.onnx").exists()


def test_an_onnx_file_without_qing_metadata_is_refused(tmp_path, capsys):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(tmp_path / "plain.onnx"), dynamo=False)
    with pytest.raises(ValueError, match=r"has no qing metadata \(task, labels, .* missing from its metadata_props\)"):
        OnnxModel(tmp_path / "plain.onnx")
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "plain.onnx"), str(tmp_path / "x.png")]) == 1
    assert "export the model with `qing export`" in capsys.readouterr().err


# ---- predict and eval on an ONNX model ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_predict_with_onnx_equals_pytorch(exported, name, pneumonia_200, tmp_path, capsys):
    folder, path, _ = exported[name]
    images = [str(p) for p in _real_images(pneumonia_200, n=5)]
    documents = {}
    for key, argv in {
        "torch": [str(folder)],
        "onnx file": [str(path)],
        "export on the fly": [str(folder), "--runtime", "onnx"],
    }.items():
        with one_thread():
            assert main(["predict", *argv, *images, "--format", "json", "--batch-size", "2"]) == 0
        captured = capsys.readouterr()
        documents[key] = json.loads(captured.out)
        if key == "export on the fly":
            assert re.search(r"qing: exported .* to ONNX on the fly \(opset 17, dynamic input size", captured.err)
    reference = documents.pop("torch")
    for key, document in documents.items():
        for got, want in zip(document["predictions"], reference["predictions"], strict=True):
            assert got["path"] == want["path"]
            assert list(got["probabilities"].values()) == pytest.approx(list(want["probabilities"].values()), abs=1e-4)
            assert got["positive"] == want["positive"], key
        strip = ("model", "predictions")
        assert {k: v for k, v in document.items() if k not in strip} == {
            k: v for k, v in reference.items() if k not in strip
        }


def test_eval_with_onnx_writes_the_same_report(exported, pneumonia_200, tmp_path, capsys):
    folder, path, _ = exported["binary"]
    outputs = {}
    for key, argv in {
        "torch": [str(folder)],
        "onnx": [str(path)],
        "on the fly": [str(folder), "--runtime", "onnx"],
    }.items():
        out = tmp_path / key.replace(" ", "-")
        with one_thread():
            code = main(
                ["eval", *argv, str(pneumonia_200), "-o", str(out), "--n-bootstrap", "20", "--batch-size", "32"]
            )
        assert code == 0
        outputs[key] = (json.loads((out / "metrics.json").read_text()), read_csv(out / "predictions.csv"), out)
    assert "qing: note: the report has no Grad-CAM, attention or feature-map figures" in capsys.readouterr().err
    metrics, rows, _ = outputs.pop("torch")
    assert metrics["n_samples"] == 200
    for key, (other_metrics, other_rows, out) in outputs.items():
        assert other_metrics["roc_auc"] == pytest.approx(metrics["roc_auc"], abs=1e-6), key
        assert other_metrics["roc_auc_ci"] == pytest.approx(metrics["roc_auc_ci"], abs=1e-3)
        assert other_metrics["thresholds"] == metrics["thresholds"] == [0.3]
        assert [r["path"] for r in other_rows] == [r["path"] for r in rows]
        probs = np.array([float(r["prob_PNEUMONIA"]) for r in other_rows])
        assert np.abs(probs - [float(r["prob_PNEUMONIA"]) for r in rows]).max() <= 1e-4
        files = {p.name for p in out.iterdir()}
        figures = {"attention.png", "feature_maps.png", "gradcam.png"} if key == "onnx" else set()  # PyTorch's
        assert files == {p.name for p in (tmp_path / "torch").iterdir()} - figures


def test_runtime_flags_that_do_not_fit_say_why(exported, pneumonia_200, tmp_path, capsys):
    folder, path, _ = exported["binary"]
    image = str(_real_images(pneumonia_200, n=1)[0])
    cases = {
        ("predict", str(path), image, "--amp", "bf16"): "--amp: PyTorch runtime options, not onnxruntime's",
        ("predict", str(folder), image, "--runtime", "onnx", "--channels-last", "--compile"): (
            "--channels-last, --compile: PyTorch runtime options"
        ),
        ("predict", str(path), image, "--runtime", "torch"): "--runtime torch needs a PyTorch model",
        ("predict", str(path), image, "--heatmaps", str(tmp_path / "h")): (
            "--heatmaps needs the PyTorch model: Grad-CAM and attention maps are not part of the ONNX graph"
        ),
        ("predict", str(path), image, "--tta"): "--tta: PyTorch runtime options, not onnxruntime's",
        ("predict", str(folder), image, "--runtime", "onnx", "--heatmaps", str(tmp_path / "h")): (
            "--heatmaps runs on the PyTorch model; drop --runtime onnx"
        ),
        ("explain", str(path), image, "-o", str(tmp_path / "a.png")): "qing explain needs the PyTorch model",
        ("predict", str(tmp_path / "missing.onnx"), image): "ONNX model not found",
    }
    for argv, message in cases.items():
        assert main(list(argv)) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("qing: error: ") and message in err, (argv, err)


# ---- the fast PyTorch paths ---------------------------------------------------------------------------


def test_amp_channels_last_and_workers_in_predict(exported, pneumonia_200, capsys):
    folder, _, _ = exported["multilabel"]
    images = [str(p) for p in _real_images(pneumonia_200, n=6)]
    results = {}
    for key, flags in {
        "plain": [],
        "workers": ["--num-workers", "2"],
        "bf16": ["--amp", "bf16", "--channels-last"],
        "fp16": ["--amp", "fp16"],
    }.items():
        with one_thread():
            assert main(["predict", str(folder), *images, "--format", "json", "--batch-size", "4", *flags]) == 0
        document = json.loads(capsys.readouterr().out)
        results[key] = np.array([list(p["probabilities"].values()) for p in document["predictions"]])
    assert np.array_equal(results["workers"], results["plain"])  # decoding in worker processes changes nothing
    assert np.abs(results["bf16"] - results["plain"]).max() <= 2e-2  # bf16 keeps 8 bits of mantissa
    assert np.abs(results["fp16"] - results["plain"]).max() <= 2e-3
    assert np.abs(results["bf16"] - results["plain"]).max() > 0  # autocast did run in bf16


def test_torch_runner_compiles_and_the_loop_takes_any_runner(exported, pneumonia_200):
    _, path, model = exported["multilabel"]
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
    runner = TorchRunner(model, compile=True, compile_options={"backend": "eager"})  # inductor is minutes on CPU
    assert runner.compile_mode is None and isinstance(runner._forward, torch._dynamo.eval_frame.OptimizedModule)
    assert torch.allclose(runner(x), expected, atol=1e-6)

    loader = [
        {"image": x[:3], "index": torch.arange(3), "bad": []},
        {"image": x[3:], "index": torch.tensor([3]), "bad": []},
    ]
    onnx_out = collect_logits(OnnxModel(path), loader)
    assert onnx_out.indices.tolist() == [0, 1, 2, 3] and (onnx_out.logits - expected).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="amp_dtype and channels_last are options of the runner"):
        next(iter_logits(runner, loader, amp_dtype=torch.bfloat16))

    model.train()
    collect_logits(model, loader)
    assert model.training  # a module's mode is restored after the loop
    model.eval()


def test_cli_compile_flag_builds_a_compiled_runner(exported):
    folder, _, _ = exported["binary"]
    loaded = load_model(str(folder), device=torch.device("cpu"))
    args = argparse.Namespace(runtime=None, amp="bf16", channels_last=True, compile=True)
    runner = build_runner(loaded, args, torch.device("cpu"))
    assert isinstance(runner, TorchRunner) and runner.amp_dtype is torch.bfloat16 and runner.channels_last
    assert isinstance(runner._forward, torch._dynamo.eval_frame.OptimizedModule) and runner.compile_mode is None
    conv = next(p for p in loaded.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


# ---- the Deploy guide's onnxruntime-only preprocessing -------------------------------------------------


def _guide_function(name):
    """A function defined in a Python block of docs/guides/deploy.md, run in a namespace of its own."""
    for block in code_blocks(REPO_ROOT / "docs" / "guides" / "deploy.md"):
        if f"def {name}(" in block.source:
            source = block.source[: block.source.index("\n\n\n", block.source.index(f"def {name}(")) + 1]
            namespace: dict = {}
            exec(compile(source, "deploy.md", "exec"), namespace)
            return namespace[name]
    raise AssertionError(f"docs/guides/deploy.md defines no {name}()")


@pytest.mark.parametrize(
    ("crop_mode", "crop_pct", "interpolation", "channels"),
    [("squash", 1.0, "bilinear", 3), ("center", 0.875, "bicubic", 3), ("center", 1.0, "bilinear", 1)],
)
def test_guide_preprocessing_without_qing_equals_qings(
    crop_mode, crop_pct, interpolation, channels, pneumonia_200, nih_64
):
    preprocess = _guide_function("preprocess")
    model = qing.create_model("qing_test_tr1", num_classes=1, in_chans=channels)
    config = resolve_image_config(model, img_size=96)
    config.update(crop_mode=crop_mode, crop_pct=crop_pct, interpolation=interpolation)
    transform = build_transforms(config, train=False)
    meta = {
        "input_size": list(config["input_size"]), "interpolation": interpolation, "crop_mode": crop_mode,
        "crop_pct": crop_pct, "mean": list(config["mean"]), "std": list(config["std"]),
        "color_mode": "L" if channels == 1 else "RGB",
    }  # fmt: skip
    for path in [*_real_images(pneumonia_200, n=2), sorted((nih_64 / "NORMAL").iterdir())[0]]:
        with Image.open(path) as image:
            got = preprocess(image, meta)
        want = transform(load_image(path, channels=channels)).numpy()[None]
        assert got.dtype == np.float32 and got.shape == want.shape == (1, channels, 96, 96)
        assert np.abs(got - want).max() <= 1e-5, path
