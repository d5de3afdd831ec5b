"""What the quantization scales alone cost (rule `calibration_accuracy`): COCO mAP of the float features vs each
quantized precision's Q/DQ features, each finished by the deployment head, in ONNX Runtime, before any TensorRT
kernel choice. `SimulatedDetection` is that measurement on any features graph; the sensitivity stage
(`trtflow.run.sensitivity`) runs it on graphs with layers left in float."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import onnx

from trtflow.artifacts import software_versions, write_json
from trtflow.common.metrics import category_labels, check_label_set, coco_map
from trtflow.formats.head_weights import load_head
from trtflow.run.detection_loop import detect_images
from trtflow.run.executors import onnxruntime_static_head_executor

HEAD = "trtflow.common.head.StaticHead (fp32, CPU)"


class SimulatedDetection:
    """COCO mAP of a features graph on val images: ONNX Runtime runs the graph as written (Q/DQ as simulated
    quantization, trtflow.common.onnxrun.session_options) and the deployment head (fp32, CPU) finishes detection.

    `coco` is the val split (`val_json`'s content, or a subset of it: trtflow.run.subset.ValSubset.coco)."""

    def __init__(
        self,
        weights_dir: str | Path,
        val_json: str | Path,
        *,
        preprocess: dict,
        postprocess: dict,
        coco: Mapping | None = None,
        batch_size: int = 8,
    ):
        self.manifest, self.tensors = load_head(weights_dir)
        self.coco = dict(coco) if coco is not None else json.loads(Path(val_json).read_text())
        check_label_set(self.coco, self.manifest["num_classes"], val_json)
        self.category_of = {label: category for category, label in category_labels(self.coco).items()}
        self.preprocess, self.postprocess, self.batch_size = preprocess, postprocess, batch_size

    @property
    def num_images(self) -> int:
        return len(self.coco["images"])

    def mAP(self, graph: onnx.ModelProto | str | Path, desc: str = "simulated") -> float:
        executor = onnxruntime_static_head_executor(
            graph, self.manifest, self.tensors, device="cpu", providers=["CPUExecutionProvider"]
        )
        results = detect_images(
            executor.detect,
            self.coco["images"],
            self.category_of,
            self.preprocess,
            self.postprocess,
            batch_size=self.batch_size,
            desc=desc,
        )
        return coco_map(self.coco, results)["mAP"]


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
