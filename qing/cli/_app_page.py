"""The Gradio page of ``qing app``: a model box, a drop zone, result cards, the model card and a CSV download.

Imported only when ``qing app`` runs (Gradio is the optional ``qing[app]`` extra and takes seconds to import).
The page holds no logic of its own: predictions, pictures and texts come from :mod:`qing.cli._app_results`.
"""

from __future__ import annotations

import html
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from qing._io import write_text_atomic
from qing.cli._app_results import (
    ModelStore,
    analyze,
    model_summary,
    results_html,
    size_text,
    status_text,
)
from qing.evaluate import DISCLAIMER

__all__ = ["CSS", "TITLE", "build_page", "serve"]

_log = logging.getLogger("qing.cli")

TITLE = "qing: chest X-ray classification"

CSS = """
.qing-banner { border-left: 4px solid #c62828; background: rgba(198, 40, 40, 0.08); padding: 0.5em 0.9em;
  margin: 0.2em 0 0.6em; border-radius: 4px; }
.qing-error, .qing-status-error { color: #c62828; font-weight: 600; }
.qing-card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 0.6em 0.9em;
  margin-bottom: 0.9em; }
.qing-card h4 { margin: 0 0 0.3em; word-break: break-all; }
.qing-figures { display: flex; flex-wrap: wrap; gap: 0.6em; }
.qing-figures figure { margin: 0; }
.qing-figures img { width: 224px; height: 224px; object-fit: contain; image-rendering: auto; background: #000; }
.qing-figures figcaption { font-size: 0.8em; max-width: 224px; }
.qing-probs { border-collapse: collapse; margin-top: 0.5em; }
.qing-probs th, .qing-probs td { padding: 0.15em 0.6em; text-align: left; }
.qing-probs td.qing-prob, .qing-probs td.qing-threshold { font-variant-numeric: tabular-nums; text-align: right; }
.qing-bar { width: 120px; }
.qing-bar span { display: block; height: 0.7em; background: #5c6bc0; border-radius: 2px; }
.qing-positive td { font-weight: 600; }
.qing-note { font-style: italic; }
"""


def _theme() -> gr.themes.Base:
    """The default theme with system fonts: the page loads nothing from other hosts."""
    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(primary_hue="indigo", font=system, font_mono=["ui-monospace", "monospace"])


def _error_line(message: str) -> str:
    return f'<p class="qing-status-error">{message}</p>'


