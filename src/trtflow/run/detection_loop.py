"""The detection loop every executor shares: images read, preprocessed, detected in batches, postprocessed,
written as COCO results (the reference, verify, the calibration accuracy check and `trtflow detect` use it)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from trtflow.common.images import read_image
from trtflow.common.metrics import category_labels
from trtflow.common.postprocess import postprocess, to_coco_results
from trtflow.common.preprocess import preprocess_batch
from trtflow.run.executors import ImpossibleOutput, check_detections


def batches(items: list, size: int):
    for first in range(0, len(items), size):
        yield items[first : first + size]


def detect_dataset(
    detect,
    coco_json: str | Path,
    preprocess_cfg: dict,
    postprocess_cfg: dict,
    *,
    batch_size: int = 8,
    desc: str = "detect",
) -> list[dict]:
    """COCO results of `detect` over a COCO data set, through the shared pre- and postprocessing.

    `detect(batch: np.ndarray (B,3,H,W)) -> list of (boxes, scores, classes)` in input pixels, one per image;
    every executor (PyTorch, ONNX Runtime + deployment head, TensorRT engine) plugs in here.
    """
    coco = json.loads(Path(coco_json).read_text())
    category_of = {label: category for category, label in category_labels(coco).items()}
    return detect_images(
        detect, coco["images"], category_of, preprocess_cfg, postprocess_cfg, batch_size=batch_size, desc=desc
    )


def detect_images(
    detect,
    images: list[dict],
    category_of: dict[int, int],
    preprocess_cfg: dict,
    postprocess_cfg: dict,
    *,
    batch_size: int = 8,
    desc: str = "detect",
) -> list[dict]:
    """COCO results of `detect` (see `detect_dataset`) over `images` ({"id", "file_name"} each); `category_of`:
    model label -> category id (empty: an images-only data set, whose results keep the model labels).

    Raises `trtflow.run.executors.ImpossibleOutput`, naming the image's file, where `detect` gives what no head can
    (a label not in `category_of`, a non-finite box or score, more detections than rows)."""
    labels = set(category_of)
    category_of = category_of or _ModelLabels()
    results = []
    for chunk in tqdm(list(batches(images, batch_size)), desc=desc, unit="batch"):
        tensors, letterboxes = preprocess_batch([read_image(image["file_name"]) for image in chunk], preprocess_cfg)
        try:
            raws = detect(tensors)
        except ImpossibleOutput as error:  # raised by position in the batch: name the image's file
            raise replace(error, image=chunk[error.image]["file_name"]) from None
        for image, letterbox, raw in zip(chunk, letterboxes, raws):
            check_detections(image["file_name"], *raw, labels)
            detections = postprocess(*raw, letterbox, postprocess_cfg)
            results += to_coco_results(detections, image["id"], category_of.__getitem__)
    return results


class _ModelLabels(dict):
    def __missing__(self, label: int) -> int:
        return label
