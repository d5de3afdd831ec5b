"""The demo data set: synthetic shapes (circle, rectangle, triangle, star) on textured backgrounds, written as
JPEGs and a COCO instances JSON."""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from trtflow.artifacts import disk_full_named, staging_path, write_json

log = logging.getLogger(__name__)

DEMO_CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "star", "supercategory": "shape"},
]
# Each split draws from its own seed stream, so the number of training images never
# changes val or calib, and image i of a split is the same whatever the split's size.
SPLIT_STREAMS = {"train": 0, "val": 1, "calib": 2}


@dataclass(frozen=True)
class DemoSpec:
    """What a demo image looks like."""

    image_side: tuple[int, int] = (240, 480)  # each side drawn independently in this range
    object_side: tuple[float, float] = (16, 0.6)  # px, fraction of the shorter image side
    objects: tuple[int, int] = (1, 8)
    max_occlusion: float = 0.3  # of a shape's pixels, and of its box, hidden by later shapes
    min_contrast: float = 90.0  # BGR distance of a shape's colour to what lies under it
    jpeg_quality: int = 95


@dataclass
class _Shape:
    """A drawn shape: its tight mask over its box at (x, y), and which box pixels later shapes cover."""

    category_id: int
    x: int
    y: int
    mask: np.ndarray
    colour: np.ndarray
    covered: np.ndarray

    def overlap(self, other: _Shape) -> tuple[slice, slice, slice, slice] | None:
        """(rows, cols) in self's box, then in other's box, of where the two boxes meet."""
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1 = min(self.x + self.mask.shape[1], other.x + other.mask.shape[1])
        y1 = min(self.y + self.mask.shape[0], other.y + other.mask.shape[0])
        if x0 >= x1 or y0 >= y1:
            return None
        return (
            slice(y0 - self.y, y1 - self.y),
            slice(x0 - self.x, x1 - self.x),
            slice(y0 - other.y, y1 - other.y),
            slice(x0 - other.x, x1 - other.x),
        )


def _rotation(angle: float) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    return np.array([[cos, -sin], [sin, cos]])


def _outline(category_id: int, rng: np.random.Generator) -> np.ndarray:
    """A unit-sized outline (N, 2) of a non-circle shape, stretched and rotated at random."""
    if category_id == 2:  # rectangle; a quarter of them axis-aligned, as real boxes often are
        aspect = math.exp(rng.uniform(math.log(0.35), 0.0))
        points = np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]], float)
        angle = rng.integers(4) * math.pi / 2 if rng.random() < 0.25 else rng.uniform(0, math.pi)
        return points @ _rotation(angle).T
    if category_id == 3:  # triangle with no angle under 25 degrees, so it stays one
        while True:
            corners = np.radians([0, 120 + rng.uniform(-35, 35), 240 + rng.uniform(-35, 35)])
            points = np.stack([np.cos(corners) * rng.uniform(0.6, 1.5), np.sin(corners)], axis=1)
            to_previous, to_next = np.roll(points, 1, axis=0) - points, np.roll(points, -1, axis=0) - points
            cosines = (to_previous * to_next).sum(axis=1) / (
                np.linalg.norm(to_previous, axis=1) * np.linalg.norm(to_next, axis=1)
            )
            if np.degrees(np.arccos(np.clip(cosines, -1, 1))).min() >= 25:
                return points @ _rotation(rng.uniform(0, 2 * math.pi)).T
    # five-pointed star
    radii = np.tile([1.0, rng.uniform(0.38, 0.55)], 5)
    corners = np.arange(10) * math.pi / 5
    points = np.stack([np.cos(corners) * radii * rng.uniform(0.85, 1.2), np.sin(corners) * radii], axis=1)
    return points @ _rotation(rng.uniform(0, 2 * math.pi)).T


