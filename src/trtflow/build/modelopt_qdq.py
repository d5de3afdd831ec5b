"""Q/DQ placement and calibration by NVIDIA ModelOpt (`calibration.qdq_placement: modelopt`), an optional extra.

`modelopt.onnx.quantization.quantize` (int8) places and calibrates the Q/DQ nodes; the calibrate stage
then reads its activation scales back so that int8calib.table and ranges.json describe the graph it wrote.
ModelOpt runs on the CPU here (`calibration_eps=["cpu"]`) and keeps every unquantized op float32
(`high_precision_dtype="fp32"`, as `trtflow.common.qdq` does; ModelOpt's own default, fp16, is a different
trade). Comparison with `trtflow.common.qdq`: docs/BENCHMARKS.md, "ModelOpt vs trtflow Q/DQ placement".

Install: `pip install -e ".[modelopt]"`. That extra names ModelOpt's int8 ONNX dependencies one by one
instead of `nvidia-modelopt[onnx]`, which would downgrade onnx and put onnxruntime-gpu over onnxruntime.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from trtflow.common.qdq import INT8_MAX, KeepFloat, save_onnx

INSTALL = 'pip install -e ".[modelopt]"'
# calibration.algorithm -> ModelOpt's calibration_method (it offers no percentile method)
METHODS = {"entropy": "entropy", "minmax": "max"}


def missing_modelopt(why: str) -> str:
    """The message for a missing or broken ModelOpt install; `why` says what is wrong."""
    return (
        f"calibration.qdq_placement: modelopt needs NVIDIA ModelOpt, which {why}; run {INSTALL}, or set "
        "calibration.qdq_placement: trtflow"
    )


def modelopt_method(algorithm: str) -> str:
    if algorithm not in METHODS:
        raise ValueError(
            f"calibration.algorithm: {algorithm} is not offered by ModelOpt (calibration.qdq_placement: "
            f"modelopt); set calibration.algorithm to {' or '.join(METHODS)}, or "
            "calibration.qdq_placement: trtflow"
        )
    return METHODS[algorithm]


def activation_amax(model: onnx.ModelProto, source: onnx.ModelProto, source_path: str | Path) -> dict[str, float]:
    """amax (scale x 127) of each activation a QuantizeLinear of `model` quantizes, by its name in `source`.

    Weight QuantizeLinears (their input is an initializer) are skipped. Where ModelOpt quantizes a graph
    output, it renames the tensor to `<name>_QuantizeLinear_Input` and gives the name to the DequantizeLinear
    output; the table takes the source name, so that it also fits the unquantized graph (int8_mode: implicit).
    An activation must be quantized per tensor and symmetrically (zero point 0), as a TensorRT table holds it.
    """
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    source_names = {name for node in source.graph.node for name in node.output} | {i.name for i in source.graph.input}
    dequantized = {node.input[0]: node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    amax = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers:
            continue
        scale = initializers.get(node.input[1])
        zero_point = initializers.get(node.input[2]) if len(node.input) > 2 else np.zeros(1)
        if scale is None or scale.size != 1 or zero_point is None or np.any(zero_point != 0):
            raise ValueError(
                f"{source_path}: ModelOpt's QuantizeLinear {node.name} of {node.input[0]} is not "
                "per-tensor symmetric with constant scales, so no calibration table can describe it; "
                "use calibration.qdq_placement: trtflow"
            )
        name = node.input[0]
        if name not in source_names and dequantized.get(node.output[0]) in source_names:
            name = dequantized[node.output[0]]
        amax[name] = float(np.float32(scale.item()) * np.float32(INT8_MAX))
    return amax


def quantize_features(
    features_onnx: str | Path,
    images: np.ndarray,
    qdq_path: str | Path,
    *,
    algorithm: str,
    keep_float: KeepFloat = KeepFloat(),
) -> dict[str, float]:
    """ModelOpt int8 Q/DQ ONNX of `features_onnx` from preprocessed float32 (N, 3, H, W) `images`.

    Writes `qdq_path` (atomically) and returns the activation amax it holds (`activation_amax`).
    """
    method = modelopt_method(algorithm)
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as error:
        raise ImportError(missing_modelopt(f"does not import ({error})")) from error
    model = onnx.load(str(features_onnx))
    # ModelOpt matches nodes_to_exclude as regular expressions: our globs go in as the exact names they match
    excluded = [re.escape(node.name) + "$" for node in model.graph.node if keep_float.matches(node)]
    qdq_path = Path(qdq_path)
    with tempfile.TemporaryDirectory(prefix="trtflow-modelopt-") as staging:
        written = Path(staging) / qdq_path.name
        quantize(
            onnx_path=str(features_onnx),
            quantize_mode="int8",
            calibration_data=images,
            calibration_method=method,
            calibration_eps=["cpu"],
            high_precision_dtype="fp32",
            nodes_to_exclude=excluded,
            output_path=str(written),
            log_level="WARNING",
        )
        quantized = onnx.load(str(written))
    # ModelOpt drops metadata_props; the engine stage matches features and head by trtflow.checkpoint_sha256
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)
    amax = activation_amax(quantized, model, features_onnx)
    if not amax:
        raise ValueError(f"ModelOpt quantized no activation of {features_onnx}: check calibration.keep_float")
    save_onnx(quantized, qdq_path)
    return amax
