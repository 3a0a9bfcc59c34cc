"""Deployment: ONNX export checked against PyTorch, and onnxruntime inference.

::

    import qing
    from qing.deploy import OnnxModel, export_onnx

    model = qing.create_model("local-dir:my-model", pretrained=True)
    export_onnx(model, "my-model.onnx", images=["chest.png"])   # parity-checked, metadata inside
    onnx_model = OnnxModel("my-model.onnx")                    # labels, thresholds, preprocessing
    logits = onnx_model(onnx_model.transform()(qing.load_image("chest.png"))[None])

``qing export``, ``qing predict model.onnx ...`` and ``qing eval --runtime onnx`` are the same on the
command line. The ONNX packages are an extra: ``pip install 'qing[onnx]'``. int8 quantization is not
offered: onnxruntime's dynamic int8 lowered the test AUROC of a pneumonia model by 0.0075 (the bar is 0.005)
and was no faster than fp32 on an AVX2 CPU (``benchmarks/README.md``).
"""

from qing.deploy.metadata import METADATA_KEYS, OnnxMetadata, describe_preprocessing
from qing.deploy.onnx_export import (
    DEFAULT_OPSET,
    EXPORTERS,
    OnnxExport,
    OnnxExportError,
    OnnxParityError,
    export_onnx,
)
from qing.deploy.runtime import OnnxModel

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "METADATA_KEYS",
    "OnnxExport",
    "OnnxExportError",
    "OnnxMetadata",
    "OnnxModel",
    "OnnxParityError",
    "describe_preprocessing",
    "export_onnx",
]