def _shape_mask(category_id: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """The tight boolean mask of a shape whose box's longer side is ``side`` px."""
    if category_id == 1:
        radius = side // 2
        mask = np.zeros((2 * radius + 1, 2 * radius + 1), np.uint8)
        cv2.circle(mask, (radius, radius), radius, 255, thickness=-1, lineType=cv2.LINE_8)
    else:
        points = _outline(category_id, rng)
        points -= points.min(axis=0)
        points = np.round(points * (side - 1) / points.max()).astype(np.int32)
        mask = np.zeros((points[:, 1].max() + 1, points[:, 0].max() + 1), np.uint8)
        cv2.fillPoly(mask, [points], 255, lineType=cv2.LINE_8)
    # The box is read off the drawn pixels, so it is exact whatever the rasteriser did.
    x, y, w, h = cv2.boundingRect(mask)
    return mask[y : y + h, x : x + w] > 0


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A textured float32 background: a colour gradient plus noise, stripes or blurred blobs."""
    rows, cols = np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (cols * math.cos(angle) + rows * math.sin(angle)) / max(height, width)
    start, end = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    image = start + np.clip(ramp + 0.5, 0, 1)[..., None] * (end - start) * rng.uniform(0, 0.8)
    for texture in rng.permutation(["noise", "stripes", "blobs"])[: rng.integers(1, 3)]:
        if texture == "noise":
            noise = rng.standard_normal((height, width, 1), dtype=np.float32) * rng.uniform(4, 18)
            if rng.random() < 0.5:
                noise = cv2.GaussianBlur(noise, (0, 0), rng.uniform(0.8, 2.5))[..., None] * 2
            image += noise
        elif texture == "stripes":
            angle = rng.uniform(0, math.pi)
            phase = (cols * math.cos(angle) + rows * math.sin(angle)) * (2 * math.pi / rng.uniform(6, 40))
            image += np.sin(phase)[..., None] * rng.uniform(-30, 30, 3).astype(np.float32)
        else:
            cells = rng.integers(3, 12)
            blobs = rng.standard_normal((cells, cells, 3), dtype=np.float32) * rng.uniform(15, 45)
            image += cv2.resize(blobs, (width, height), interpolation=cv2.INTER_CUBIC)
    return image


def _pick_colour(under: list[np.ndarray], spec: DemoSpec, rng: np.random.Generator) -> np.ndarray:
    """A shape colour at least ``min_contrast`` from every colour it lies on (else the farthest of 16 tries)."""
    candidates = rng.uniform(0, 255, (16, 3))
    distance = np.min([np.linalg.norm(candidates - colour, axis=1) for colour in under], axis=0)
    good = np.flatnonzero(distance >= spec.min_contrast)
    return candidates[good[0] if good.size else int(np.argmax(distance))]


def _place(candidate: _Shape, shapes: list[_Shape], limit: float) -> bool:
    """Whether ``candidate`` on top leaves every earlier shape at most ``limit`` hidden; if so, records the cover."""
    updates = []
    for shape in shapes:
        overlap = candidate.overlap(shape)
        if overlap is None:
            continue
        rows, cols, own_rows, own_cols = overlap
        covered = shape.covered.copy()
        covered[own_rows, own_cols] |= candidate.mask[rows, cols]
        if covered.mean() > limit or (covered & shape.mask).sum() > limit * shape.mask.sum():
            return False
        updates.append((shape, covered))
    for shape, covered in updates:
        shape.covered = covered
    return True


def demo_image(seed: int, split: str, index: int, spec: DemoSpec = DemoSpec()) -> tuple[np.ndarray, list[dict]]:
    """Demo image ``index`` of ``split``: uint8 BGR pixels and its objects
    ``{"category_id", "bbox": [x, y, w, h], "area"}`` (tight integer box, area in pixels)."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], index])
    height, width = rng.integers(spec.image_side[0], spec.image_side[1] + 1, 2)
    background = _background(height, width, rng)
    image = background.copy()
    smallest, largest = spec.object_side[0], spec.object_side[1] * min(height, width)
    shapes: list[_Shape] = []
    for _ in range(rng.integers(spec.objects[0], spec.objects[1] + 1)):
        category_id = int(rng.integers(1, len(DEMO_CATEGORIES) + 1))
        side = math.exp(rng.uniform(math.log(smallest), math.log(largest)))
        for attempt in range(30):
            if attempt and attempt % 10 == 0:
                side = max(smallest, side * 0.7)
            mask = _shape_mask(category_id, int(side), rng)
            if mask.shape[0] > height or mask.shape[1] > width:
                continue
            x = int(rng.integers(0, width - mask.shape[1] + 1))
            y = int(rng.integers(0, height - mask.shape[0] + 1))
            candidate = _Shape(category_id, x, y, mask, np.zeros(3), np.zeros(mask.shape, bool))
            if _place(candidate, shapes, spec.max_occlusion):
                break
        else:
            continue
        region = (slice(y, y + mask.shape[0]), slice(x, x + mask.shape[1]))
        under = [background[region][mask].mean(axis=0)] + [s.colour for s in shapes if candidate.overlap(s)]
        candidate.colour = _pick_colour(under, spec, rng)
        image[region][mask] = candidate.colour
        shapes.append(candidate)
    image += rng.standard_normal((height, width, 1), dtype=np.float32) * rng.uniform(0, 4)
    objects = [
        {
            "category_id": s.category_id,
            "bbox": [s.x, s.y, s.mask.shape[1], s.mask.shape[0]],
            "area": float(s.mask.sum()),
        }
        for s in shapes
    ]
    return np.clip(np.rint(image, out=image), 0, 255, out=image).astype(np.uint8), objects


def make_demo_split(
    split: str, num_images: int, seed: int, out_json: str | os.PathLike, spec: DemoSpec = DemoSpec()
) -> dict:
    """Write demo ``split`` as JPEGs in ``out_json`` without its suffix (``results/data/val/000001.jpg``)
    and the COCO JSON ``out_json``, whose file names start at the same folder ``out_json`` does.

    The images folder is filled under a temporary name and renamed into place, then the
    JSON is written atomically, so an interrupted run leaves no half split behind.
    """
    if split not in SPLIT_STREAMS:
        raise ValueError(f"demo split {split!r} is unknown; use one of {list(SPLIT_STREAMS)}")
    out_json = Path(out_json)
    images_dir = out_json.with_suffix("")
    staging = staging_path(images_dir)
    staging.mkdir(parents=True)
    images, annotations = [], []
    try:
        with disk_full_named(images_dir):
            for image_id in tqdm(range(1, num_images + 1), desc=f"demo {split}", unit="img", mininterval=5):
                pixels, objects = demo_image(seed, split, image_id, spec)
                name = f"{image_id:06d}.jpg"
                ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, spec.jpeg_quality])
                if not ok:
                    raise RuntimeError(f"OpenCV could not encode demo image {name}")
                (staging / name).write_bytes(encoded.tobytes())
                images.append(
                    {
                        "id": image_id,
                        "file_name": (images_dir / name).as_posix(),
                        "height": pixels.shape[0],
                        "width": pixels.shape[1],
                    }
                )
                annotations += [
                    {"id": len(annotations) + n, "image_id": image_id, **o, "iscrowd": 0}
                    for n, o in enumerate(objects, 1)
                ]
            shutil.rmtree(images_dir, ignore_errors=True)
            os.replace(staging, images_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    dataset = {
        "info": {"source": "demo", "split": split, "seed": seed, "skipped": []},
        "images": images,
        "annotations": annotations,
        "categories": DEMO_CATEGORIES,
    }
    write_json(out_json, dataset, indent=1, sort_keys=False)
    log.info("demo %s: %d images, %d objects -> %s", split, len(images), len(annotations), out_json)
    return dataset
