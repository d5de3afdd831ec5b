"""The detection loop every executor shares: images read, preprocessed, detected in batches, postprocessed,
written as COCO results (the reference, verify, the calibration accuracy check and `trtflow detect` use it)."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from trtflow.common.images import read_image
from trtflow.common.metrics import label_categories
from trtflow.common.postprocess import postprocess, to_coco_results
from trtflow.common.preprocess import preprocess_batch


@dataclass(eq=False)
class ImpossibleOutput(ValueError):
    """An executor gave what no head can (the contract of `trtflow.common.head`): more detections than rows, a label
    outside the model's classes, a box or score that is not a finite number. A wrong network, never noise."""

    image: int | str  # the image's file, or (before the detection loop names it) its position in the batch
    output: str  # e.g. "classes[3]": the output, and the detection's row
    value: object
    expected: str

    def __str__(self) -> str:
        where = f"image {self.image} of the batch" if isinstance(self.image, int) else self.image
        return f"{where}: {self.output} is {self.value}, should be {self.expected}"


def rows(values: np.ndarray) -> np.ndarray:
    """`values` as one row per detection, also where there is none (a (0, 4) array has no -1 to reshape to)."""
    return values.reshape(len(values), -1) if len(values) else values.reshape(0, 0)


def check_detections(
    image: str, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, labels: Collection[int]
) -> None:
    """One image's raw detections (what `detect` returns for it) against the head's contract: finite boxes and
    scores, labels among `labels` (the model's, 1..num_classes-1; empty: any label >= 1, where a data set names
    no categories). Raises ImpossibleOutput naming `image`, the output and row, the value and what it should be."""
    boxes, scores, classes = np.asarray(boxes), np.asarray(scores), np.asarray(classes)
    for name, values in (("boxes", rows(boxes)), ("scores", rows(scores))):
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if bad.size:
            value = values[bad[0]].tolist()
            raise ImpossibleOutput(image, f"{name}[{bad[0]}]", value[0] if len(value) == 1 else value, "finite")
    known = np.isin(classes, list(labels)) if labels else classes >= 1
    if not known.all():
        row = int(np.flatnonzero(~known)[0])
        allowed = f"in {min(labels)}..{max(labels)}" if labels else ">= 1"
        raise ImpossibleOutput(
            image, f"classes[{row}]", int(classes[row]), f"a model label {allowed} (0 is the background)"
        )


def batches(items: list, size: int):
    for first in range(0, len(items), size):
        yield items[first : first + size]


def detect_dataset(
    detect,
    coco: str | Path | Mapping,
    preprocess_cfg: dict,
    postprocess_cfg: dict,
    *,
    batch_size: int = 8,
    desc: str = "detect",
) -> list[dict]:
    """COCO results of `detect` over a COCO data set (a COCO JSON file, or its dict: a subset of the val split),
    through the shared pre- and postprocessing.

    `detect(batch: np.ndarray (B,3,H,W)) -> list of (boxes, scores, classes)` in input pixels, one per image;
    every executor (PyTorch, ONNX Runtime + deployment head, TensorRT engine) plugs in here.
    """
    coco = json.loads(Path(coco).read_text()) if isinstance(coco, (str, Path)) else coco
    return detect_images(
        detect,
        coco["images"],
        label_categories(coco),
        preprocess_cfg,
        postprocess_cfg,
        batch_size=batch_size,
        desc=desc,
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

    Raises `ImpossibleOutput`, naming the image's file, where `detect` gives what no head can
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
