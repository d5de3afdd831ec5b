"""Simulated quantization's detection accuracy: a features graph (float, or Q/DQ as written) in ONNX Runtime,
finished by the deployment head, scored by COCO mAP. What rule calibration_accuracy and the sensitivity stage
(`trtflow.run.sensitivity`) share; neither imports the other."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import onnx

from trtflow.common.metrics import check_label_set, coco_map
from trtflow.formats.head_weights import load_head
from trtflow.run.detection_loop import detect_dataset
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
        self.preprocess, self.postprocess, self.batch_size = preprocess, postprocess, batch_size

    def mAP(self, graph: onnx.ModelProto | str | Path, desc: str = "simulated") -> float:
        executor = onnxruntime_static_head_executor(
            graph, self.manifest, self.tensors, device="cpu", providers=["CPUExecutionProvider"]
        )
        results = detect_dataset(
            executor.detect, self.coco, self.preprocess, self.postprocess, batch_size=self.batch_size, desc=desc
        )
        return coco_map(self.coco, results)["mAP"]
