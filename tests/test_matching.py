"""trtflow.run.matching: deployed detections matched one to one to the reference's, on hand-built detections."""

import numpy as np
import pytest

from trtflow.run.matching import iou_matrix, match_detections, xyxy


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


REFERENCE = [
    det(1, 1, [0, 0, 10, 10], 0.9),  # r0: found exactly (d0)
    det(1, 1, [20, 20, 10, 10], 0.8),  # r1: found at IoU 100/105 (d1)
    det(1, 2, [0, 0, 10, 10], 0.7),  # r2: deployed with another class (d2): missed
    det(1, 1, [50, 50, 10, 10], 0.6),  # r3: deployed shifted to IoU 90/110 < 0.9 (d3): missed
    det(2, 1, [0, 0, 20, 20], 0.5),  # r4: found on image 2 (d4)
]
DEPLOYED = [
    det(1, 1, [0, 0, 10, 10], 0.85),
    det(1, 1, [20, 20, 10, 10.5], 0.82),
    det(1, 3, [0, 0, 10, 10], 0.7),
    det(1, 1, [51, 50, 10, 10], 0.6),
    det(2, 1, [0, 0, 20, 20], 0.5),
    det(1, 1, [0, 0, 10, 10], 0.3),  # d5: a duplicate of r0, which d0 already took
]


def test_iou_matrix_on_known_boxes():
    a = xyxy([[0, 0, 10, 10], [20, 20, 10, 10]])
    b = xyxy([[0, 0, 10, 10], [5, 0, 10, 10], [20, 20, 10, 10.5], [0, 0, 0, 0]])
    assert iou_matrix(a, b) == pytest.approx(np.array([[1.0, 50 / 150, 0.0, 0.0], [0.0, 0.0, 100 / 105, 0.0]]))


def test_zero_area_boxes_are_counted_apart():
    """Boxes in the letterbox padding come out of the postprocessing clipped to zero width: no IoU."""
    flat = [det(1, 1, [64, 10, 0, 5], 0.4), det(1, 1, [64, 10, 0, 6], 0.3)]
    matching = match_detections(REFERENCE + flat[:1], DEPLOYED + flat, iou_thresh=0.9)
    assert matching.pairs == [(0, 0), (1, 1), (4, 4)]
    summary = matching.summary()
    assert summary["zero_area_detections"] == {"reference": 1, "deployed": 2}
    assert summary["match_recall"] == pytest.approx(3 / 5) and summary["match_precision"] == pytest.approx(3 / 6)


def test_match_metrics_on_hand_built_detections():
    matching = match_detections(REFERENCE, DEPLOYED, iou_thresh=0.9)
    assert matching.pairs == [(0, 0), (1, 1), (4, 4)]
    summary = matching.summary()
    assert summary["matched"] == 3 and summary["reference_detections"] == 5 and summary["deployed_detections"] == 6
    assert summary["match_recall"] == pytest.approx(3 / 5)
    assert summary["match_precision"] == pytest.approx(3 / 6)
    assert matching.dscores == pytest.approx([-0.05, 0.02, 0.0])
    assert summary["mean_abs_dscore"] == pytest.approx(0.07 / 3)
    assert summary["max_abs_dscore"] == pytest.approx(0.05)
    assert summary["mean_iou"] == pytest.approx((1 + 100 / 105 + 1) / 3)


def test_lower_iou_threshold_admits_the_shifted_box():
    matching = match_detections(REFERENCE, DEPLOYED, iou_thresh=0.8)
    assert matching.pairs == [(0, 0), (1, 1), (3, 3), (4, 4)]
    assert matching.recall == pytest.approx(4 / 5)


def test_greedy_matching_serves_the_higher_reference_score_first():
    reference = [det(1, 1, [0, 0, 10, 10], 0.6), det(1, 1, [0, 0, 10, 10.5], 0.9)]
    deployed = [det(1, 1, [0, 0, 10, 10], 0.9)]
    matching = match_detections(reference, deployed)
    assert matching.pairs == [(1, 0)]  # the 0.9 reference takes it, though the 0.6 one overlaps it better
    assert matching.dscores == pytest.approx([0.0])


def test_empty_sides():
    assert match_detections([], []).summary() == {
        "reference_detections": 0,
        "deployed_detections": 0,
        "matched": 0,
        "match_recall": 1.0,
        "match_precision": 1.0,
        "mean_abs_dscore": None,
        "max_abs_dscore": None,
        "mean_iou": None,
        "zero_area_detections": {"reference": 0, "deployed": 0},
    }
    assert match_detections(REFERENCE, []).recall == 0.0
    assert match_detections([], DEPLOYED).precision == 0.0
