"""``qing app`` in a real browser: Debian's Chromium driven by selenium through chromedriver.

One module-scoped server (``qing app`` on a free loopback port, serving a qing_test_tr1 trained for one epoch
on the real cxr-pneumonia-200 images) and one browser session; the flow runs as one test so that pytest-xdist
does not start a second server. Skipped with a reason where Chromium, chromedriver, selenium or Gradio are
missing (``.ci/run`` installs them: ``apt-get install chromium chromium-driver``, the test extra).

Set ``QING_APP_SCREENSHOT=docs/assets/app.png`` to refresh the screenshot on the docs' App page.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import qing
from qing.cli import main
from qing.meta import set_meta
from qing.train import Trainer
from tests.conftest import PNEUMONIA_200
from tests.train_helpers import tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("QING_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("QING_CHROMEDRIVER", "/usr/bin/chromedriver"))
MAX_FILE_SIZE = 150 * 1024  # the real images are ~10 KB; the "too large" upload is 200 KB
RUN = "runs/pneumonia"  # the MODEL argument, relative to the app's working folder
WAIT_S = 300  # this 2-core machine is shared: generous waits, never timed assertions
START_S = 600  # importing torch, timm and Gradio on a loaded machine


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


@pytest.fixture(scope="module")
def browser_tools():
    pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[test]'")
    pytest.importorskip("gradio", reason="Gradio is not installed: pip install -e '.[app]'")
    if not _executable(CHROMIUM):
        pytest.skip(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium (or set QING_CHROMIUM)")
    if not _executable(CHROMEDRIVER):
        pytest.skip(f"chromedriver not found at {CHROMEDRIVER}: apt-get install -y chromium-driver")
    if not PNEUMONIA_200.is_dir():
        pytest.skip(f"real CXR data not found at {PNEUMONIA_200} (set QING_SHARED_DATA)")


@pytest.fixture(scope="module")
def models(browser_tools, tmp_path_factory) -> tuple[Path, Path]:
    """A run folder of qing_test_tr1 trained for one epoch on cxr-pneumonia-200 (with its report, so thresholds
    and metrics are stored), and a 2-label model folder to switch to."""
    root = tmp_path_factory.mktemp("app-browser")
    cfg = tiny_config(
        PNEUMONIA_200,
        root / "runs" / "pneumonia",
        epochs=1,
        batch_size=16,
        report=True,  # thresholds chosen on validation and test metrics, as a real run stores them
        data={"patient_regex": qing.data.PATIENT_REGEX_KERMANY},
    )
    Trainer(cfg).fit()
    torch.manual_seed(5)
    other = qing.create_model("qing_test_tr1", num_classes=2).eval()
    set_meta(other, task="multilabel", thresholds=[0.4, 0.6])
    qing.save_pretrained(
        other, root / "two-labels", label_names=["Effusion", "Edema"], data_config={"input_size": (3, 64, 64)}
    )
    assert cfg.run_dir == root / "runs" / "pneumonia"
    return cfg.run_dir, root / "two-labels"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(models, tmp_path_factory):
    """``qing app runs/pneumonia`` on a free loopback port, started in the folder above ``runs/`` as a user would."""
    run_dir, _ = models
    port = _free_port()
    log_path = tmp_path_factory.mktemp("app-log") / "app.log"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "qing", "app", RUN, "--port", str(port), "--device", "cpu",
               "--max-file-size", str(MAX_FILE_SIZE)]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=run_dir.parents[1], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_S
        while "serving on" not in log_path.read_text():
            assert process.poll() is None, f"qing app exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"qing app did not start in {START_S} s:\n{log_path.read_text()}"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def driver(browser_tools, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--disable-extensions", f"--user-data-dir={profile}",
                 "--window-size=1280,1700"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(WAIT_S)
    yield browser
    browser.quit()


# ---- reading and driving the page -----------------------------------------------------------------------


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _wait_for(driver, what, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(lambda d: what(d), message=message)


def _upload(driver, *paths: Path) -> None:
    """Clear the drop zone, then drop ``paths`` into it (what choosing files in the dialog does)."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "#qing-files button[aria-label='Clear']"):
        driver.execute_script("arguments[0].click()", button)  # the drop zone lies over it
    _wait_for(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, "#qing-files tbody tr"), "files not cleared")
    driver.find_element(By.CSS_SELECTOR, "#qing-files input[type=file]").send_keys("\n".join(map(str, paths)))


