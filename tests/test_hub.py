"""save_pretrained / push_to_hub / loading back, with the real huggingface_hub client on a loopback Hub."""

import contextlib
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub import constants as hf_constants
from PIL import Image

import qing
from qing import from_pretrained
from qing.evaluate.metrics import compute_metrics
from qing.hub import ModelSourceNotFoundError, push_to_hub, save_pretrained
from qing.meta import ModelMeta, set_meta

pytest_plugins = ["tests.hub_server"]  # the loopback Hub fixtures: hub_server, hub

REPO = "qing-tester/cxr-pneumonia"
X = torch.linspace(-2, 2, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
METRICS = {"roc_auc": 0.9125, "roc_auc_ci": [0.85, 0.96], "accuracy": 0.8, "n_samples": 40}


def _binary_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = qing.create_model("qing_test_tr1", num_classes=1).eval()
    set_meta(
        model,
        task="binary",
        thresholds=[0.42],
        threshold_method="youden",
        metrics=dict(METRICS),
        datasets=["cxr-pneumonia-200"],
    )
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def _card_header(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])


def _safetensors_equal_state_dict(data: bytes, model: torch.nn.Module) -> None:
    loaded = safetensors.torch.load(data)
    state = model.state_dict()
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


# --------------------------------------------------------------------------------------------
# Local folders
# --------------------------------------------------------------------------------------------


def test_save_pretrained_writes_timm_folder_and_loads_back(tmp_path):
    model = _binary_model()
    folder = save_pretrained(model, tmp_path / "model", label_names=["Pneumonia"], license="cc-by-4.0")

    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    _safetensors_equal_state_dict((folder / "model.safetensors").read_bytes(), model)

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "qing_test_tr1"
    assert config["num_classes"] == 1
    assert config["label_names"] == config["pretrained_cfg"]["label_names"] == ["Pneumonia"]
    assert "num_classes" not in config["model_args"]  # transformers passes num_classes itself (TypeError if repeated)
    assert config["problem_type"] == "multi_label_classification"  # transformers' pipeline: sigmoid per label
    cfg = config["pretrained_cfg"]
    assert cfg["mean"] == [0.485] * 3 and cfg["std"] == [0.229] * 3 and cfg["input_size"] == [3, 160, 160]
    assert config["qing"] == {
        "task": "binary",
        "thresholds": [0.42],
        "threshold_method": "youden",
        "metrics": METRICS,
        "datasets": ["cxr-pneumonia-200"],
    }

    header = _card_header((folder / "README.md").read_text())
    assert header["library_name"] == "timm"
    assert header["license"] == "cc-by-4.0"
    assert header["pipeline_tag"] == "image-classification"
    assert header["tags"] == ["timm", "image-classification", "chest-x-ray", "medical-imaging", "qing", "binary"]
    assert header["datasets"] == ["cxr-pneumonia-200"]
    assert header["metrics"] == ["roc_auc", "accuracy"]
    results = header["model-index"][0]["results"][0]
    assert results["dataset"] == {"name": "cxr-pneumonia-200", "type": "cxr-pneumonia-200"}
    assert results["metrics"] == [
        {"type": "roc_auc", "value": 0.9125, "name": "ROC AUC"},
        {"type": "accuracy", "value": 0.8, "name": "Accuracy"},
    ]

    loaded = qing.create_model(f"local-dir:{folder}", pretrained=True)
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.qing_meta == model.qing_meta
    assert loaded.pretrained_cfg["label_names"] == ["Pneumonia"]
    assert from_pretrained(folder).qing_meta == model.qing_meta  # a Path means a local folder


def test_model_index_says_test_metrics_are_test_split_metrics(tmp_path):
    """The Trainer stores test-split metrics as ``test_*``: the card's model-index carries ``split: test``."""
    model = _binary_model()
    set_meta(model, metrics={"test_roc_auc": 0.9125, "test_accuracy": 0.8, "n_test": 40, "val_loss": 0.4})
    header = _card_header((save_pretrained(model, tmp_path / "m", label_names=["Pneumonia"]) / "README.md").read_text())
    results = header["model-index"][0]["results"]
    by_metric = {m["type"]: (r["dataset"], m["name"]) for r in results for m in r["metrics"]}
    dataset = {"name": "cxr-pneumonia-200", "type": "cxr-pneumonia-200"}
    assert by_metric["test_roc_auc"] == ({**dataset, "split": "test"}, "ROC AUC")
    assert by_metric["test_accuracy"] == ({**dataset, "split": "test"}, "Accuracy")
    assert by_metric["val_loss"] == (dataset, "val_loss")  # not a test-split metric: no split claimed


