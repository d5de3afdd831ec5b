"""COCO detection metrics through pycocotools, shared by reference, calibration accuracy and verify."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class LabelSetError(ValueError):
    """The data set's categories are not the model's classes."""


def category_labels(coco: dict) -> dict[int, int]:
    """COCO category id -> model label (1..N in sorted id order; 0 is background)."""
    return {
        category["id"]: label for label, category in enumerate(sorted(coco["categories"], key=lambda c: c["id"]), 1)
    }


def label_categories(coco: Mapping) -> dict[int, int]:
    """Model label -> COCO category id: the inverse of `category_labels`, what detections are written with."""
    return {label: category for category, label in category_labels(coco).items()}


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


def coco_ground_truth(annotations: str | Path | Mapping):
    """pycocotools' COCO of a COCO JSON file or of its loaded dict (a subset of the val split), quietly."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = dict(
            json.loads(Path(annotations).read_text()) if isinstance(annotations, (str, Path)) else annotations
        )
        ground_truth.createIndex()
    return ground_truth


def coco_map(annotations: str | Path | Mapping, results: list[dict], *, source: str | Path | None = None) -> dict:
    """COCO bbox mAP@[.5:.95] and mAP@.5 of `results` (COCO results entries) against `annotations` (a COCO JSON
    file, or its dict; `source` names it in messages)."""
    from pycocotools.cocoeval import COCOeval

    source = source or annotations
    ground_truth = coco_ground_truth(annotations)
    with contextlib.redirect_stdout(io.StringIO()):
        if not ground_truth.dataset.get("annotations"):
            # images-only val (data.annotations unset): zeros keep the numbers' type, `skipped` says why
            return {
                "mAP": 0.0,
                "mAP50": 0.0,
                "mAP75": 0.0,
                "images": len(ground_truth.getImgIds()),
                "skipped": f"{source} has no annotations (data.annotations unset): mAP is not measured",
            }
        if not results:
            return {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0, "images": len(ground_truth.getImgIds())}
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    mAP, mAP50, mAP75 = (max(0.0, float(v)) for v in evaluation.stats[:3])
    return {"mAP": mAP, "mAP50": mAP50, "mAP75": mAP75, "images": len(ground_truth.getImgIds())}


@dataclass(frozen=True)
class CategoryEvaluation:
    """One category's COCO evaluation (area all, 100 detections an image), kept per image: its detections in
    COCOeval.accumulate's order (images in id order, each by descending score, then a stable sort by score)."""

    image: np.ndarray  # (D,) position of each detection's image in PerImageEvaluation.image_ids
    matched: np.ndarray  # (T, D) bool: matched a ground truth at each IoU threshold
    ignored: np.ndarray  # (T, D) bool: matched an ignored ground truth (crowd), counted neither way
    ground_truths: np.ndarray  # (I,) ground truths per image that count (not ignored)


@dataclass(frozen=True)
class PerImageEvaluation:
    """COCO bbox evaluation of a result set kept per image, so that the mAP of any weighting of the images (a
    bootstrap resample: image i counted w[i] times) follows without evaluating again (`weighted_map`)."""

    image_ids: list[int]
    categories: list[CategoryEvaluation]
    recall_thresholds: np.ndarray


def per_image_evaluation(annotations: str | Path | Mapping, results: list[dict]) -> PerImageEvaluation:
    """COCOeval.evaluate of `results` against `annotations`, kept per image (see `PerImageEvaluation`)."""
    from pycocotools.cocoeval import COCOeval

    ground_truth = coco_ground_truth(annotations)
    with contextlib.redirect_stdout(io.StringIO()):
        detections = (
            ground_truth.loadRes(results) if results else coco_ground_truth({**ground_truth.dataset, "annotations": []})
        )
        evaluation = COCOeval(ground_truth, detections, "bbox")
        evaluation.evaluate()
    params = evaluation.params
    image_ids, thresholds, max_detections = list(params.imgIds), len(params.iouThrs), params.maxDets[-1]
    categories = []
    for k in range(len(params.catIds)):
        first = k * len(params.areaRng) * len(image_ids)  # area range 0: all
        kept = [(i, e) for i, e in enumerate(evaluation.evalImgs[first : first + len(image_ids)]) if e is not None]
        ground_truths = np.zeros(len(image_ids), np.int64)
        for i, e in kept:
            ground_truths[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        scores = np.concatenate([np.asarray(e["dtScores"][:max_detections], float) for _, e in kept] or [np.zeros(0)])
        image = np.concatenate(
            [np.full(min(len(e["dtScores"]), max_detections), i) for i, e in kept] or [np.zeros(0, int)]
        )
        order = np.argsort(-scores, kind="mergesort")
        matched, ignored = (
            np.concatenate(
                [np.asarray(e[key])[:, :max_detections] for _, e in kept] or [np.zeros((thresholds, 0))], axis=1
            )[:, order]
            for key in ("dtMatches", "dtIgnore")
        )
        categories.append(CategoryEvaluation(image[order].astype(np.int64), matched != 0, ignored != 0, ground_truths))
    return PerImageEvaluation(image_ids, categories, np.asarray(params.recThrs))


def weighted_map(evaluation: PerImageEvaluation, weights: Sequence[float] | None = None) -> float:
    """COCO mAP@[.5:.95] with image i counted `weights[i]` times (None: once each, which is COCOeval's mAP
    exactly), computed as COCOeval.accumulate and summarize do; 0 where no category has a ground truth."""
    weights = np.ones(len(evaluation.image_ids)) if weights is None else np.asarray(weights, float)
    precisions = []  # (T, R) per category with a ground truth, stacked as COCOeval's precision[..., area all, 100]
    for category in evaluation.categories:
        counted = float(np.dot(weights, category.ground_truths))
        if counted == 0:
            continue  # COCO leaves the category out (-1)
        kept = weights[category.image] > 0
        detection_weights = weights[category.image][kept]
        matched, ignored = category.matched[:, kept], category.ignored[:, kept]
        true_positives = np.cumsum(detection_weights * (matched & ~ignored), axis=1)
        false_positives = np.cumsum(detection_weights * (~matched & ~ignored), axis=1)
        q = np.zeros((len(true_positives), len(evaluation.recall_thresholds)))
        for t, (tp, fp) in enumerate(zip(true_positives, false_positives)):
            if len(tp):
                recall = tp / counted
                precision = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[::-1])[::-1]
                found = np.searchsorted(recall, evaluation.recall_thresholds, side="left")
                q[t, found < len(tp)] = precision[found[found < len(tp)]]
        precisions.append(q)
    # summed in COCOeval.summarize's order (threshold, recall, category), so that unit weights give its mAP exactly
    return max(0.0, float(np.mean(np.stack(precisions, axis=2)))) if precisions else 0.0