def _cards(driver) -> dict[str, dict]:
    """Per file card: decision, ``{label: (probability, threshold, call)}`` as shown, error text, image sizes."""
    from selenium.webdriver.common.by import By

    cards = {}
    for card in driver.find_elements(By.CSS_SELECTOR, "#qing-results .qing-card"):
        rows = {
            row.get_attribute("data-label"): tuple(
                row.find_element(By.CSS_SELECTOR, f"td.qing-{part}").text for part in ("prob", "threshold", "call")
            )
            for row in card.find_elements(By.CSS_SELECTOR, "tr.qing-row")
        }
        errors = card.find_elements(By.CSS_SELECTOR, ".qing-error")
        decisions = card.find_elements(By.CSS_SELECTOR, ".qing-decision")
        images = [
            (img.get_attribute("alt"), driver.execute_script("return arguments[0].naturalWidth", img))
            for img in card.find_elements(By.TAG_NAME, "img")
        ]
        cards[card.get_attribute("data-file")] = {
            "rows": rows,
            "error": errors[0].text if errors else None,
            "decision": decisions[0].text if decisions else None,
            "images": images,
        }
    return cards


def _choose_model(driver, spec: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "#qing-model input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(spec, Keys.ENTER)


def _predict_csv(model: Path, image: Path, capsys) -> dict[str, str]:
    assert main(["predict", str(model), str(image), "--format", "csv", "--device", "cpu"]) == 0
    return next(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def _requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            urls.append(message["params"].get("request", {}).get("url") or message["params"].get("url", ""))
    return urls


def test_qing_app_in_chromium(app_url, driver, models, tmp_path, capsys):
    from selenium.webdriver.common.by import By

    run_dir, two_labels = models
    image = sorted((PNEUMONIA_200 / "PNEUMONIA").iterdir())[0]

    # 1. the page: the model loaded from the command line, its card, the research-use banner
    driver.get(app_url + "/")
    _wait_for(driver, lambda d: _text(d, "qing-model-status").startswith("Loaded"), "the model did not load")
    assert _text(driver, "qing-model-status") == f"Loaded {RUN} (model folder {RUN}/checkpoints/best)."
    assert driver.title == "qing: chest X-ray classification"
    assert "not a medical device" in driver.find_element(By.CSS_SELECTOR, ".qing-banner").text
    card = _text(driver, "qing-card")
    assert "Not a medical device." in card and "PNEUMONIA when its probability is at least the threshold" in card
    assert "otherwise NORMAL" in card and "Preprocessing" in card and "Evaluation" in card

    # 2. a real chest X-ray: the probabilities shown are qing predict's
    _upload(driver, image)
    _wait_for(driver, lambda d: "predicted" in _text(d, "qing-status"), "no prediction")
    assert _text(driver, "qing-status") == f"1 image(s) predicted with {RUN}."
    expected = _predict_csv(run_dir, image, capsys)
    shown = _cards(driver)[image.name]
    probability, threshold, call = shown["rows"]["PNEUMONIA"]
    assert abs(float(probability) - float(expected["prob_PNEUMONIA"])) <= 1e-4
    stored = qing.create_model(f"local-dir:{run_dir / 'checkpoints/best'}", pretrained=True).qing_meta
    assert stored.thresholds is not None and stored.threshold_method == "youden"
    assert float(threshold) == pytest.approx(stored.thresholds[0], abs=1e-4)
    assert "ROC AUC (test)" in card and f"{stored.metrics['test_roc_auc']:.4f}" in card  # the run's test metrics
    decision = "PNEUMONIA" if expected["positive_PNEUMONIA"] == "1" else "NORMAL"
    assert call == decision and shown["decision"] == f"Decision: {decision}"
    # the Grad-CAM label box shows the model's first label
    pictures = [
        ("Model input (64 × 64, after preprocessing)", 64),
        ("Attention rollout", 64),
        ("Grad-CAM: PNEUMONIA", 64),
    ]
    assert shown["images"] == pictures
    # the CSV download has qing predict's columns and numbers
    link = _wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#qing-csv a[href]"), "no CSV download")
    with urllib.request.urlopen(link[0].get_attribute("href"), timeout=60) as answer:
        rows = list(csv.DictReader(io.StringIO(answer.read().decode())))
    assert list(rows[0]) == list(expected) and rows[0]["path"] == image.name
    assert abs(float(rows[0]["prob_PNEUMONIA"]) - float(expected["prob_PNEUMONIA"])) <= 1e-4
    screenshot = Path(os.environ.get("QING_APP_SCREENSHOT") or tmp_path / "app.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000

    # 3. bad files are shown in the page, next to the good ones
    corrupt = tmp_path / "corrupt.jpeg"
    corrupt.write_bytes(image.read_bytes()[: image.stat().st_size // 3])
    notes = tmp_path / "notes.png"
    notes.write_text("this is not an image")
    _upload(driver, corrupt, notes, image)
    _wait_for(driver, lambda d: "could not be read" in _text(d, "qing-status"), "no error status")
    assert (
        _text(driver, "qing-status")
        == f"1 image(s) predicted with {RUN}; 2 of 3 file(s) could not be read (see below)."
    )
    cards = _cards(driver)
    assert cards["corrupt.jpeg"]["error"].startswith("Could not read this file: OSError: image file is truncated")
    assert cards["notes.png"]["error"].startswith("Could not read this file: UnidentifiedImageError: cannot identify")
    assert cards[image.name]["rows"]["PNEUMONIA"][0] == probability

    # 4. a file over the size limit is refused with a message, and the server keeps serving
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(200 * 1024))
    _upload(driver, big)
    message = 'File(s) exceed the maximum allowed size of 150.0 Kb: "big.png"'  # Gradio's, from --max-file-size
    _wait_for(driver, lambda d: message in d.find_element(By.TAG_NAME, "body").text, "no size-limit message")
    _upload(driver, image)
    _wait_for(driver, lambda d: image.name in _cards(d) and _cards(d)[image.name]["rows"], "no prediction after")
    assert _cards(driver)[image.name]["rows"]["PNEUMONIA"][0] == probability

    # 5. another model, typed into the model box: loaded, its card shown, the image predicted again
    _choose_model(driver, str(two_labels))
    _wait_for(driver, lambda d: _text(d, "qing-model-status").startswith(f"Loaded {two_labels}"), "no model switch")
    _wait_for(driver, lambda d: str(two_labels) in _text(d, "qing-status"), "not predicted with the new model")
    rows = _cards(driver)[image.name]["rows"]
    assert list(rows) == ["Effusion", "Edema"] and [r[1] for r in rows.values()] == ["0.4000", "0.6000"]
    _choose_model(driver, "no/such/model")
    _wait_for(driver, lambda d: "Could not load" in _text(d, "qing-model-status"), "no load error")
    assert "model folder or checkpoint not found: no/such/model" in _text(driver, "qing-model-status")

    # 6. everything the page loaded came from the app itself (no CDN, fonts, analytics or share links)
    origin = app_url.split("//")[1]
    external = [u for u in _requested_urls(driver) if u.split("://")[0] in ("http", "https", "ws", "wss")]
    external = [u for u in external if u.split("://")[1].split("/")[0] != origin]
    assert external == []