def test_model_card_text(tmp_path):
    model = _binary_model()
    card = (save_pretrained(model, tmp_path / "m", label_names=["Pneumonia"], repo_id=REPO) / "README.md").read_text()
    body = card.split("\n---\n", 1)[1]
    usage = re.search(r"## Usage\n\n```python\n(.*?)```", body, re.S).group(1)
    assert usage.startswith("import qing\n")
    assert f'model = qing.create_model("hf-hub:{REPO}", pretrained=True).eval()' in usage
    assert "> **Not a medical device.**" in body
    assert "## Intended use and limitations" in body
    assert "| 0 | Pneumonia | 0.4200 |" in body  # label table with the tuned threshold
    assert "`mean = (0.485, 0.485, 0.485)` and `std = (0.229, 0.229, 0.229)`" in body
    assert "resized to 160 x 160 pixels (aspect ratio not kept), bilinear interpolation" in body
    assert "| ROC AUC | 0.9125 (CI 0.8500 to 0.9600) |" in body
    assert "| Accuracy | 0.8000 |" in body and "| Samples | 40 |" in body
    assert "- Parameters: 420,881" in body


def test_card_per_label_table_from_compute_metrics(tmp_path):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, size=(30, 3))
    probs = np.clip(targets * 0.6 + rng.random((30, 3)) * 0.5, 0, 1)
    labels = ["Atelectasis", "Effusion", "Edema"]
    metrics = compute_metrics(targets, probs, task="multilabel", label_names=labels, n_bootstrap=0)
    model = qing.create_model("qing_test_tr1", num_classes=3)
    set_meta(model, task="multilabel", metrics=metrics)
    card = (save_pretrained(model, tmp_path / "m", label_names=labels) / "README.md").read_text()
    for row in metrics["per_label"]:
        line = next(li for li in card.splitlines() if li.startswith(f"| {row['label']} | {row['n_positive']} |"))
        assert f"| {row['roc_auc']:.4f} |" in line
    assert f"| ROC AUC | {metrics['roc_auc']:.4f} |" in card
    assert "No tuned thresholds were saved" in card and "| 2 | Edema | 0.5 (default) |" in card


def test_save_pretrained_replaces_a_model_folder_only_when_complete(tmp_path):
    target = tmp_path / "model"
    first = _binary_model(seed=0)
    save_pretrained(first, target, label_names=["Pneumonia"])
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    with pytest.raises(ValueError, match=r"extra_files name '\.\./escape' must be a relative path"):
        save_pretrained(_binary_model(seed=1), target, label_names=["Pneumonia"], extra_files={"../escape": "x"})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # old model untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # staging folder removed

    second = _binary_model(seed=1)
    save_pretrained(second, target, label_names=["Pneumonia"], extra_files={"training/state.json": "{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # old folder removed after the swap
    assert (target / "training" / "state.json").read_text() == "{}"
    assert torch.equal(_logits(qing.create_model(f"local-dir:{target}", pretrained=True)), _logits(second))

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError) as err:
        save_pretrained(first, precious)
    assert str(err.value) == (
        f"{precious} is not a qing model folder (it holds no config.json of a qing model); refusing to replace it "
        "and what it holds (notes.txt). Choose a new folder, or pass overwrite=True to replace it with everything "
        "in it."
    )
    assert (precious / "notes.txt").read_text() == "keep me"


def test_save_pretrained_bad_input(tmp_path):
    model = _binary_model()
    with pytest.raises(ValueError) as err:
        save_pretrained(model, tmp_path / "a", label_names=["Normal", "Pneumonia"])
    assert str(err.value) == "2 label_names for a model with 1 outputs (binary: the name of the positive class)"
    with pytest.raises(TypeError, match=r"unknown model card field\(s\) \['licence'\]"):
        save_pretrained(model, tmp_path / "a", licence="mit")
    with pytest.raises(TypeError, match="expected a timm model"):
        save_pretrained(torch.nn.Linear(2, 1), tmp_path / "a")
    model.qing_meta = ModelMeta(thresholds=[0.3, 0.7])
    with pytest.raises(ValueError, match=r"^model.qing_meta has 2 thresholds for 1 outputs$"):
        save_pretrained(model, tmp_path / "a")
    assert not any(tmp_path.iterdir())


def test_local_dir_errors(tmp_path):
    missing = tmp_path / "nope"
    expected = (
        "expected a folder written by qing.save_pretrained or timm's save_for_hf (config.json, model.safetensors)"
    )
    with pytest.raises(ModelSourceNotFoundError) as err:
        qing.create_model(f"local-dir:{missing}", pretrained=True)
    assert str(err.value) == f"local model folder {missing} does not exist; {expected}"

    folder = save_pretrained(_binary_model(), tmp_path / "m", label_names=["Pneumonia"])
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated download / disk full
    with pytest.raises(ValueError, match=rf"^the weights of local model folder {re.escape(str(folder))} are not a "):
        qing.create_model(f"local-dir:{folder}", pretrained=True)

    weights.unlink()
    with pytest.raises(ModelSourceNotFoundError) as err:
        qing.create_model(f"local-dir:{folder}", pretrained=True)
    assert str(err.value) == f"local model folder {folder} has no weights file (model.safetensors); {expected}"

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, architecture="qing_unknown_tr9")))
    with pytest.raises(ValueError) as err:
        qing.create_model(f"local-dir:{folder}")
    assert str(err.value).startswith(
        f"local model folder {folder} needs the architecture 'qing_unknown_tr9' (from its config.json), "
        "which is not registered"
    )
    (folder / "config.json").write_text(json.dumps(dict(config, qing={"task": "binary", "colour": "red"})))
    with pytest.raises(ValueError, match=r"invalid 'qing' metadata in config.json of local model folder .*'colour'"):
        qing.create_model(f"local-dir:{folder}")
    (folder / "config.json").unlink()
    with pytest.raises(ModelSourceNotFoundError, match=r"has no config.json; expected a folder written by"):
        qing.create_model(f"local-dir:{folder}")


