"""The one preprocessing used by reference, calibration, verification and benchmark.

Keep-ratio resize into the static network input, content at the top-left corner, padding on the right
and bottom (the layout torchvision's batching uses), colour order, mean/std normalisation, HWC -> CHW.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from trtflow.common.images import read_image


@dataclass(frozen=True)
class Letterbox:
    """Where an original image sits inside the network input: input = original * ratio + pad."""

    ratio: float
    pad_x: int
    pad_y: int
    input_hw: tuple[int, int]
    original_hw: tuple[int, int]

    def to_dict(self) -> dict:
        return asdict(self)


def letterbox_geometry(original_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[Letterbox, tuple[int, int]]:
    """The ratio that fits the whole image into the input, and the resized (h, w) of the content."""
    h, w = original_hw
    in_h, in_w = input_hw
    ratio = min(in_h / h, in_w / w)
    resized_hw = (min(in_h, max(1, round(h * ratio))), min(in_w, max(1, round(w * ratio))))
    return Letterbox(ratio, 0, 0, (in_h, in_w), (h, w)), resized_hw


def resize_with_ratio(
    image_bgr: np.ndarray, input_hw: tuple[int, int], pad_value: int = 0
) -> tuple[np.ndarray, Letterbox]:
    """Keep-ratio resize plus bottom/right padding to exactly `input_hw` (uint8 HxWx3 in, same out)."""
    letterbox, (rh, rw) = letterbox_geometry(image_bgr.shape[:2], input_hw)
    interpolation = cv2.INTER_AREA if letterbox.ratio < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image_bgr, (rw, rh), interpolation=interpolation)
    canvas = np.full((*input_hw, 3), pad_value, dtype=np.uint8)
    canvas[:rh, :rw] = resized
    return canvas, letterbox


def normalize(image_bgr: np.ndarray, color: str, mean, std) -> np.ndarray:
    """uint8 HxWx3 BGR -> float32 3xHxW in the model's colour order, (x/255 - mean) / std."""
    pixels = image_bgr[..., ::-1] if color == "rgb" else image_bgr
    scaled = pixels.astype(np.float32) / 255.0
    scaled = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(scaled.transpose(2, 0, 1))


def preprocess_image(image_bgr: np.ndarray, cfg: dict) -> tuple[np.ndarray, Letterbox]:
    """One decoded image -> one network input (3, H, W) and its letterbox."""
    input_hw = (cfg["input"]["height"], cfg["input"]["width"])
    canvas, letterbox = resize_with_ratio(image_bgr, input_hw, cfg.get("pad_value", 0))
    tensor = normalize(canvas, cfg["color"], cfg["mean"], cfg["std"])
    return tensor, letterbox


def preprocess_batch(images: list[np.ndarray], cfg: dict) -> tuple[np.ndarray, list[Letterbox]]:
    """Decoded images -> a (B, 3, H, W) float32 batch and the letterbox of each image."""
    if not images:
        raise ValueError("preprocess_batch got no images: pass at least one decoded image")
    tensors, letterboxes = zip(*(preprocess_image(image, cfg) for image in images))
    return np.stack(tensors), list(letterboxes)


def preprocess_split(coco_json: str | Path, cfg: dict, count: int) -> np.ndarray:
    """The first `count` images of a split JSON (results/data/val.json), read and preprocessed: (B, 3, H, W)."""
    files = [image["file_name"] for image in json.loads(Path(coco_json).read_text())["images"][:count]]
    return preprocess_batch([read_image(file) for file in files], cfg)[0]
