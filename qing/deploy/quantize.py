"""int8 dynamic quantization of an exported model with onnxruntime's quantization tools.

Weights are stored as int8 and activations quantized per batch at run time
(``onnxruntime.quantization.quantize_dynamic``); no calibration data is needed. The file keeps the
fp32 file's qing metadata, plus ``quantization``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Union

from qing._io import atomic_path
from qing.deploy._deps import require

__all__ = ["quantize_int8"]


def quantize_int8(
    source: Union[str, os.PathLike],
    target: Union[str, os.PathLike],
    *,
    per_channel: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write an int8 dynamically quantized copy of an ONNX file written by :func:`~qing.deploy.export_onnx`.

    The graph is first optimized and shape-inferred (``quant_pre_process``, ONNX shape inference), then quantized with
    ``quantize_dynamic`` (int8 weights; ``MatMul``, ``Gemm`` and ``Conv``).

    Args:
        source: The fp32 ``.onnx`` file.
        target: The int8 ``.onnx`` file to write (atomically).
        per_channel: One scale per output channel of each weight instead of one per tensor.
        overwrite: Replace an existing ``target``.

    Returns:
        ``target`` as a ``Path``.

    Raises:
        FileExistsError: ``target`` exists and ``overwrite`` is false.
    """
    onnx = require("onnx", "int8 quantization")
    quantization = require("onnxruntime.quantization", "int8 quantization")
    shape_inference = require("onnxruntime.quantization.shape_inference", "int8 quantization")
    source, target = Path(source), Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) or choose another name")
    if source.resolve() == target.resolve():
        raise ValueError(f"the int8 file must not replace its source {source}")
    props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    with tempfile.TemporaryDirectory(prefix="qing-int8-") as work, atomic_path(target) as tmp:
        prepared = Path(work) / "prepared.onnx"
        # symbolic shape inference cannot follow a dynamic height and width through the token count: skip it
        shape_inference.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_dynamic(
            str(prepared), str(tmp), weight_type=quantization.QuantType.QInt8, per_channel=per_channel
        )
        proto = onnx.load(str(tmp))
        props["quantization"] = json.dumps(f"int8 dynamic (onnxruntime quantize_dynamic, per_channel={per_channel})")
        onnx.helper.set_model_props(proto, props)
        onnx.save(proto, str(tmp))
    return target
