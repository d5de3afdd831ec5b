"""What the quantization scales alone cost (rule `calibration_accuracy`): COCO mAP of the float features vs each
quantized precision's Q/DQ features, each finished by the deployment head, in ONNX Runtime, before any TensorRT
kernel choice."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from trtflow.artifacts import software_versions, write_json
from trtflow.common.metrics import check_label_set, coco_map
from trtflow.formats.head_weights import load_head
from trtflow.run.detection_loop import detect_dataset
from trtflow.run.executors import onnxruntime_static_head_executor


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

    ONNX Runtime runs each graph as written (Q/DQ as simulated quantization, trtflow.common.onnxrun.session_options),
    so a delta is what the scales alone cost, before any TensorRT kernel choice.
    """
    manifest, tensors = load_head(weights_dir)
    check_label_set(json.loads(Path(val_json).read_text()), manifest["num_classes"], val_json)
    scores = {}
    graphs = {"fp32_mAP": features_onnx, **{f"{name}_sim_mAP": path for name, path in qdq_onnx.items()}}
    for key, onnx_path in graphs.items():
        executor = onnxruntime_static_head_executor(
            onnx_path, manifest, tensors, device="cpu", providers=["CPUExecutionProvider"]
        )
        results = detect_dataset(executor, val_json, preprocess, postprocess, batch_size=batch_size, desc=key)
        scores[key] = coco_map(val_json, results)["mAP"]
    report = {
        **scores,
        **{f"{name}_delta": scores["fp32_mAP"] - scores[f"{name}_sim_mAP"] for name in qdq_onnx},
        "executor": "onnxruntime",
        "head": "trtflow.common.head.StaticHead (fp32, CPU)",
        "software": software_versions(),
    }
    write_json(out_path, report)
    return report