def build_page(
    store: ModelStore,
    *,
    models: Sequence[str],
    max_file_size: int,
    max_files: int,
    workdir: Path,
    batch_size: int = 8,
) -> gr.Blocks:
    """The page: choose a model, drop files, read per-image results, download the CSV.

    Args:
        store: Loads and keeps the models.
        models: MODEL arguments offered in the model box (the first is selected).
        max_file_size: Largest upload in bytes (also given to ``launch``).
        max_files: Most files read per upload.
        workdir: Where the CSV downloads are written (served by Gradio).
        batch_size: Images per forward pass.
    """
    locked = store.allowed is not None

    def load(spec: Optional[str]) -> tuple[str, str, Any]:
        if not spec:
            return "Choose a model above to start.", "", gr.update(choices=[], value=None)
        try:
            loaded = store.get(spec)
        except Exception as err:  # any failure to load is shown in the page; the server keeps serving
            _log.warning("qing app: could not load %s: %s", spec, err)
            message = _error_line(f"Could not load {html.escape(spec)}: {html.escape(_message(err))}")
            return message, "", gr.update(choices=[], value=None)
        labels = gr.update(choices=loaded.labels, value=loaded.labels[0])
        return f"Loaded **{spec}** ({loaded.source}).", model_summary(loaded), labels

    def predict(
        files: Optional[list[str]], spec: Optional[str], cam_label: Optional[str] = None
    ) -> tuple[str, str, Optional[str]]:
        if not files:
            return "Drop one or more chest X-rays (PNG, JPEG or DICOM) to see the model's predictions.", "", None
        if not spec:
            return _error_line("Choose a model first."), "", None
        try:
            loaded = store.get(spec)
            with store.lock:
                analysis = analyze(
                    loaded,
                    [Path(f) for f in files],
                    max_file_size=max_file_size,
                    max_files=max_files,
                    grad_cam_label=loaded.labels.index(cam_label) if cam_label in loaded.labels else None,
                    batch_size=batch_size,
                )
        except Exception as err:  # shown in the page; the next request is served as usual
            _log.warning("qing app: request failed: %s", err, exc_info=True)
            return _error_line(f"Could not predict: {html.escape(_message(err))}"), "", None
        csv_path = workdir / uuid.uuid4().hex / "qing-predictions.csv"
        csv_path.parent.mkdir(parents=True)
        write_text_atomic(csv_path, analysis.csv)
        status = html.escape(status_text(analysis))  # it names the MODEL as typed
        if analysis.n_failed:
            status = _error_line(status)
        return status, results_html(analysis), str(csv_path)

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown(f"# {TITLE}")
        gr.HTML(f'<div class="qing-banner">{html.escape(DISCLAIMER)}</div>', js_on_load=None)
        model_help = (
            "This page serves only these models."
            if locked
            else "A model or run folder, hf-hub:owner/name[@revision], a registered name with weights, "
            "or a checkpoint file: any MODEL that qing predict accepts. Type one and press Enter."
        )
        model_box = gr.Dropdown(
            choices=list(models),
            value=models[0] if models else None,
            allow_custom_value=not locked,
            label="Model",
            info=model_help,
            elem_id="qing-model",
        )
        model_status = gr.Markdown(elem_id="qing-model-status")
        cam_box = gr.Dropdown(
            choices=[],
            label="Grad-CAM for label",
            info="Where the last CNN stage's gradients say this label's evidence is (class-specific).",
            elem_id="qing-gradcam",
        )
        with gr.Row():
            with gr.Column(scale=2):
                uploads = gr.File(
                    file_count="multiple",
                    label=f"Chest X-rays: PNG, JPEG or DICOM (up to {max_files} files of {size_text(max_file_size)})",
                    elem_id="qing-files",
                )
                download = gr.File(
                    label="Predictions as CSV (the columns of qing predict)", interactive=False, elem_id="qing-csv"
                )
            with gr.Column(scale=5):
                status = gr.HTML(elem_id="qing-status", js_on_load=None)
                results = gr.HTML(elem_id="qing-results", js_on_load=None)
        with gr.Accordion("About this model", open=True):
            card = gr.Markdown(elem_id="qing-card")

        # One public endpoint, /predict (files, MODEL, Grad-CAM label -> status, cards, CSV); the rest is the page's.
        inputs, outputs = [uploads, model_box, cam_box], [status, results, download]
        uploads.change(predict, inputs=inputs, outputs=outputs, api_name="predict")
        model_outputs = [model_status, card, cam_box]
        page.load(load, inputs=model_box, outputs=model_outputs, api_name="show_model", api_visibility="private")
        model_box.change(
            load, inputs=model_box, outputs=model_outputs, api_name="switch_model", api_visibility="private"
        ).then(predict, inputs=inputs, outputs=outputs, api_name="predict_again", api_visibility="private")
        cam_box.input(predict, inputs=inputs, outputs=outputs, api_name="predict_grad_cam", api_visibility="private")
    return page


def _message(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text or type(err).__name__


def serve(
    store: ModelStore,
    *,
    models: Sequence[str],
    host: str,
    port: Optional[int],
    max_file_size: int,
    max_files: int,
    workdir: Path,
    batch_size: int = 8,
) -> None:
    """Build the page and serve it until interrupted (Ctrl+C)."""
    page = build_page(
        store, models=models, max_file_size=max_file_size, max_files=max_files, workdir=workdir, batch_size=batch_size
    )
    page.queue(default_concurrency_limit=1)
    options: dict[str, Any] = dict(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        max_file_size=max_file_size,
        footer_links=["settings"],
        run_history=False,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        allowed_paths=[str(workdir)],
        theme=_theme(),
        css=CSS,
        quiet=True,
        prevent_thread_lock=True,
    )
    page.launch(**options)
    print(f"qing app: serving on {page.local_url} (Ctrl+C to stop)", flush=True)
    try:
        page.block_thread()
    finally:
        page.close()
