"""``qing app`` without a browser: its predictions are ``qing predict``'s, bad files are reported, the model
summary, the Space export (its ``app.py`` run and queried over HTTP) and ``qing push --repo-type space``.

The page itself, in Chromium, is tested in tests/test_app_browser.py.
"""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml

import qing
from qing.cli import main
from qing.cli._app_results import (
    ModelStore,
    analyze,
    model_config,
    model_summary,
    parse_size,
    results_html,
    size_text,
    status_text,
)
from qing.cli._common import CLIError, load_model
from qing.cli._space import read_space_sdk
from qing.meta import set_meta
from qing.model_card import generate_model_card, model_card_summary
from tests.make_fake_data import write_dicom, write_png, write_truncated_png

pytest_plugins = ["tests.hub_server"]  # the loopback Hub fixtures: hub_server, hub

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A binary qing_test_tr1 folder at 64 px: positive PNEUMONIA, negative NORMAL, threshold 0.45, an AUROC."""
    root = tmp_path_factory.mktemp("app-model")
    torch.manual_seed(3)
    model = qing.create_model("qing_test_tr1", num_classes=1).eval()
    set_meta(
        model,
        task="binary",
        thresholds=[0.45],
        threshold_method="youden",
        negative_label="NORMAL",
        metrics={"roc_auc": 0.8125, "n_samples": 40},
        datasets=["cxr-pneumonia-200"],
    )
    qing.save_pretrained(model, root / "model", label_names=["PNEUMONIA"], data_config={"input_size": (3, 64, 64)})
    return root / "model"


@pytest.fixture
def real_images(pneumonia_200) -> list[Path]:
    return [*sorted((pneumonia_200 / "NORMAL").iterdir())[:2], *sorted((pneumonia_200 / "PNEUMONIA").iterdir())[:2]]


def _predict_csv(model: Path, images: list[Path], capsys) -> list[dict[str, str]]:
    assert main(["predict", str(model), *map(str, images), "--format", "csv"]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def test_app_predictions_are_qing_predicts(model_dir, real_images, capsys):
    expected = _predict_csv(model_dir, real_images, capsys)
    loaded = load_model(str(model_dir), device=CPU)
    analysis = analyze(loaded, real_images, batch_size=3)  # other batches than predict's: the same numbers

    rows = list(csv.DictReader(io.StringIO(analysis.csv)))
    assert list(rows[0]) == list(expected[0]) == ["path", "prob_PNEUMONIA", "positive_PNEUMONIA", "error"]
    assert [r["path"] for r in rows] == [p.name for p in real_images]
    for row, reference in zip(rows, expected):
        assert abs(float(row["prob_PNEUMONIA"]) - float(reference["prob_PNEUMONIA"])) <= 1e-6
        assert row["positive_PNEUMONIA"] == reference["positive_PNEUMONIA"]
    probs = [r.prediction.probabilities[0] for r in analysis.results]
    assert len(set(probs)) == len(probs)  # a real model on real images: four different answers

    page = results_html(analysis)
    for result in analysis.results:
        p = result.prediction.probabilities[0]
        assert f'<td class="qing-prob">{p:.4f}</td>' in page
        decision = "PNEUMONIA" if p >= 0.45 else "NORMAL"
        assert f"Decision: <strong>{decision}</strong>" in page
        assert list(result.pictures) == ["Model input (64 × 64, after preprocessing)", "Attention rollout"]
        for png in result.pictures.values():
            assert png.startswith(b"\x89PNG")
    assert status_text(analysis) == f"4 image(s) predicted with {model_dir}."


def test_the_model_input_picture_is_the_preprocessed_image(model_dir, real_images):
    loaded = load_model(str(model_dir), device=CPU)
    analysis = analyze(loaded, real_images[:1])
    from PIL import Image

    shown = np.asarray(
        Image.open(io.BytesIO(analysis.results[0].pictures["Model input (64 × 64, after preprocessing)"]))
    )
    transform = qing.data.build_transforms(loaded.model, train=False)
    x = transform(qing.data.load_image(real_images[0], channels=3))
    expected = np.round((x * torch.tensor(transform.std)[:, None, None] + torch.tensor(transform.mean)[:, None, None])
                        .clamp(0, 1).numpy().transpose(1, 2, 0) * 255)  # fmt: skip
    assert shown.shape == (64, 64, 3)
    assert np.abs(shown.astype(float) - expected).max() <= 1


def test_grad_cam_for_the_chosen_label(model_dir, real_images):
    loaded = load_model(str(model_dir), device=CPU)
    analysis = analyze(loaded, real_images[:2], grad_cam_label=0)
    for result in analysis.results:
        assert list(result.pictures)[-1] == "Grad-CAM: PNEUMONIA"
        assert result.pictures["Grad-CAM: PNEUMONIA"] != result.pictures["Attention rollout"]
    assert "Grad-CAM" not in "".join(analyze(loaded, real_images[:1]).results[0].pictures)  # only when asked


def _dicom_without_pixels(path: Path) -> Path:
    write_dicom(path, np.full((8, 8), 100, dtype=np.uint16))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    return path


def test_bad_files_are_reported_and_the_rest_predicted(model_dir, real_images, tmp_path):
    bad = {
        "notes.txt": tmp_path / "notes.txt",
        "truncated.png": write_truncated_png(tmp_path / "truncated.png"),
        "empty.png": tmp_path / "empty.png",
        "no-pixels.dcm": _dicom_without_pixels(tmp_path / "no-pixels.dcm"),
        "big.png": write_png(tmp_path / "big.png", size=200, seed=1),
    }
    bad["notes.txt"].write_text("not an image")
    bad["empty.png"].write_bytes(b"")
    loaded = load_model(str(model_dir), device=CPU)
    files = [real_images[0], *bad.values(), real_images[1]]
    limit = bad["big.png"].stat().st_size - 1
    analysis = analyze(loaded, files, max_file_size=limit)

    errors = {r.prediction.path: r.prediction.error for r in analysis.results}
    assert errors[real_images[0].name] is None and errors[real_images[1].name] is None
    assert errors["notes.txt"].startswith("UnidentifiedImageError: cannot identify image file 'notes.txt'")
    assert "truncated" in errors["truncated.png"]
    assert errors["empty.png"] == "the file is empty (0 bytes)"
    assert errors["no-pixels.dcm"].startswith("DICOM pixel data unreadable")
    assert errors["big.png"] == (
        f"file too large: {size_text(limit + 1)}, the limit is {size_text(limit)} (qing app --max-file-size)"
    )
    assert str(tmp_path) not in "".join(e or "" for e in errors.values())  # no server paths in the page
    assert analysis.n_failed == 5
    assert status_text(analysis).endswith("; 5 of 7 file(s) could not be read (see below).")
    rows = list(csv.DictReader(io.StringIO(analysis.csv)))
    assert [r["error"] != "" for r in rows] == [False, True, True, True, True, True, False]
    page = results_html(analysis)
    assert page.count('class="qing-card qing-failed"') == 5
    assert "Could not read this file: the file is empty (0 bytes)" in page

    few = analyze(loaded, real_images[:3], max_files=2)
    assert [r.prediction.error is None for r in few.results] == [True, True, False]
    assert few.results[2].prediction.error == (
        "not read: at most 2 files per upload (use qing predict for folders of images)"
    )


def test_file_names_are_escaped_in_the_page(model_dir, real_images, tmp_path):
    odd = tmp_path / "<img src=x onerror=alert(1)>.png"
    odd.write_bytes(real_images[0].read_bytes())
    page = results_html(analyze(load_model(str(model_dir), device=CPU), [odd]))
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.png" in page


def test_model_summary_has_the_card_facts_a_user_needs(model_dir):
    loaded = load_model(str(model_dir), device=CPU)
    summary = model_summary(loaded)
    assert summary.startswith(f"**Model:** `{model_dir}` (model folder {model_dir}); architecture `qing_test_tr1`")
    assert "**Decision:** PNEUMONIA when its probability is at least the threshold, otherwise NORMAL." in summary
    assert "| 0 | PNEUMONIA | 0.4500 |" in summary  # labels and stored thresholds
    assert "resized to 64 x 64 pixels" in summary and "mean = (0.485, 0.485, 0.485)" in summary
    assert "| ROC AUC | 0.8125 |" in summary and "on cxr-pneumonia-200" in summary
    assert "> **Not a medical device.**" in summary and "Intended use: research" in summary
    for heading in ("Labels and decision thresholds", "Preprocessing", "Evaluation", "Intended use and limitations"):
        assert f"\n### {heading}\n" in summary


def test_model_card_summary_is_the_cards_text_without_usage(model_dir):
    config = model_config(load_model(str(model_dir), device=CPU))
    summary = model_card_summary(config)
    card = generate_model_card(config, model_id="local-dir:x")
    assert "## Usage" not in summary and "## Model details" not in summary and "---" not in summary.splitlines()[0]
    for section in summary.split("\n## ")[1:]:
        assert section in card  # the same words as the model card
    assert summary.startswith("> **Not a medical device.**")


def test_model_store_loads_once_and_refuses_models_it_may_not_load(model_dir, tmp_path):
    store = ModelStore(CPU)
    assert store.get(str(model_dir)) is store.get(f" {model_dir} ")
    with pytest.raises(CLIError, match="model folder or checkpoint not found: missing/model"):
        store.get("missing/model")
    with pytest.raises(CLIError, match="choose a model"):
        store.get("")
    locked = ModelStore(CPU, allowed=[str(model_dir)])
    with pytest.raises(CLIError, match=r"this page serves only .*; 'qing_test_tr1' is not one of them"):
        locked.get("qing_test_tr1")
    small = ModelStore(CPU, capacity=1)
    first = small.get(str(model_dir))
    other = tmp_path / "other"
    qing.save_pretrained(qing.create_model("qing_test_tr1", num_classes=2), other, label_names=["a", "b"])
    small.get(str(other))
    assert small.get(str(model_dir)) is not first  # evicted, loaded again


def test_size_limits_parse_and_print():
    assert [parse_size(t) for t in ("64mb", "500KB", "1.5 mb", "1gb", "1000")] == [
        64 << 20, 500 << 10, 3 << 19, 1 << 30, 1000,
    ]  # fmt: skip
    assert [size_text(n) for n in (64 << 20, 3 << 19, 900)] == ["64 MB", "1.5 MB", "900 bytes"]
    for text in ("lots", "0mb", "-1kb"):
        with pytest.raises(ValueError):
            parse_size(text)


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, **kwargs)


def test_qing_app_without_gradio_says_how_to_install_it(model_dir):
    code = "import sys; sys.modules['gradio'] = None; from qing.cli import main; sys.exit(main(sys.argv[1:]))"
    result = _run([sys.executable, "-c", code, "app", str(model_dir)])
    assert result.returncode == 1
    assert (
        result.stderr.strip() == "qing: error: qing app needs Gradio, the optional app extra: pip install 'qing[app]'"
    )


def test_usage_errors_of_qing_app(model_dir, tmp_path, capsys):
    assert main(["app", "--only-these-models"]) == 1
    assert "--only-these-models needs at least one MODEL" in capsys.readouterr().err
    assert main(["app", str(model_dir), str(model_dir), "--export-space", str(tmp_path / "s")]) == 1
    assert "--export-space takes exactly one MODEL, got 2" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["app", str(model_dir), "--export-space", str(tmp_path / "full")]) == 1
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        main(["app", str(model_dir), "--max-file-size", "lots"])
    assert "expected a size such as 64mb" in capsys.readouterr().err


# ---- the Hugging Face Space ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def space(model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("space") / "space"
    assert main(["app", str(model_dir), "--export-space", str(folder), "--max-file-size", "5mb"]) == 0
    return folder


def test_export_space_writes_a_space_folder(space, model_dir, real_images):
    assert sorted(p.name for p in space.iterdir()) == ["README.md", "app.py", "model", "requirements.txt"]
    header = yaml.safe_load((space / "README.md").read_text().split("---\n")[1])
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py" and header["title"] == "model"
    assert header["sdk_version"] == __import__("gradio").__version__  # the version the page was tested with
    assert "qing" in header["tags"]
    assert read_space_sdk(space) == "gradio"
    assert (space / "requirements.txt").read_text() == f"qing[dicom]=={qing.__version__}\n"
    app = (space / "app.py").read_text()
    assert "MODEL = 'model'" in app and '"--only-these-models"' in app and '"5242880"' in app
    # the bundled model is the same model
    original, bundled = load_model(str(model_dir), device=CPU), load_model(str(space / "model"), device=CPU)
    assert (bundled.labels, bundled.thresholds, bundled.negative_label) == (["PNEUMONIA"], [0.45], "NORMAL")
    a, b = analyze(original, real_images[:2]), analyze(bundled, real_images[:2])
    assert [r.prediction.probabilities for r in a.results] == [r.prediction.probabilities for r in b.results]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exported_app_py_serves_the_model(space, model_dir, real_images, tmp_path, capsys):
    """Run the Space's app.py as the Hub would (in its folder, port from GRADIO_SERVER_PORT) and call it."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    port = _free_port()
    temp = tmp_path / "tmp"  # where the app keeps the uploads while it runs
    temp.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", GRADIO_SERVER_PORT=str(port))
    env["TMPDIR"] = str(temp)
    env.pop("GRADIO_SERVER_NAME", None)  # this computer only
    log = (tmp_path / "app.log").open("w")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 600  # importing torch, timm and Gradio on a loaded machine
        while "serving on" not in (tmp_path / "app.log").read_text():
            assert process.poll() is None, (tmp_path / "app.log").read_text()
            assert time.monotonic() < deadline, "app.py did not start in 600 s"
            time.sleep(0.5)
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        status, page, csv_file = client.predict(
            [handle_file(str(p)) for p in real_images[:2]], "model", None, api_name="/predict"
        )
        assert status == "2 image(s) predicted with model."
        expected = _predict_csv(model_dir, real_images[:2], capsys)
        rows = list(csv.DictReader(io.StringIO(Path(csv_file).read_text())))
        assert [r["path"] for r in rows] == [p.name for p in real_images[:2]]
        for row, reference in zip(rows, expected):
            assert abs(float(row["prob_PNEUMONIA"]) - float(reference["prob_PNEUMONIA"])) <= 1e-4
            assert f'<td class="qing-prob">{float(row["prob_PNEUMONIA"]):.4f}</td>' in page
        # the Space serves only its own model: another MODEL is refused, and the server goes on serving
        with pytest.raises(AppError, match=r"is not in the list of choices: \['model'\]"):
            client.predict([handle_file(str(real_images[0]))], str(model_dir), None, api_name="/predict")
        status, _, _ = client.predict([handle_file(str(real_images[2]))], "model", None, api_name="/predict")
        assert status == "1 image(s) predicted with model."
        (workdir,) = temp.glob("qing-app-*")
        assert {p.name for p in (workdir / "uploads").rglob("*.jpeg")} == {p.name for p in real_images[:3]}
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 128 + 15  # SIGTERM: stopped as a service is stopped
        log.close()
    assert list(temp.glob("qing-app-*")) == []  # the uploaded X-rays are gone with the app


