"""Model cards (``README.md``) for saved and pushed qing models.

The card is generated from what a loader will see: the ``config.json`` written by timm's
``save_for_hf`` (architecture, labels, preprocessing) and qing's metadata under its ``"qing"``
key (task, calibration temperatures, decision thresholds, evaluation metrics with their intervals,
datasets). The YAML header is built with ``huggingface_hub.ModelCardData``, so the Hub indexes library,
license, tags, datasets and metrics. The text is deterministic (no dates), so the same model and fields
always give the same card.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from huggingface_hub import EvalResult, ModelCardData

from qing._format import format_value

__all__ = ["BASE_TAGS", "generate_model_card", "model_card_summary"]

BASE_TAGS = ("timm", "image-classification", "chest-x-ray", "medical-imaging", "qing")
"""Hub tags on every card; ``tags=`` adds to them."""

_QING_URL = "https://github.com/qing-cxr/qing"
# A Hub licence id ("apache-2.0", "cc-by-nc-4.0", "other", "unknown"); anything else is a sentence for the text.
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")

# Metric keys that are not summary numbers (structures, or descriptions of how the metrics were computed).
_NOT_SUMMARY = {
    "confusion_matrix",
    "confusion_matrix_labels",
    "classification_report",
    "roc_auc_bootstrap",
    "label_names",
    "thresholds",
    "threshold_method",
    "task",
    "notes",
    "per_label",
    "calibration",
    "calibration_bins",
    "confidence",
}
_PRETTY = {
    "roc_auc": "ROC AUC",
    "auroc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
    "accuracy": "Accuracy",
    "subset_accuracy": "Subset accuracy",
    "precision": "Precision",
    "recall": "Recall",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
    "ece": "ECE (15 bins)",
    "ece_equal_mass": "ECE, equal-mass bins",
    "ece_uncalibrated": "ECE before temperature scaling",
    "brier": "Brier score",
    "temperature": "Temperature",
    "n_samples": "Samples",
    "n_test": "Test images",
    "n_positive": "Positives",
    "n_negative": "Negatives",
    "threshold": "Threshold",
}
_PER_LABEL_COLUMNS = (
    "n_positive",
    "n_negative",
    "threshold",
    "temperature",
    "roc_auc",
    "pr_auc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "precision",
    "f1",
    "ece",
    "brier",
)


def generate_model_card(
    config: Mapping[str, Any],
    *,
    model_id: str,
    num_params: Optional[int] = None,
    title: Optional[str] = None,
    description: Optional[str] = None,
    license: Optional[str] = None,
    datasets: Optional[Sequence[str]] = None,
    tags: Optional[Sequence[str]] = None,
    base_model: Optional[str] = None,
    limitations: Optional[Sequence[str]] = None,
    citation: Optional[str] = None,
) -> str:
    """Write the model card text for a saved model.

    Args:
        config: The model's ``config.json`` content (timm layout plus qing's ``"qing"`` metadata).
        model_id: What users pass to ``qing.create_model``, e.g. ``"hf-hub:user/repo"`` or ``"local-dir:path"``.
        num_params: Parameter count shown under model details.
        title: Card heading; default: the repo or folder name.
        description: A paragraph about the weights (training data, recipe); a generic one by default.
        license: License id of the weights (Hub ids such as ``"apache-2.0"``, ``"cc-by-nc-4.0"``, ``"other"``);
            default: the pretrained cfg's ``license``, else ``"other"``. Match your training data's terms.
            A statement that is not a Hub id (``"no licence stated by the source"``, CheXNet's) is shown in
            the text, and the header says ``unknown``.
        datasets: Training datasets, added to the metadata's ``datasets``.
        tags: Extra Hub tags, added to [BASE_TAGS][qing.model_card.BASE_TAGS] and the task.
        base_model: Hub id of the weights these were fine-tuned from, if any.
        limitations: Extra bullet points for "Intended use and limitations".
        citation: BibTeX shown under "Citation".

    Returns:
        ``README.md`` text: YAML header, then usage, labels and thresholds, preprocessing,
        evaluation, intended use and limitations, model details.
    """
    qing, pretrained_cfg, num_classes, label_names, task = _facts(config)
    architecture = config["architecture"]
    metrics = dict(qing.get("metrics") or {})
    all_datasets = list(dict.fromkeys([*(qing.get("datasets") or []), *(datasets or [])]))
    name = title or model_id.split(":", 1)[-1].rstrip("/").split("/")[-1].split("@")[0]
    license_text = license or pretrained_cfg.get("license") or "other"
    license = license_text if _LICENSE_ID.match(license_text) else "unknown"

    summary = _summary_metrics(metrics)
    headline = [(k, v) for k, v in summary if isinstance(v, float) and not math.isnan(v) and "/" not in k]
    eval_results = None
    if headline and all_datasets:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                task_name="Chest X-ray classification",
                dataset_type=all_datasets[0],
                dataset_name=all_datasets[0],
                dataset_split="test" if key.startswith("test_") else None,  # the Trainer's test-split metrics
                metric_type=key,
                metric_value=value,
                metric_name=_PRETTY.get(key.removeprefix("test_"), key),
            )
            for key, value in headline
        ]
    card_data = ModelCardData(
        library_name="timm",
        license=license,
        tags=[*BASE_TAGS, *([task] if task else []), *(tags or [])],
        datasets=all_datasets or None,
        metrics=[k for k, _ in headline] or None,
        pipeline_tag="image-classification",
        base_model=base_model,
        model_name=name if eval_results else None,
        eval_results=eval_results,
    )

    parts = [f"---\n{card_data.to_yaml()}\n---\n", f"# {name}\n"]
    parts.append((description or _default_description(architecture, task, num_classes, label_names)).strip() + "\n")
    parts.append(_NOT_A_MEDICAL_DEVICE)
    calibrated = bool(qing.get("temperatures")) and task != "multiclass"
    parts.append(_usage(model_id, task, pretrained_cfg, bool(label_names), calibrated))
    parts.append(_labels_section(label_names, num_classes, task, qing))
    parts.append(_preprocessing(pretrained_cfg))
    parts.append(_evaluation(summary, metrics, all_datasets))
    parts.append(_limitations(task, qing, limitations))
    parts.append(_details(config, architecture, num_params, all_datasets, base_model, license_text))
    if citation:
        parts.append(f"## Citation\n\n```bibtex\n{citation.strip()}\n```\n")
    return "\n".join(parts)


def model_card_summary(config: Mapping[str, Any]) -> str:
    """The parts of the model card that a person running the model needs, as Markdown.

    What ``qing app`` shows beside its predictions: the "not a medical device" note, labels and decision
    thresholds, preprocessing, the recorded evaluation, intended use and limitations; the same text as
    [generate_model_card][qing.model_card.generate_model_card], without the YAML header, usage code and
    model details.

    Args:
        config: The model's ``config.json`` content (timm layout plus qing's ``"qing"`` metadata).

    Returns:
        Markdown with one ``##`` section per topic, after the note.
    """
    qing, pretrained_cfg, num_classes, label_names, task = _facts(config)
    metrics = dict(qing.get("metrics") or {})
    datasets = list(qing.get("datasets") or [])
    return "\n".join(
        [
            _NOT_A_MEDICAL_DEVICE,
            _labels_section(label_names, num_classes, task, qing),
            _preprocessing(pretrained_cfg),
            _evaluation(_summary_metrics(metrics), metrics, datasets),
            _limitations(task, qing, None),
        ]
    )


_NOT_A_MEDICAL_DEVICE = (
    "> **Not a medical device.** These weights are for research and education. They are not cleared or "
    "approved by any regulator and must not be used to diagnose, treat or triage patients.\n"
)


def _facts(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int, list[str], Optional[str]]:
    """``(qing metadata, pretrained cfg, num_classes, label names, task)`` of a ``config.json``."""
    qing = dict(config.get("qing") or {})
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    num_classes = int(config.get("num_classes", pretrained_cfg.get("num_classes", 0)))
    label_names = list(config.get("label_names") or pretrained_cfg.get("label_names") or [])
    task = qing.get("task") or ("binary" if num_classes == 1 else None)
    return qing, pretrained_cfg, num_classes, label_names, task


def _default_description(architecture: str, task: Optional[str], num_classes: int, label_names: list[str]) -> str:
    kind = {
        "binary": f"binary classifier ({label_names[0] if label_names else 'positive class'} vs. not)",
        "multilabel": f"multi-label classifier ({num_classes} findings, one sigmoid each)",
        "multiclass": f"multi-class classifier ({num_classes} classes, softmax)",
    }.get(task or "", f"classifier with {num_classes} outputs")
    return (
        f"A chest X-ray {kind}: the `{architecture}` architecture from [qing]({_QING_URL}), "
        "a timm model zoo for chest X-ray classification."
    )


def _usage(
    model_id: str, task: Optional[str], pretrained_cfg: Mapping[str, Any], has_labels: bool, calibrated: bool = False
) -> str:
    mode = "L" if int((pretrained_cfg.get("input_size") or (3,))[0]) == 1 else "RGB"
    names = 'model.pretrained_cfg["label_names"]' if has_labels else "[str(i) for i in range(model.num_classes)]"
    if task == "multiclass":
        decide = f"probs = logits.softmax(dim=-1)[0]\nprint({names}[int(probs.argmax())], probs.max().item())"
    elif calibrated:
        decide = (
            "probs = model_probabilities(model, logits)[0]  # sigmoid(logits / T): the calibrated probabilities\n"
            "for name, p, t in zip("
            f"{names}, probs, model.qing_meta.thresholds or [0.5] * model.num_classes):\n"
            "    print(f\"{name}: {p:.3f} ({'positive' if p >= t else 'negative'} at threshold {t:.3f})\")"
        )
    else:
        comment = "  # one sigmoid per output" + ("" if task else " (use softmax if the labels are exclusive)")
        decide = (
            f"probs = logits.sigmoid()[0]{comment}\n"
            "thresholds = model.qing_meta.thresholds or [0.5] * model.num_classes\n"
            f"for name, p, t in zip({names}, probs.tolist(), thresholds):\n"
            "    print(f\"{name}: {p:.3f} ({'positive' if p >= t else 'negative'} at threshold {t:.3f})\")"
        )
    return (
        "## Usage\n\n"
        "```python\n"
        "import qing\n"
        "import torch\n"
        "from PIL import Image\n"
        "from timm.data import create_transform, resolve_data_config\n"
        + ("from qing.evaluate import model_probabilities\n" if calibrated else "")
        + "\n"
        f'model = qing.create_model("{model_id}", pretrained=True).eval()\n'
        "transform = create_transform(**resolve_data_config({}, model=model))  # resize + normalize, see below\n\n"
        f'image = Image.open("chest_xray.png").convert("{mode}")\n'
        "with torch.no_grad():\n"
        "    logits = model(transform(image).unsqueeze(0))\n"
        f"{decide}\n"
        "```\n\n"
        "Plain timm works too, once `import qing` has registered the architecture: "
        f'`timm.create_model("{model_id}", pretrained=True)` gives the same weights and logits '
        "(the thresholds and metrics in `model.qing_meta` are restored by `qing.create_model`).\n"
    )


def _labels_section(label_names: list[str], num_classes: int, task: Optional[str], qing: Mapping[str, Any]) -> str:
    thresholds = qing.get("thresholds")
    temperatures = qing.get("temperatures")
    lines = ["## Labels and decision thresholds\n"]
    if temperatures:
        lines.append(
            "The probabilities are calibrated by temperature scaling fitted on validation data: each output's "
            "logit is divided by its temperature T before the sigmoid (softmax for multi-class), which "
            "`qing.evaluate.model_probabilities`, `qing predict` and `qing eval` do (`--no-calibration` or "
            "`qing.from_pretrained(..., calibration=False)` turn it off and keep every decision).\n"
        )
    if task == "multiclass":
        lines.append("Multi-class: the prediction is the class with the highest softmax probability.\n")
    elif thresholds:
        method = qing.get("threshold_method") or "not recorded"
        scale = "calibrated probability (`sigmoid(logit / T)`)" if temperatures else "sigmoid probability"
        lines.append(
            f"An output counts as positive when its {scale} is at least its threshold. The "
            f"thresholds were chosen on validation data (method: {method}); re-check them on your own data.\n"
        )
    else:
        lines.append(
            "No tuned thresholds were saved: 0.5 on each sigmoid probability is a default, not a tuned value.\n"
        )
    if not label_names:
        lines.append(f"Label names were not recorded for the {num_classes} output(s).\n")
        return "\n".join(lines)
    rows = ["| Output | Label | Threshold |" + (" Temperature |" if temperatures else ""), "|---:|---|---:|"]
    rows[1] += "---:|" if temperatures else ""
    for i, label in enumerate(label_names):
        if task == "multiclass":
            t = "argmax"
        elif thresholds:
            t = _fmt4(thresholds[i])
        else:
            t = "0.5 (default)"
        rows.append(f"| {i} | {label} | {t} |" + (f" {_fmt4(temperatures[i])} |" if temperatures else ""))
    lines.append("\n".join(rows) + "\n")
    return "\n".join(lines)


def _preprocessing(cfg: Mapping[str, Any]) -> str:
    chans, height, width = tuple(cfg.get("input_size") or (3, 224, 224))
    mean, std = list(cfg.get("mean") or []), list(cfg.get("std") or [])
    crop_pct, crop_mode = cfg.get("crop_pct", 1.0), cfg.get("crop_mode", "center")
    if crop_mode == "squash" or (crop_pct == 1.0 and crop_mode != "border"):
        resize = f"resized to {height} x {width} pixels"
        resize += " (aspect ratio not kept)" if crop_mode == "squash" else ""
    else:
        resize = f"resized then {crop_mode}-cropped to {height} x {width} pixels (crop fraction {crop_pct})"
    channel_text = (
        "one grayscale channel"
        if chans == 1
        else f"{chans} channels (a grayscale X-ray is repeated into each channel, e.g. `Image.convert('RGB')`)"
    )
    return (
        "## Preprocessing\n\n"
        "Predictions are only as good as the match to the training preprocessing; chest X-ray models are "
        "especially sensitive to normalization.\n\n"
        f"- Input: {channel_text}, {resize}, "
        f"{cfg.get('interpolation', 'bilinear')} interpolation.\n"
        "- Pixel values scaled to [0, 1], then normalized per channel as `(x - mean) / std` with\n"
        f"  `mean = {_fmt_seq(mean)}` and `std = {_fmt_seq(std)}`.\n"
        "- `timm.data.resolve_data_config({}, model=model)` returns exactly these settings from `config.json`; "
        "do not substitute ImageNet defaults.\n"
    )


def _evaluation(summary: list[tuple[str, Any]], metrics: Mapping[str, Any], datasets: list[str]) -> str:
    if not summary and not metrics.get("per_label"):
        return "## Evaluation\n\nNo evaluation metrics were saved with these weights.\n"
    lines = ["## Evaluation\n"]
    where = f" on {', '.join(datasets)}" if datasets else ""
    lines.append(f"Metrics recorded with the weights{where} (`model.qing_meta.metrics`):\n")
    confidence = metrics.get("confidence") or (metrics.get("roc_auc_bootstrap") or {}).get("confidence")
    ci_name = f"{round(confidence * 100)}% CI" if isinstance(confidence, (int, float)) else "CI"
    if summary:
        rows = ["| Metric | Value |", "|---|---:|"]
        for key, value in summary:
            text = _fmt4(value)
            ci = _lookup(metrics, key + "_ci")
            if _is_interval(ci):
                text += f" ({ci_name} {_fmt4(ci[0])} to {_fmt4(ci[1])})"
            rows.append(f"| {_pretty_key(key)} | {text} |")
        lines.append("\n".join(rows) + "\n")
    per_label = metrics.get("per_label")
    if isinstance(per_label, list) and per_label and all(isinstance(r, Mapping) and "label" in r for r in per_label):
        columns = [c for c in _PER_LABEL_COLUMNS if any(c in row for row in per_label)]
        rows = [
            "| Label | " + " | ".join(_PRETTY.get(c, c) for c in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for row in per_label:
            cells = []
            for c in columns:
                text = _fmt4(row.get(c))
                if _is_interval(row.get(f"{c}_ci")):
                    text += f" ({_fmt4(row[c + '_ci'][0])} to {_fmt4(row[c + '_ci'][1])})"
                cells.append(text)
            rows.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append(f"Per label (with {ci_name} where there is one):\n\n" + "\n".join(rows) + "\n")
    notes = metrics.get("notes")
    if isinstance(notes, list) and notes:
        lines.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(lines)


def _limitations(task: Optional[str], qing: Mapping[str, Any], extra: Optional[Sequence[str]]) -> str:
    bullets = [
        "Intended use: research, teaching and benchmarking of chest X-ray classifiers.",
        "**Not a medical device**: not validated for clinical use, not cleared or approved by the FDA, "
        "CE marking or any other regulator; do not use it for diagnosis, treatment or triage.",
        "Performance measured on one dataset does not transfer to other hospitals, scanners, patient "
        "populations (e.g. adults vs. children), projections (PA vs. AP, portable films) or image processing; "
        "validate locally before drawing conclusions.",
        "Labels of public chest X-ray datasets are often mined from reports and are noisy; the model learns "
        "their biases, including shortcuts such as text markers, devices or hospital-specific artifacts.",
    ]
    if task != "multiclass":
        bullets.append(
            "Decision thresholds trade sensitivity against specificity for the validation data they were chosen "
            "on; choose your own operating point for your population."
        )
    bullets.extend(extra or [])
    return "## Intended use and limitations\n\n" + "\n".join(f"- {b}" for b in bullets) + "\n"


def _details(
    config: Mapping[str, Any],
    architecture: str,
    num_params: Optional[int],
    datasets: list[str],
    base_model: Optional[str],
    license_text: str,
) -> str:
    lines = [f"- Architecture: `{architecture}` (timm, registered by `import qing`)"]
    if config.get("model_args"):
        args = ", ".join(f"{k}={v!r}" for k, v in config["model_args"].items())
        lines.append(f"- Model arguments: `{args}`")
    if num_params is not None:
        lines.append(f"- Parameters: {num_params:,}")
    lines.append(f"- Outputs: {config.get('num_classes')} logit(s)")
    if datasets:
        lines.append(f"- Training data: {', '.join(datasets)}")
    if base_model:
        lines.append(f"- Fine-tuned from: {base_model}")
    lines.append(f"- Licence of the weights: {license_text}")
    lines.append(
        "- Files: `model.safetensors` (weights), `config.json` (timm config: architecture, labels, "
        'preprocessing; qing metadata under `"qing"`)'
    )
    lines.append(f"- Library: [qing]({_QING_URL}) on [timm](https://github.com/huggingface/pytorch-image-models)")
    return "## Model details\n\n" + "\n".join(lines) + "\n"


def _summary_metrics(metrics: Mapping[str, Any], prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """``(key, number)`` pairs of the scalar metrics; nested dicts give ``outer/inner`` keys."""
    out: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        if key in _NOT_SUMMARY or key.endswith("_ci"):
            continue
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out.append((prefix + key, float(value) if isinstance(value, float) else value))
        elif isinstance(value, Mapping) and depth < 2:
            out.extend(_summary_metrics(value, f"{prefix}{key}/", depth + 1))
    return out


def _lookup(metrics: Mapping[str, Any], key: str) -> Any:
    node: Any = metrics
    for part in key.split("/"):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _is_interval(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)


def _pretty_key(key: str) -> str:
    """``roc_auc -> ROC AUC``, ``test_roc_auc -> ROC AUC (test)``, ``a/b -> A / B``."""

    def pretty(part: str) -> str:
        if part.startswith("test_") and part[5:] in _PRETTY:
            return f"{_PRETTY[part[5:]]} (test)"
        return _PRETTY.get(part, part)

    return " / ".join(pretty(part) for part in key.split("/"))


def _fmt4(value: Any) -> str:
    return format_value(value, digits=4)


def _fmt_seq(values: Sequence[Any]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"
