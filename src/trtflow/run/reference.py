"""PyTorch reference detections (rule `reference`): the detector on the preprocessed val images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from trtflow.artifacts import software_versions, write_json
from trtflow.common.metrics import check_label_set, coco_map
from trtflow.common.model import run_detector
from trtflow.run.detection_loop import detect_dataset


def torch_detector(model):
    """`detect` callable for `detect_dataset` running a torchvision detector on the CPU or its device."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def detect(batch: np.ndarray):
        outputs = run_detector(model, torch.from_numpy(batch).to(device))
        return [(o["boxes"].cpu().numpy(), o["scores"].cpu().numpy(), o["labels"].cpu().numpy()) for o in outputs]

    return detect


def run_reference(
    model, coco_json, preprocess_cfg: dict, postprocess_cfg: dict, detections_out, metrics_out, *, batch_size: int = 8
) -> dict:
    """Reference detections and COCO metrics of the PyTorch detector on the val split."""
    check_label_set(
        json.loads(Path(coco_json).read_text()), model.roi_heads.box_predictor.cls_score.out_features, coco_json
    )
    results = detect_dataset(
        torch_detector(model), coco_json, preprocess_cfg, postprocess_cfg, batch_size=batch_size, desc="reference"
    )
    metrics = {
        **coco_map(coco_json, results),
        "executor": "pytorch",
        "device": str(next(model.parameters()).device),
        "software": software_versions(),
    }
    write_json(detections_out, results)
    write_json(metrics_out, metrics)
    return metrics
