"""Deployed detections matched to reference detections (COCO results entries), one to one.

Within each (image, category), reference detections in descending score each take the best-overlapping unmatched
deployed one, where that IoU >= the threshold (verify's `verify.match_iou`); the pairs give match recall and
precision, |Δscore| and box IoU. Boxes of zero area (detections in the letterbox padding, clipped to nothing by the
postprocessing) have no IoU: they are counted apart. `trtflow.run.verify` judges a precision by these numbers; the
report plots the Δscores of the pairs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


def xyxy(boxes_xywh: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 4) x (m, 4) x1y1x2y2 -> (n, m) IoU; pairs of zero union give 0."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def zero_area(entry: Mapping) -> bool:
    """A box the postprocessing clipped to nothing (it lay in the letterbox padding): IoU cannot compare it."""
    return entry["bbox"][2] <= 0 or entry["bbox"][3] <= 0


@dataclass
class Matching:
    """Deployed detections matched one-to-one to reference detections (COCO results entries)."""

    reference: int  # number of reference detections of positive area
    deployed: int  # number of deployed detections of positive area
    pairs: list[tuple[int, int]]  # (reference index, deployed index)
    dscores: np.ndarray  # deployed score - reference score, per pair
    ious: np.ndarray  # box IoU, per pair
    zero_area: tuple[int, int] = (0, 0)  # (reference, deployed) detections left out: boxes of zero area

    @property
    def recall(self) -> float:
        """Share of reference detections found again; 1 when the reference has none."""
        return len(self.pairs) / self.reference if self.reference else 1.0

    @property
    def precision(self) -> float:
        """Share of deployed detections that match a reference one; 1 when none were deployed."""
        return len(self.pairs) / self.deployed if self.deployed else 1.0

    def summary(self) -> dict:
        matched = len(self.pairs)
        return {
            "reference_detections": self.reference,
            "deployed_detections": self.deployed,
            "matched": matched,
            "match_recall": self.recall,
            "match_precision": self.precision,
            "mean_abs_dscore": float(np.abs(self.dscores).mean()) if matched else None,
            "max_abs_dscore": float(np.abs(self.dscores).max()) if matched else None,
            "mean_iou": float(self.ious.mean()) if matched else None,
            "zero_area_detections": {"reference": self.zero_area[0], "deployed": self.zero_area[1]},
        }


def match_detections(reference: list[dict], deployed: list[dict], iou_thresh: float = 0.9) -> Matching:
    """Greedy one-to-one matching within each (image, category): reference detections by descending score
    each take the unmatched deployed detection of highest IoU, if that IoU >= `iou_thresh`.

    Zero-area boxes (detections in the letterbox padding, clipped away) have no IoU; they are counted
    apart, not matched."""
    groups: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for side, entries in enumerate((reference, deployed)):
        for index, entry in enumerate(entries):
            if not zero_area(entry):
                groups[entry["image_id"], entry["category_id"]][side].append(index)
    pairs = []
    for ref_indices, dep_indices in groups.values():
        if not ref_indices or not dep_indices:
            continue
        ref_indices = sorted(ref_indices, key=lambda i: -reference[i]["score"])
        overlap = iou_matrix(
            xyxy([reference[i]["bbox"] for i in ref_indices]), xyxy([deployed[j]["bbox"] for j in dep_indices])
        )
        taken = np.zeros(len(dep_indices), bool)
        for row, ref_index in enumerate(ref_indices):
            candidates = np.where(taken, -1.0, overlap[row])
            best = int(np.argmax(candidates))
            if candidates[best] >= iou_thresh:
                taken[best] = True
                pairs.append((ref_index, dep_indices[best], float(overlap[row, best])))
    pairs.sort()
    degenerate = (sum(map(zero_area, reference)), sum(map(zero_area, deployed)))
    return Matching(
        reference=len(reference) - degenerate[0],
        deployed=len(deployed) - degenerate[1],
        pairs=[(r, d) for r, d, _ in pairs],
        dscores=np.array([deployed[d]["score"] - reference[r]["score"] for r, d, _ in pairs], np.float64),
        ious=np.array([iou for _, _, iou in pairs], np.float64),
        zero_area=degenerate,
    )
