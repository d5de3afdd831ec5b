"""COCO detection metrics through pycocotools, shared by reference, calibration accuracy and verify."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path


def category_labels(coco: dict) -> dict[int, int]:
    """COCO category id -> model label (1..N in sorted id order; 0 is background)."""
    return {category["id"]: label for label, category in enumerate(sorted(coco["categories"], key=lambda c: c["id"]), 1)}


def coco_map(annotations_json: str | Path, results: list[dict]) -> dict:
    """COCO bbox mAP@[.5:.95] and mAP@.5 of `results` (COCO results entries) against `annotations_json`."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotations_json))
        if not results:
            return {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0, "images": len(ground_truth.getImgIds())}
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    mAP, mAP50, mAP75 = (max(0.0, float(v)) for v in evaluation.stats[:3])
    return {"mAP": mAP, "mAP50": mAP50, "mAP75": mAP75, "images": len(ground_truth.getImgIds())}


def write_json(path: str | Path, payload) -> None:
    """Write JSON atomically: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    partial.replace(path)
