"""COCO detection metrics through pycocotools, shared by reference, calibration accuracy and verify."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path


class LabelSetError(ValueError):
    """The data set's categories are not the model's classes."""


def category_labels(coco: dict) -> dict[int, int]:
    """COCO category id -> model label (1..N in sorted id order; 0 is background)."""
    return {
        category["id"]: label for label, category in enumerate(sorted(coco["categories"], key=lambda c: c["id"]), 1)
    }


def check_label_set(coco: dict, num_classes: int, source: str | Path) -> None:
    """Refuse a data set whose categories cannot be the model's classes (see `category_labels`).

    Without this check a mismatch shows up as a KeyError deep in scoring, or worse as a wrong mAP.
    An images-only split (no categories) has nothing to match.
    """
    categories = len(coco["categories"])
    if categories and categories != num_classes - 1:
        raise LabelSetError(
            f"{source} lists {categories} categories but model.num_classes is {num_classes} ({num_classes - 1} object "
            f"classes + background). Model label i is scored as the i-th category in id order, so the two must agree: "
            f"use a checkpoint trained on these {categories} categories with model.num_classes: {categories + 1}, or "
            f"annotations (data.annotations) of the model's {num_classes - 1} classes"
        )


def coco_map(annotations_json: str | Path, results: list[dict]) -> dict:
    """COCO bbox mAP@[.5:.95] and mAP@.5 of `results` (COCO results entries) against `annotations_json`."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotations_json))
        if not ground_truth.dataset.get("annotations"):
            # images-only val (data.annotations unset): zeros keep the numbers' type, `skipped` says why
            return {
                "mAP": 0.0,
                "mAP50": 0.0,
                "mAP75": 0.0,
                "images": len(ground_truth.getImgIds()),
                "skipped": f"{annotations_json} has no annotations (data.annotations unset): mAP is not measured",
            }
        if not results:
            return {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0, "images": len(ground_truth.getImgIds())}
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    mAP, mAP50, mAP75 = (max(0.0, float(v)) for v in evaluation.stats[:3])
    return {"mAP": mAP, "mAP50": mAP50, "mAP75": mAP75, "images": len(ground_truth.getImgIds())}
