"""The one postprocessing used by reference, calibration accuracy, verification and benchmark.

Raw detections of any executor (boxes in network-input pixels) -> score threshold, per-class NMS,
top-k, boxes mapped back to the original image and clipped to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms

from trtflow.common.preprocess import Letterbox


@dataclass
class Detections:
    """Detections of one image in original-image pixels, sorted by decreasing score."""

    boxes: np.ndarray  # (n, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (n,) float32
    classes: np.ndarray  # (n,) int64 model labels

    def __len__(self) -> int:
        return len(self.scores)


def class_nms(boxes, scores, classes, *, score_thresh: float, iou_thresh: float, max_detections: int):
    """Score threshold, then NMS within each class, then the `max_detections` best (indices into the inputs)."""
    boxes, scores, classes = (torch.as_tensor(np.asarray(a)) for a in (boxes, scores, classes))
    candidates = torch.nonzero(scores > score_thresh).flatten()
    keep = batched_nms(boxes[candidates].float(), scores[candidates].float(), classes[candidates], iou_thresh)
    return candidates[keep[:max_detections]].numpy()


def to_original_image(boxes: np.ndarray, letterbox: Letterbox) -> np.ndarray:
    """Input-pixel boxes -> original-image pixels, clipped to the original image."""
    h, w = letterbox.original_hw
    offset = np.array([letterbox.pad_x, letterbox.pad_y] * 2, np.float32)
    mapped = (np.asarray(boxes, np.float32) - offset) / np.float32(letterbox.ratio)
    return np.clip(mapped, 0, np.array([w, h, w, h], np.float32))


def postprocess(boxes, scores, classes, letterbox: Letterbox, cfg: dict) -> Detections:
    """One image's raw detections (input pixels) -> final `Detections` in original pixels.

    `cfg` is config `postprocess:` (score_thresh, iou_thresh, max_detections). Padding rows beyond an
    engine's `num_detections` must be cut off by the caller (their score is 0, below any threshold).
    """
    keep = class_nms(
        boxes,
        scores,
        classes,
        score_thresh=cfg["score_thresh"],
        iou_thresh=cfg["iou_thresh"],
        max_detections=cfg["max_detections"],
    )
    mapped = to_original_image(np.asarray(boxes)[keep], letterbox)
    # A box that lies wholly in the letterbox padding clips to zero area: it is not in the image.
    inside = (mapped[:, 2] > mapped[:, 0]) & (mapped[:, 3] > mapped[:, 1])
    return Detections(
        boxes=mapped[inside],
        scores=np.asarray(scores, np.float32)[keep][inside],
        classes=np.asarray(classes).astype(np.int64)[keep][inside],
    )


def to_coco_results(detections: Detections, image_id: int, category_of_label) -> list[dict]:
    """COCO results entries ([x, y, w, h] boxes) for one image; `category_of_label` maps model label -> category id."""
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category_of_label(int(label))),
            "bbox": [round(float(v), 3) for v in (x1, y1, x2 - x1, y2 - y1)],
            "score": round(float(score), 5),
        }
        for (x1, y1, x2, y2), score, label in zip(detections.boxes, detections.scores, detections.classes)
    ]
