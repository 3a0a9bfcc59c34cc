"""A saved qing folder in Hugging Face transformers: ``AutoModelForImageClassification`` and the
``image-classification`` pipeline (the real transformers package, ``TimmWrapper``), on real X-rays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import qing
from qing.data import build_transforms, load_image
from qing.meta import set_meta
from tests.model_helpers import randomize_batchnorm

transformers = pytest.importorskip("transformers", reason="transformers is part of the test extra")

CASES = {
    "binary": (["PNEUMONIA"], "binary"),
    "multilabel": (["Atelectasis", "Effusion", "Pneumothorax", "Hernia"], "multilabel"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_scores_are_the_sigmoid_of_qings_logits(name, tmp_path, pneumonia_200):
    labels, task = CASES[name]
    model = qing.create_model("qing_test_tr1", num_classes=len(labels)).eval()
    randomize_batchnorm(model)
    with torch.no_grad():
        model.get_classifier().bias.copy_(torch.linspace(-2, 2, len(labels)))  # scores far from 0.5 and apart
    set_meta(model, task=task)
    folder = qing.save_pretrained(
        model, tmp_path / "model", label_names=labels, data_config={"input_size": (3, 64, 64)}
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and "num_classes" not in config["model_args"]

    paths = sorted((pneumonia_200 / "PNEUMONIA").iterdir())[:2] + sorted((pneumonia_200 / "NORMAL").iterdir())[:1]
    model = qing.from_pretrained(folder).eval()  # as saved: 64 px preprocessing
    transform = build_transforms(model, train=False)
    with torch.no_grad():
        logits = model(torch.stack([transform(load_image(p)) for p in paths]))
    expected = torch.sigmoid(logits).numpy()

    hf_model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(hf_model).__name__ == "TimmWrapperForImageClassification"
    assert hf_model.config.id2label == dict(enumerate(labels))
    assert hf_model.config.problem_type == "multi_label_classification"
    with torch.no_grad():
        hf_logits = hf_model(pixel_values=torch.stack([transform(load_image(p)) for p in paths])).logits
    assert torch.allclose(hf_logits, logits, atol=1e-5)  # the same weights

    classify = transformers.pipeline("image-classification", model=str(folder))
    for path, probs in zip(paths, expected):
        with Image.open(path) as image:
            scores = {item["label"]: item["score"] for item in classify(image, top_k=None)}
        assert list(scores) == [labels[i] for i in np.argsort(-probs, kind="stable")]
        assert [scores[label] for label in labels] == pytest.approx(probs.tolist(), abs=1e-5)
    if len(labels) > 1:
        assert sum(scores.values()) != pytest.approx(1.0, abs=1e-3)  # a sigmoid per label, not a softmax


def test_multiclass_folders_ask_for_a_softmax(tmp_path):
    model = qing.create_model("qing_test_tr1", num_classes=3)
    set_meta(model, task="multiclass")
    folder = qing.save_pretrained(model, tmp_path / "model", label_names=["NORMAL", "BACTERIA", "VIRUS"])
    config = transformers.AutoConfig.from_pretrained(folder)  # no model build: works without qing's registry
    assert config.problem_type == "single_label_classification"
    assert config.id2label == {0: "NORMAL", 1: "BACTERIA", 2: "VIRUS"}