def test_new_head_drops_head_metadata_and_no_weights_is_logged(tmp_path, caplog):
    folder = save_pretrained(_binary_model(), tmp_path / "m", label_names=["Pneumonia"])
    with caplog.at_level(logging.WARNING, logger="qing"):
        model = qing.create_model(f"local-dir:{folder}", pretrained=True, num_classes=3)
    assert model.num_classes == 3
    assert model.qing_meta == ModelMeta(datasets=["cxr-pneumonia-200"])
    assert (
        f"local model folder {folder} was saved with 1 outputs, the model has 3: dropped qing metadata " in caplog.text
    )
    assert "thresholds, threshold_method, metrics, task (it described the old head)" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qing"):
        bare = qing.create_model(f"local-dir:{folder}")  # architecture only, like timm
    assert not hasattr(bare, "qing_meta")
    assert caplog.messages == [
        f"built the qing_test_tr1 architecture from local model folder {folder} without its weights "
        "(pretrained=False); pass pretrained=True or use qing.from_pretrained to load them"
    ]


# --------------------------------------------------------------------------------------------
# The Hub (loopback server, real client)
# --------------------------------------------------------------------------------------------


def test_push_and_pull_round_trip(hub, tmp_path):
    model = _binary_model()
    commit = push_to_hub(model, REPO, label_names=["Pneumonia"], license="cc-by-4.0")
    assert re.fullmatch(r"[0-9a-f]{40}", commit.oid)
    assert commit == f"{hub.endpoint}/{REPO}/commit/{commit.oid}"

    remote = hub.files(REPO)
    assert sorted(remote) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    local = save_pretrained(model, tmp_path / "same", label_names=["Pneumonia"], license="cc-by-4.0", repo_id=REPO)
    for name in ("model.safetensors", "config.json", "README.md"):
        assert remote[name] == (local / name).read_bytes(), name  # exactly what save_pretrained writes
    _safetensors_equal_state_dict(remote["model.safetensors"], model)

    pulled = qing.create_model(f"hf-hub:{REPO}", pretrained=True)
    assert torch.equal(_logits(pulled), _logits(model))
    assert pulled.qing_meta == model.qing_meta
    assert pulled.pretrained_cfg["label_names"] == ["Pneumonia"]
    plain = timm.create_model(f"hf-hub:{REPO}", pretrained=True)
    assert torch.equal(_logits(plain), _logits(model))
    again = save_pretrained(pulled, tmp_path / "again", license="cc-by-4.0", repo_id=REPO)
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (again / name).read_bytes() == remote[name], name  # a pulled model saves back identically

    info = HfApi().model_info(REPO)
    assert info.sha == commit.oid and info.library_name == "timm" and "chest-x-ray" in info.tags
    cached = Path(hf_constants.HF_HUB_CACHE) / "models--qing-tester--cxr-pneumonia" / "snapshots" / commit.oid
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "model.safetensors"]


