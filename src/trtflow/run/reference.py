"""PyTorch reference detections (rule `reference`): the detector on the preprocessed val images verification runs
on (`trtflow.run.subset`: all, or config `verify.num_images` of them), in one job or in shards (rule
reference_shard) that rule reference gathers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from trtflow.artifacts import software_versions, write_json
from trtflow.common.metrics import check_label_set, coco_map, label_categories
from trtflow.common.model import run_detector
from trtflow.run.detection_loop import detect_images
from trtflow.run.subset import check_shards, images_of_shard, val_subset


def torch_detector(model):
    """`detect` callable for `detect_dataset` running a torchvision detector on the CPU or its device."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def detect(batch: np.ndarray):
        outputs = run_detector(model, torch.from_numpy(batch).to(device))
        return [(o["boxes"].cpu().numpy(), o["scores"].cpu().numpy(), o["labels"].cpu().numpy()) for o in outputs]

    return detect


def reference_shard(
    model, coco_json, preprocess_cfg: dict, postprocess_cfg: dict, *, subset=None, shard: int = 0, batch_size: int = 8
) -> dict:
    """The detector over shard `shard` of the val images verification runs on (`subset`: config `verify:`, None:
    all images, one shard): {"images": their ids, "device", "software", "detections"}."""
    coco = json.loads(Path(coco_json).read_text())
    check_label_set(coco, model.roi_heads.box_predictor.cls_score.out_features, coco_json)
    images = images_of_shard(coco, subset, shard)
    detections = detect_images(
        torch_detector(model),
        images,
        label_categories(coco),
        preprocess_cfg,
        postprocess_cfg,
        batch_size=batch_size,
        desc="reference",
    )
    return {
        "images": [image["id"] for image in images],
        "device": str(next(model.parameters()).device),
        "software": software_versions(),
        "detections": detections,
    }


def run_reference_shard(model, coco_json, preprocess_cfg, postprocess_cfg, out_json, *, subset, shard, batch_size=8):
    """Rule `reference_shard`: one shard's detections (`reference_shard`), for rule reference to gather."""
    write_json(
        out_json,
        reference_shard(
            model, coco_json, preprocess_cfg, postprocess_cfg, subset=subset, shard=shard, batch_size=batch_size
        ),
    )


def run_reference(
    model,
    coco_json,
    preprocess_cfg: dict,
    postprocess_cfg: dict,
    detections_out,
    metrics_out,
    *,
    batch_size: int = 8,
    subset=None,
    shards: list | None = None,
) -> dict:
    """Reference detections and COCO metrics of the PyTorch detector on the val images verification runs on
    (`subset`: config `verify:`; None: all); with `shards` (rule reference_shard's files, in order) gathered from
    them, `model` unused. The metrics hold the `subset` block where it is one."""
    if shards:
        found = [json.loads(Path(path).read_text()) for path in shards]
    else:
        whole = {**(subset or {}), "shard_images": None}
        found = [
            reference_shard(model, coco_json, preprocess_cfg, postprocess_cfg, subset=whole, batch_size=batch_size)
        ]
    coco = json.loads(Path(coco_json).read_text())
    chosen = val_subset(coco, subset or {})
    check_shards([shard["images"] for shard in found], chosen, [str(path) for path in shards or ["the reference"]])
    results = [detection for shard in found for detection in shard["detections"]]
    metrics = {
        **coco_map(chosen.coco(coco), results, source=coco_json),
        **({"subset": chosen.block()} if chosen.is_subset else {}),
        "executor": "pytorch",
        "device": found[0]["device"],
        "software": found[0]["software"],
    }
    write_json(detections_out, results)
    write_json(metrics_out, metrics)
    return metrics
