"""Plain DenseNet121 chest X-ray classifiers: CheXNet and torchxrayvision's DenseNet, in the zoo.

These are the classic baselines qing's hybrids are compared with. Both are timm's
``DenseNet`` (``densenet121`` layout), so they have timm's full model contract; qing only
registers them with CXR pretrained cfgs and converts the original checkpoints on load.
``forward`` returns logits (no sigmoid): ``torch.sigmoid(model(x))`` is CheXNet's output.

- ``qing_chexnet_densenet121``: CheXNet (Rajpurkar et al. 2017; the arnoweng/CheXNet
  reimplementation's ``model.pth.tar``), 3-channel ImageNet-normalized input, the 14
  ChestX-ray14 labels. ``pretrained=True`` downloads the file once from the repository into
  ``$QING_WEIGHTS_DIR/chexnet/model.pth.tar`` (default ``~/.cache/qing/weights``). The source states
  no licence.
- ``qing_xrv_densenet121``: torchxrayvision's DenseNet121 (Cohen et al. 2022), 1-channel input
  scaled to ``[-1024, 1024]`` (``mean=0.5, std=1/2048`` on ``[0, 1]``), 18 outputs whose names
  are empty where a weight set was not trained, and the weights' operating points as
  ``model.qing_meta.thresholds``. Tags ``all``, ``nih``, ``pc``, ``chex``, ``rsna``,
  ``mimic_nb``, ``mimic_ch``; the release files (pickled modules) are downloaded once into
  ``$QING_WEIGHTS_DIR/xrv/`` and read without running code from them. torchxrayvision's weights carry
  its licence (Apache-2.0).

Both are :class:`CXRDenseNet`: timm's ``DenseNet`` whose ``reset_classifier`` keeps the label names in
step and whose ``load_state_dict`` converts CheXNet and torchxrayvision checkpoints.

Example:
    >>> import qing
    >>> model = qing.create_model("qing_chexnet_densenet121")  # pretrained=True downloads model.pth.tar
    >>> model.num_classes, model.pretrained_cfg["label_names"][6]
    (14, 'Pneumonia')
"""

from __future__ import annotations

from typing import Any, Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.densenet import DenseNet

from qing.meta import sync_head
from qing.models._builder import build_model_with_weights, check_pretrained_cfg_keys, convert_foreign_state_dict
from qing.weights import CHEXNET_FILE, CXR14_LABELS, XRV_MEAN, XRV_STD, XRV_WEIGHTS, convert_for_densenet
from qing.weights.chexnet import CHEXNET_URL, CHEXNET_WEIGHTS_URL, NO_LICENSE
from qing.weights.densenet_layout import DENSENET121_BLOCKS
from qing.weights.xrv import thresholds_from_op_threshs

__all__ = ["XRV_TAG_THRESHOLDS", "CXRDenseNet"]


class CXRDenseNet(DenseNet):
    """timm's ``DenseNet``, keeping ``pretrained_cfg`` in step with its classifier and reading CXR checkpoints."""

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's ``reset_classifier``; then ``pretrained_cfg`` ``num_classes``/label names and thresholds follow."""
        if global_pool is None:
            super().reset_classifier(num_classes)
        else:
            super().reset_classifier(num_classes, global_pool)
        sync_head(self)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` that first converts CheXNet and torchxrayvision checkpoints."""
        converted = convert_foreign_state_dict(state_dict, self)
        return super().load_state_dict(state_dict if converted is None else converted, strict=strict, assign=assign)


_DENSENET121 = dict(growth_rate=32, block_config=DENSENET121_BLOCKS)

#: Operating points of each ``qing_xrv_densenet121`` tag, as probability thresholds.
XRV_TAG_THRESHOLDS = {tag: thresholds_from_op_threshs(w.op_threshs) for tag, w in XRV_WEIGHTS.items()}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "interpolation": "bilinear",
        "first_conv": "features.conv0",
        "classifier": "classifier",
        **kwargs,
    }


def _xrv_cfg(tag: str) -> dict[str, Any]:
    weights = XRV_WEIGHTS[tag]
    return _cfg(
        file=f"xrv/{weights.filename}",
        url=weights.url,
        input_size=(1, 224, 224),
        mean=XRV_MEAN,
        std=XRV_STD,
        crop_pct=1.0,
        crop_mode="center",
        num_classes=len(weights.labels),
        label_names=weights.labels,
        license="apache-2.0",
        origin_url=weights.url,
        paper_ids="arXiv:2111.00595",
        description=(
            f"torchxrayvision {weights.name}, trained on {weights.datasets}. Input: one channel scaled to "
            "[-1024, 1024] (mean 0.5, std 1/2048 on [0, 1]); outputs with an empty name were not trained. "
            "Thresholds: torchxrayvision's op_threshs. The weights carry torchxrayvision's licence (Apache-2.0)."
        ),
    )


default_cfgs = generate_default_cfgs({
    "qing_chexnet_densenet121.chexnet": _cfg(
        file=CHEXNET_FILE,
        url=CHEXNET_WEIGHTS_URL,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        crop_pct=0.875,
        crop_mode="center",
        num_classes=len(CXR14_LABELS),
        label_names=CXR14_LABELS,
        license=NO_LICENSE,
        origin_url=CHEXNET_URL,
        paper_ids="arXiv:1711.05225",
        description=(
            "CheXNet (DenseNet121 on ChestX-ray14, 14 labels), the arnoweng/CheXNet model.pth.tar: "
            "ImageNet normalization, Resize(256) then 224 crops as in its evaluation. Downloaded on first use "
            f"into $QING_WEIGHTS_DIR/{CHEXNET_FILE}. The source states no licence: check the terms with its authors "
            "before redistributing the weights or models fine-tuned from them."
        ),
    ),
    **{f"qing_xrv_densenet121.{tag}": _xrv_cfg(tag) for tag in XRV_WEIGHTS},
})  # fmt: skip


def _create_densenet(variant: str, pretrained: bool, **kwargs: Any) -> DenseNet:
    check_pretrained_cfg_keys(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    return build_model_with_weights(
        CXRDenseNet,
        variant,
        pretrained,
        convert=convert_for_densenet,
        feature_cfg=dict(flatten_sequential=True),
        tag_thresholds=XRV_TAG_THRESHOLDS if variant == "qing_xrv_densenet121" else None,
        task="multilabel",
        **kwargs,
    )


@register_model
def qing_chexnet_densenet121(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """CheXNet: DenseNet121 with 14 ChestX-ray14 outputs (logits), ImageNet-normalized RGB input."""
    return _create_densenet("qing_chexnet_densenet121", pretrained, **dict(_DENSENET121, **kwargs))


@register_model
def qing_xrv_densenet121(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """torchxrayvision DenseNet121: 1-channel input in [-1024, 1024], 18 outputs (logits), op_threshs as thresholds."""
    return _create_densenet("qing_xrv_densenet121", pretrained, **dict(_DENSENET121, **kwargs))