def test_card_usage_snippet_runs(hub, tmp_path):
    model = _binary_model()
    push_to_hub(model, REPO, label_names=["Pneumonia"])
    card = hub.files(REPO)["README.md"].decode()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    image_path = tmp_path / "cxr.png"
    pixels = (np.add.outer(np.arange(96), np.arange(80)) % 256).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(image_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(snippet.replace("chest_xray.png", str(image_path)), {})

    config = timm.data.resolve_data_config({}, model=model)
    x = timm.data.create_transform(**config)(Image.open(image_path).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        p = model(x).sigmoid().item()
    assert out.getvalue() == f"Pneumonia: {p:.3f} ({'positive' if p >= 0.42 else 'negative'} at threshold 0.420)\n"


def test_revision_pinning(hub):
    first, second, branch = _binary_model(seed=0), _binary_model(seed=1), _binary_model(seed=2)
    c1 = push_to_hub(first, REPO, label_names=["Pneumonia"], commit_message="first")
    c2 = push_to_hub(second, REPO, label_names=["Pneumonia"], commit_message="second")
    c3 = push_to_hub(branch, REPO, revision="experiment", label_names=["Pneumonia"])
    assert len({c1.oid, c2.oid, c3.oid}) == 3
    assert [c.title for c in HfApi().list_repo_commits(REPO)] == ["second", "first", "initial commit"]

    ref = {name: _logits(m) for name, m in (("first", first), ("second", second), ("branch", branch))}
    assert not torch.equal(ref["first"], ref["second"]) and not torch.equal(ref["second"], ref["branch"])
    expected = {c1.oid: "first", c2.oid: "second", "main": "second", c3.oid: "branch", "experiment": "branch"}
    for revision, name in expected.items():
        pinned = qing.create_model(f"hf-hub:{REPO}@{revision}", pretrained=True)
        assert torch.equal(_logits(pinned), ref[name]), revision
    assert torch.equal(_logits(from_pretrained(REPO, revision=c1.oid)), ref["first"])
    assert torch.equal(_logits(timm.create_model(f"hf-hub:{REPO}@{c1.oid}", pretrained=True)), ref["first"])
    card = hub.files(REPO, "experiment")["README.md"].decode()
    assert f'qing.create_model("hf-hub:{REPO}@experiment", pretrained=True)' in card


def test_offline_loads_cached_and_fails_fast_otherwise(hub, monkeypatch):
    model = _binary_model()
    commit = push_to_hub(model, REPO, label_names=["Pneumonia"])
    qing.create_model(f"hf-hub:{REPO}", pretrained=True)  # fills the cache

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.state.requests)
    for name in (f"hf-hub:{REPO}", f"hf-hub:{REPO}@{commit.oid}"):
        cached = qing.create_model(name, pretrained=True)
        assert torch.equal(_logits(cached), _logits(model)) and cached.qing_meta == model.qing_meta

    other = "qing-tester/never-downloaded"
    with pytest.raises(ModelSourceNotFoundError) as err:
        qing.create_model(f"hf-hub:{other}", pretrained=True)
    assert str(err.value) == (
        f"Hub repo '{other}' (config.json) is not in the local Hub cache ({hub.cache_dir}) and offline mode is on "
        f"(HF_HUB_OFFLINE=1); go online, download it beforehand with `hf download {other}` (same cache), "
        "or load a local copy with 'local-dir:PATH' (see qing.save_pretrained)"
    )
    assert len(hub.state.requests) == seen  # nothing reached the server: no retries, no timeouts


def test_missing_repo_revision_and_files(hub):
    with pytest.raises(ModelSourceNotFoundError) as err:
        qing.create_model("hf-hub:qing-tester/missing", pretrained=True)
    assert str(err.value) == (
        f"Hub repo 'qing-tester/missing' was not found at {hub.endpoint} (HTTP 404); check the 'owner/name' "
        "spelling, log in for a private or gated repo (`hf auth login` or HF_TOKEN), or load a local folder "
        "with 'local-dir:PATH'"
    )

    push_to_hub(_binary_model(), REPO, label_names=["Pneumonia"])
    with pytest.raises(ModelSourceNotFoundError) as err:
        from_pretrained(REPO, revision="v9")
    assert str(err.value).startswith(f"revision 'v9' was not found in Hub repo '{REPO}' at {hub.endpoint}; ")

    api = HfApi()
    api.create_repo("qing-tester/notes-only")
    api.upload_file(path_or_fileobj=b"# just notes\n", path_in_repo="README.md", repo_id="qing-tester/notes-only")
    with pytest.raises(ModelSourceNotFoundError) as err:
        qing.create_model("hf-hub:qing-tester/notes-only", pretrained=True)
    assert str(err.value) == (
        "Hub repo 'qing-tester/notes-only' has no config.json: expected a timm model repo with config.json and "
        "model.safetensors (as written by qing.push_to_hub or timm's push_to_hf_hub)"
    )


def test_push_needs_a_valid_token(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(Exception, match="Invalid credentials in Authorization header"):
        push_to_hub(_binary_model(), REPO, label_names=["Pneumonia"])
    assert REPO not in hub.state.repos


def test_save_pretrained_channels_last_model(tmp_path):
    """safetensors needs contiguous tensors; a channels_last model saves and reloads unchanged."""
    model = qing.create_model("qing_test_tr1", num_classes=2).eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model = model.to(memory_format=torch.channels_last)
    qing.save_pretrained(model, tmp_path / "cl")
    loaded = qing.create_model(f"local-dir:{tmp_path / 'cl'}", pretrained=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.items())
    assert not model.backbone.conv1[0].weight.is_contiguous()  # the caller's model is left as it was


def test_temperatures_round_trip_card_and_calibration_off(tmp_path):
    model = _binary_model()
    set_meta(model, temperatures=[1.8])
    summary = {
        "test_sensitivity": 0.9, "test_sensitivity_ci": [0.7, 0.97], "test_ece": 0.05, "test_ece_uncalibrated": 0.12,
        "n_test": 40, "confidence": 0.95,
        "per_label": [{"label": "Pneumonia", "n_positive": 20, "n_negative": 20, "threshold": 0.42,
                       "temperature": 1.8, "sensitivity": 0.9, "sensitivity_ci": [0.7, 0.97], "ece": 0.05}],
    }  # fmt: skip
    set_meta(model, metrics=summary)
    folder = save_pretrained(model, tmp_path / "m", label_names=["Pneumonia"])
    assert json.loads((folder / "config.json").read_text())["qing"]["temperatures"] == [1.8]
    loaded = qing.from_pretrained(folder)
    assert loaded.qing_meta == model.qing_meta
    plain = qing.from_pretrained(folder, calibration=False)  # no temperature, the threshold moved: same decisions
    assert plain.qing_meta.temperatures is None
    assert plain.qing_meta.thresholds == pytest.approx([1 / (1 + (0.58 / 0.42) ** 1.8)])  # sigmoid(1.8 logit(.42))
    card = (folder / "README.md").read_text()
    assert "| Output | Label | Threshold | Temperature |" in card and "| 0 | Pneumonia | 0.4200 | 1.8000 |" in card
    assert "calibrated probability (`sigmoid(logit / T)`)" in card
    assert "| Sensitivity (test) | 0.9000 (95% CI 0.7000 to 0.9700) |" in card
    assert "| ECE before temperature scaling (test) | 0.1200 |" in card
    assert "| Pneumonia | 20 | 20 | 0.4200 | 1.8000 | 0.9000 (0.7000 to 0.9700) | 0.0500 |" in card
    usage = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "from qing.evaluate import model_probabilities" in usage
    image = tmp_path / "cxr.png"
    Image.fromarray((np.add.outer(np.arange(96), np.arange(80)) % 256).astype(np.uint8), mode="L").save(image)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(usage.replace("chest_xray.png", str(image)), {})
    config = timm.data.resolve_data_config({}, model=model)
    x = timm.data.create_transform(**config)(Image.open(image).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        p = torch.sigmoid(model(x) / 1.8).item()
    assert out.getvalue() == f"Pneumonia: {p:.3f} ({'positive' if p >= 0.42 else 'negative'} at threshold 0.420)\n"

    # a new head drops the temperatures with the thresholds
    head = qing.create_model(f"local-dir:{folder}", pretrained=True, num_classes=2)
    assert head.qing_meta.temperatures is None and head.qing_meta.thresholds is None
