"""What the quantization scales alone cost (rule `calibration_accuracy`): COCO mAP of the float features vs each
quantized precision's Q/DQ features, each finished by the deployment head, in ONNX Runtime, before any TensorRT
kernel choice (`trtflow.run.simulated`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from trtflow.artifacts import software_versions, write_json
from trtflow.run.simulated import HEAD, SimulatedDetection


def simulated_accuracy(
    features_onnx: str | Path,
    qdq_onnx: Mapping[str, str | Path],
    weights_dir: str | Path,
    val_json: str | Path,
    out_path: str | Path,
    *,
    preprocess: dict,
    postprocess: dict,
    batch_size: int = 8,
) -> dict:
    """COCO mAP of the float features (`fp32_mAP`) vs the Q/DQ features of each quantized precision in `qdq_onnx`
    (precision -> graph: `<precision>_sim_mAP`, `<precision>_delta`), all finished by the same deployment head.

    A delta is what the scales alone cost, before any TensorRT kernel choice.
    """
    detection = SimulatedDetection(
        weights_dir, val_json, preprocess=preprocess, postprocess=postprocess, batch_size=batch_size
    )
    graphs = {"fp32_mAP": features_onnx, **{f"{name}_sim_mAP": path for name, path in qdq_onnx.items()}}
    scores = {key: detection.mAP(onnx_path, desc=key) for key, onnx_path in graphs.items()}
    report = {
        **scores,
        **{f"{name}_delta": scores["fp32_mAP"] - scores[f"{name}_sim_mAP"] for name in qdq_onnx},
        "executor": "onnxruntime",
        "head": HEAD,
        "software": software_versions(),
    }
    write_json(out_path, report)
    return report
