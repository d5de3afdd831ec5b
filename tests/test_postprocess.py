import numpy as np
import torch
from torchvision.ops import batched_nms

from trtflow.common.postprocess import postprocess, to_coco_results
from trtflow.common.preprocess import Letterbox

CFG = {"score_thresh": 0.05, "iou_thresh": 0.5, "max_detections": 100}


def random_detections(n=300, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 280, (n, 2))
    wh = rng.uniform(4, 60, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    return boxes, rng.uniform(0, 1, n).astype(np.float32), rng.integers(1, 5, n)


def test_matches_torchvision_batched_nms_and_maps_back():
    boxes, scores, classes = random_detections()
    letterbox = Letterbox(ratio=1.6, pad_x=0, pad_y=0, input_hw=(320, 320), original_hw=(100, 200))
    detections = postprocess(boxes, scores, classes, letterbox, CFG)

    candidates = np.nonzero(scores > 0.05)[0]
    keep = batched_nms(
        torch.from_numpy(boxes[candidates]),
        torch.from_numpy(scores[candidates]),
        torch.from_numpy(classes[candidates]),
        0.5,
    ).numpy()[:100]
    expected = np.clip(boxes[candidates[keep]] / 1.6, 0, [200, 100, 200, 100])
    inside = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])  # not wholly in the padding
    chosen = candidates[keep][inside]
    np.testing.assert_array_equal(detections.scores, scores[chosen])
    np.testing.assert_array_equal(detections.classes, classes[chosen])
    np.testing.assert_allclose(detections.boxes, expected[inside], rtol=1e-6)
    assert 0 < len(detections) < 100 and np.all(np.diff(detections.scores) <= 0)


def test_no_detection_above_threshold_gives_empty_result():
    boxes, scores, classes = random_detections(10)
    letterbox = Letterbox(1.0, 0, 0, (320, 320), (320, 320))
    detections = postprocess(boxes, scores * 0.01, classes, letterbox, CFG)
    assert len(detections) == 0 and detections.boxes.shape == (0, 4)
    assert to_coco_results(detections, 7, lambda label: label) == []


def test_coco_results_are_xywh_with_category_ids():
    letterbox = Letterbox(2.0, 0, 0, (320, 320), (160, 160))
    detections = postprocess(
        np.array([[20, 40, 60, 100]], np.float32), np.array([0.9], np.float32), np.array([2]), letterbox, CFG
    )
    [entry] = to_coco_results(detections, 3, {2: 11}.__getitem__)
    assert entry == {"image_id": 3, "category_id": 11, "bbox": [10.0, 20.0, 20.0, 30.0], "score": 0.9}


def test_boxes_in_the_padding_are_dropped():
    letterbox = Letterbox(1.0, 0, 0, (320, 320), (100, 320))  # rows 100.. of the input are padding
    boxes = np.array([[10, 10, 50, 50], [10, 150, 50, 200], [10, 90, 50, 130]], np.float32)
    detections = postprocess(boxes, np.array([0.9, 0.8, 0.7], np.float32), np.array([1, 1, 2]), letterbox, CFG)
    np.testing.assert_array_equal(detections.scores, np.array([0.9, 0.7], np.float32))
    np.testing.assert_allclose(detections.boxes[1], [10, 90, 50, 100])