def test_push_a_space_to_the_hub(space, hub, capsys):
    assert main(["push", str(space), "demo", "--repo-type", "space"]) == 0
    out = capsys.readouterr().out
    assert f"the Space: {hub.endpoint}/spaces/qing-tester/demo" in out
    files = hub.files("spaces/qing-tester/demo")
    assert {"app.py", "requirements.txt", "README.md", "model/model.safetensors", "model/config.json"} <= set(files)
    assert files["app.py"] == (space / "app.py").read_bytes()
    assert hub.state.repos["spaces/qing-tester/demo"].sdk == "gradio"
    assert "qing-tester/demo" not in hub.state.repos  # a Space, not a model repo


def test_push_refuses_a_folder_that_is_not_a_space(model_dir, hub, capsys):
    assert main(["push", str(model_dir), "demo", "--repo-type", "space"]) == 1
    assert "is not a Space folder: its README.md has no YAML header with an sdk" in capsys.readouterr().err
    assert hub.state.repos == {}


def test_multilabel_and_multiclass_cards(real_images, tmp_path):
    torch.manual_seed(4)
    multilabel = qing.create_model("qing_test_tr1", num_classes=2).eval()
    set_meta(multilabel, task="multilabel", thresholds=[0.0, 1.0])  # always positive, never positive
    qing.save_pretrained(multilabel, tmp_path / "ml", label_names=["Effusion", "Edema"])
    multiclass = qing.create_model("qing_test_tr1", num_classes=3).eval()
    set_meta(multiclass, task="multiclass")
    qing.save_pretrained(multiclass, tmp_path / "mc", label_names=["normal", "bacterial", "viral"])

    analysis = analyze(load_model(str(tmp_path / "ml"), device=CPU), real_images[:1])
    page = results_html(analysis)
    assert "Decision: <strong>Effusion</strong>" in page
    assert '<td class="qing-threshold">0.0000</td><td class="qing-call">positive</td>' in page
    assert '<td class="qing-threshold">1.0000</td><td class="qing-call">negative</td>' in page
    assert analysis.csv.splitlines()[0] == "path,prob_Effusion,prob_Edema,positive_Effusion,positive_Edema,error"

    analysis = analyze(load_model(str(tmp_path / "mc"), device=CPU), real_images[:1])
    probs = analysis.results[0].prediction.probabilities
    assert sum(probs) == pytest.approx(1.0, abs=1e-6)  # softmax
    winner = ["normal", "bacterial", "viral"][int(np.argmax(probs))]
    page = results_html(analysis)
    assert f"Decision: <strong>{winner}</strong>" in page and page.count(">argmax<") == 3
    assert page.count('<td class="qing-call">predicted</td>') == 1
    assert analysis.csv.splitlines()[1].endswith(f",{winner},")
    summary = model_summary(load_model(str(tmp_path / "mc"), device=CPU))
    assert "**Decision:** the most probable class (argmax)." in summary
