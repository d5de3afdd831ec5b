"""Data sets: the synthetic demo shapes, users' COCO data, and robust image reading.

Every split the pipeline uses is a COCO instances JSON under ``results/data/``
(``val.json``, ``calib.json``, ``train.json``) whose ``images[].file_name`` is a path
relative to the working directory (or absolute for user data), so any stage opens an
image with ``read_image(image["file_name"])`` from the working directory.

Image reading never hands a decoding problem to OpenCV's silent ``None``: every file
is read as bytes, decoded with ``cv2.imdecode`` and checked, and a problem is either
converted (documented in :func:`read_image`) or raised as :class:`BadImageError` naming
the file, what is wrong and the fix. Data sets apply the ``bad_images`` policy:
``fail`` raises one :class:`DatasetError` naming every offender, ``skip`` leaves them
out and lists them in the split JSON's ``info["skipped"]``.
"""

from __future__ import annotations

import glob
import json
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

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MIN_IMAGE_SIDE = 32
MAX_IMAGE_SIDE = 8000
BAD_IMAGE_POLICIES = ("fail", "skip")
SKIP_HINT = (
    "or set `data.bad_images: skip` in config.yaml to leave them out "
    "(each is then listed in the split JSON's info.skipped)"
)


class BadImageError(ValueError):
    """An image file that cannot be used: names the file, the problem and the fix."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str):
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}. Fix: {fix}")


class DatasetError(ValueError):
    """A data set (COCO JSON, image folder or glob) that cannot be used as given."""

    def __init__(self, source: str | os.PathLike, problems: list[str], fix: str):
        self.source = str(source)
        self.problems = list(problems)
        if len(self.problems) == 1:
            found = self.problems[0]
        else:
            more = [f"... and {len(self.problems) - 30} more"] if len(self.problems) > 30 else []
            found = f"{len(self.problems)} problems:" + "".join(
                f"\n  - {problem}" for problem in self.problems[:30] + more
            )
        super().__init__(f"{self.source}: {found}\nFix: {fix}")


# ---------------------------------------------------------------------------------------
# Reading one image


def _sniff_format(data: bytes) -> str | None:
    """The container format from the file's magic bytes (None: not a known image format)."""
    signatures = {
        b"\xff\xd8\xff": "JPEG",
        b"\x89PNG\r\n\x1a\n": "PNG",
        b"BM": "BMP",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
    }
    for magic, name in signatures.items():
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _jpeg_is_truncated(data: bytes) -> bool:
    """True when the last scan of a JPEG has no end-of-image marker after it.

    Entropy-coded data never contains 0xFFDA / 0xFFD9 (0xFF bytes are stuffed), so the last
    SOS marker starts the main image's last scan even when an EXIF thumbnail precedes it;
    trailing bytes after EOI (some cameras append data) are fine. OpenCV 4.x decodes a
    truncated JPEG into a half-grey picture with only a warning on stderr, hence this check.
    """
    last_scan = data.rfind(b"\xff\xda")
    return last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0


def _to_bgr8(pixels: np.ndarray, path: Path) -> np.ndarray:
    """Decoded pixels (1 or 3 channels, 8 or 16 bit) as uint8 HxWx3 BGR."""
    if pixels.dtype == np.uint16:
        # Full-range scaling (v * 255 / 65535, rounded): a 16-bit export of an 8-bit picture
        # round-trips exactly, and the exposure is kept rather than stretched per image.
        pixels = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise BadImageError(
            path,
            f"has {pixels.dtype} pixels, which have no agreed mapping to 8-bit colour",
            "export it as an 8- or 16-bit JPEG/PNG",
        )
    if pixels.ndim == 2:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(pixels)


def read_image(path: str | os.PathLike, min_side: int = MIN_IMAGE_SIDE, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """An image file as uint8 HxWx3 BGR, or :class:`BadImageError` naming file, problem and fix.

    Converted, as ``cv2.imread(path)`` would, so a model trained on cv2/PIL-read images
    sees the same pixels: EXIF orientation is applied; grayscale is repeated to 3
    channels; an alpha channel is dropped (not composited: the colour under transparent
    pixels is kept, as cv2.imread and PIL's ``convert("RGB")`` do); 16-bit is scaled to
    8-bit by v * 255 / 65535. Refused: missing, empty, non-image, corrupt or truncated
    files, float pixels, and images under ``min_side`` or over ``max_side`` px a side
    (resizing would silently move the annotated boxes).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadImageError(
            path, "does not exist", "check the path, or the image folder setting that led to it"
        ) from None
    except IsADirectoryError:
        raise BadImageError(path, "is a folder, not an image file", "point at the image files inside it") from None
    except OSError as error:
        raise BadImageError(path, f"cannot be read ({error.strerror})", "check its permissions and the disk") from None
    if not data:
        raise BadImageError(path, "is empty (0 bytes)", "copy the image again; the transfer that wrote it failed")
    kind = _sniff_format(data)
    if kind == "JPEG" and _jpeg_is_truncated(data):
        raise BadImageError(path, "is a truncated JPEG (no end-of-image marker)", "copy the image again in full")
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error as error:
        raise BadImageError(
            path, f"cannot be decoded by OpenCV ({error.err})", "re-save it as an 8-bit JPEG or PNG"
        ) from None
    if pixels is None:
        if kind is None:
            raise BadImageError(
                path,
                f"is not an image OpenCV can read (unknown format, starts with {data[:8]!r})",
                "convert it to JPEG or PNG, or remove it from the image folder",
            )
        raise BadImageError(path, f"is a corrupt or truncated {kind} file", "copy or re-export the image")
    height, width = pixels.shape[:2]
    if min(height, width) < min_side:
        raise BadImageError(
            path,
            f"is {width}x{height} px, under {min_side} px a side: too small to hold detectable objects",
            "use the full-size image, not a thumbnail",
        )
    if max(height, width) > max_side:
        raise BadImageError(
            path,
            f"is {width}x{height} px, over {max_side} px a side",
            f"downscale it (and scale its annotations) to at most {max_side} px a side",
        )
    return _to_bgr8(pixels, path)


def _check_policy(bad_images: str) -> None:
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"data.bad_images is {bad_images!r}; use one of {', '.join(BAD_IMAGE_POLICIES)}")


def _decode_all(paths: list[Path], source: str) -> tuple[dict[Path, tuple[int, int]], list[BadImageError]]:
    """Decode every image once: {path: (height, width)} of the good ones, and the errors of the bad."""
    sizes, bad = {}, []
    for path in tqdm(paths, desc=f"checking {source}", unit="img", mininterval=5):
        try:
            sizes[path] = read_image(path).shape[:2]
        except BadImageError as error:
            bad.append(error)
    return sizes, bad


def check_images(paths: list[Path], bad_images: str, source: str) -> tuple[dict[Path, tuple[int, int]], list[dict]]:
    """Decode every image once: ({path: (height, width)} of good ones, skipped entries).

    ``bad_images: fail`` raises one :class:`DatasetError` naming every bad file;
    ``skip`` returns them as ``{"file", "reason"}`` entries.
    """
    _check_policy(bad_images)
    sizes, bad = _decode_all(paths, source)
    if bad and bad_images == "fail":
        raise DatasetError(source, [str(error) for error in bad], f"repair or remove the files named, {SKIP_HINT}")
    for error in bad:
        log.warning("skipped %s", error)
    return sizes, [_skipped(error) for error in bad]


def _skipped(error: BadImageError) -> dict:
    """A split JSON's ``info["skipped"]`` entry."""
    return {"file": error.path.as_posix(), "reason": error.problem}


# ---------------------------------------------------------------------------------------
# Listing images


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _coco_file_path(file_name: str, json_path: Path) -> Path:
    """A COCO ``file_name`` as a path: absolute as is; relative to the working directory
    (trtflow's own JSONs) when it exists there, else relative to the JSON's folder."""
    path = Path(file_name)
    if path.is_absolute() or path.exists():
        return path
    beside_json = json_path.parent / path
    return beside_json if beside_json.exists() else path


def list_images(spec: str | os.PathLike) -> list[Path]:
    """The image files named by ``spec``, sorted: a folder (image files under it,
    recursively, hidden ones left out), a glob pattern (every file it matches), or a
    COCO JSON (its ``images[].file_name``, see :func:`_coco_file_path`)."""
    text = os.fspath(spec)
    path = Path(text)
    if any(char in text for char in "*?["):
        paths = [Path(match) for match in glob.glob(text, recursive=True)]
        paths = [match for match in paths if match.is_file()]
        if not paths:
            raise DatasetError(
                text, ["the glob pattern matches no files"], "check the pattern, relative to the working directory"
            )
    elif path.is_dir():
        paths = [
            match
            for match in path.rglob("*")
            if _is_image_file(match) and not any(part.startswith(".") for part in match.relative_to(path).parts)
        ]
        if not paths:
            raise DatasetError(
                text,
                [f"the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})"],
                "point at the folder holding the images",
            )
    elif path.is_file() and path.suffix.lower() == ".json":
        paths = [_coco_file_path(image["file_name"], path) for image in _coco_images(load_json(path), path)]
        if not paths:
            raise DatasetError(text, ["the COCO JSON lists no images"], "use a JSON whose 'images' list is filled")
    elif path.exists():
        raise DatasetError(
            text,
            ["is neither a folder, a glob pattern nor a COCO .json"],
            "name an image folder, a glob such as 'images/*.jpg', or a COCO JSON",
        )
    else:
        raise DatasetError(text, ["does not exist"], "check the path (relative paths start at the working directory)")
    return sorted(paths, key=lambda match: match.as_posix())


# ---------------------------------------------------------------------------------------
# COCO JSON reading, validation and writing


def load_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``, with the file and position named when it is not one."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(
            path, ["does not exist"], "check the path (relative paths start at the working directory)"
        ) from None
    except UnicodeDecodeError:
        raise DatasetError(path, ["is not a UTF-8 text file"], "point at a COCO instances .json file") from None
    except json.JSONDecodeError as error:
        raise DatasetError(
            path,
            [f"is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"],
            "repair or re-export the JSON",
        ) from None
    if not isinstance(content, dict):
        raise DatasetError(
            path,
            [f"holds a JSON {type(content).__name__}, not an object"],
            "point at a COCO instances JSON ({'images': [...], 'annotations': [...], 'categories': [...]})",
        )
    return content


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_ids(entries: list, key: str, path: Path) -> dict:
    """{id: entry} of a COCO list whose entries need a unique integer ``id`` and a non-empty string ``key``."""
    by_id, problems = {}, []
    for position, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not _is_int(entry.get("id"))
            or not isinstance(entry.get(key), str)
            or not entry[key]
        ):
            problems.append(f"entry {position} needs an integer 'id' and a string '{key}': {str(entry)[:120]}")
        elif entry["id"] in by_id:
            problems.append(f"id {entry['id']} is used twice")
        else:
            by_id[entry["id"]] = entry
    if problems:
        raise DatasetError(path, problems, "give every entry a unique integer 'id' and its required fields")
    return by_id


def _coco_images(coco: dict, path: Path) -> list[dict]:
    images = coco.get("images")
    if not isinstance(images, list):
        raise DatasetError(path, ["has no 'images' list"], "point at a COCO instances JSON")
    return list(_unique_ids(images, "file_name", path).values())


def _bbox_problem(bbox, width: int, height: int, tolerance: float = 1.0) -> str | None:
    """Why a COCO ``[x, y, w, h]`` box cannot be used in a ``width`` x ``height`` image, if it cannot."""
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ):
        return f"bbox {bbox!r} is not [x, y, width, height] numbers"
    if not all(math.isfinite(v) for v in bbox):
        return f"bbox {bbox} holds a non-finite number"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {bbox} has a non-positive width or height"
    if x < -tolerance or y < -tolerance or x + w > width + tolerance or y + h > height + tolerance:
        return f"bbox {bbox} reaches outside the {width}x{height} image"
    return None


def index_coco(annotations: str | os.PathLike, images_root: str | os.PathLike | None, bad_images: str = "fail") -> dict:
    """A user's COCO instances JSON checked against its images, as trtflow's split JSON.

    ``file_name`` becomes ``images_root / file_name``; ``width``/``height`` come from
    the decoded image (a mismatch with the JSON is a bad image: the boxes would be off).
    Structural faults (missing lists, duplicate or non-integer ids) always raise.
    Bad images, and annotations pointing at unknown image or category ids or holding
    unusable boxes, follow ``bad_images``: ``fail`` raises naming all of them; ``skip``
    drops them, listed in ``info["skipped"]`` / ``info["skipped_annotations"]`` (a
    skipped image's annotations go with it). Image files under ``images_root`` that the
    JSON does not list are counted in ``info["unlisted_images"]``. Category ids are
    kept as they are (torchvision's COCO models use the sparse ids 1..90).
    """
    _check_policy(bad_images)
    annotations = Path(annotations)
    if images_root is None:
        raise DatasetError(
            annotations, ["data.images is not set"], "set data.images to the folder holding the images this JSON names"
        )
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise DatasetError(
            images_root, ["is not a folder"], "set data.images to the folder holding the images of data.annotations"
        )
    coco = load_json(annotations)
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(coco.get(key), list)]
    if missing:
        raise DatasetError(
            annotations,
            [f"has no {key!r} list" for key in missing],
            "point at a COCO instances JSON (object detection), not a captions or results file",
        )
    images = _unique_ids(coco["images"], "file_name", annotations)
    categories = _unique_ids(coco["categories"], "name", annotations)
    paths = {image_id: images_root / image["file_name"] for image_id, image in images.items()}
    sizes, bad = _check_coco_images(images, paths, str(annotations))
    kept_annotations, skipped_annotations, dropped_with_images = _check_annotations(
        coco["annotations"], paths, sizes, categories, annotations
    )
    problems = [str(error) for error in bad]
    problems += [f"annotation {entry['id']} {entry['reason']}" for entry in skipped_annotations]
    if problems and bad_images == "fail":
        raise DatasetError(annotations, problems, f"repair or remove the files and entries named, {SKIP_HINT}")
    for problem in problems:
        log.warning("skipped %s", problem)

    kept_images = [
        {
            **image,
            "file_name": paths[image_id].as_posix(),
            "height": sizes[paths[image_id]][0],
            "width": sizes[paths[image_id]][1],
        }
        for image_id, image in images.items()
        if paths[image_id] in sizes
    ]
    listed = {path.resolve() for path in paths.values()}
    unlisted = sum(1 for path in images_root.rglob("*") if _is_image_file(path) and path.resolve() not in listed)
    if unlisted:
        log.warning("%d image files under %s are not listed in %s and are left out", unlisted, images_root, annotations)
    return {
        "info": {
            "source": "coco",
            "annotations": annotations.as_posix(),
            "images": images_root.as_posix(),
            "skipped": [_skipped(error) for error in bad],
            "skipped_annotations": skipped_annotations,
            "annotations_dropped_with_skipped_images": dropped_with_images,
            "unlisted_images": unlisted,
        },
        "images": kept_images,
        "annotations": [
            _with_coco_defaults(annotation, number) for number, annotation in enumerate(kept_annotations, 1)
        ],
        "categories": list(categories.values()),
    }


def _check_coco_images(
    images: dict, paths: dict, source: str
) -> tuple[dict[Path, tuple[int, int]], list[BadImageError]]:
    """Decode a COCO JSON's images: ({path: (height, width)} of usable ones, errors of the others).

    An image whose size differs from the JSON's width/height is unusable: its boxes would be off.
    """
    sizes, bad = _decode_all(list(paths.values()), source)
    for image_id, image in images.items():
        size, declared = sizes.get(paths[image_id]), (image.get("height"), image.get("width"))
        if size is not None and None not in declared and declared != size:
            bad.append(
                BadImageError(
                    paths[image_id],
                    f"is {size[1]}x{size[0]} px but the JSON says {declared[1]}x{declared[0]}"
                    " (EXIF rotation or a resized copy?)",
                    "re-export the image or correct its width/height in the JSON",
                )
            )
            del sizes[paths[image_id]]
    return sizes, bad


def _check_annotations(
    annotations: list, paths: dict, sizes: dict, categories: dict, source: Path
) -> tuple[list[dict], list[dict], int]:
    """(usable annotations, skipped ones as {"id", "image_id", "reason"}, count dropped with skipped images)."""
    kept, skipped, dropped_with_images = [], [], 0
    for position, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise DatasetError(
                source,
                [f"annotation {position} is not an object: {str(annotation)[:120]}"],
                "repair or re-export the JSON",
            )
        image_id, category_id = annotation.get("image_id"), annotation.get("category_id")
        known_image = _is_int(image_id) and image_id in paths
        if known_image and paths[image_id] not in sizes:
            dropped_with_images += 1
            continue
        if not known_image:
            reason = f"points at image id {image_id!r}, which 'images' does not list"
        elif not _is_int(category_id) or category_id not in categories:
            reason = f"points at category id {category_id!r}, which 'categories' does not list"
        else:
            height, width = sizes[paths[image_id]]
            reason = _bbox_problem(annotation.get("bbox"), width, height)
        if reason is None:
            kept.append(annotation)
        else:
            skipped.append({"id": annotation.get("id", f"#{position}"), "image_id": image_id, "reason": reason})
    return kept, skipped, dropped_with_images


def _with_coco_defaults(annotation: dict, number: int) -> dict:
    """An annotation numbered ``number`` (ids unique whatever the source held), with the
    fields COCOeval reads filled where missing: area (box area), iscrowd 0."""
    x, y, w, h = annotation["bbox"]
    return {"area": float(w * h), "iscrowd": 0, **annotation, "id": number}


def index_images(spec: str | os.PathLike, bad_images: str = "fail", categories: list[dict] = ()) -> dict:
    """An images-only COCO JSON (no annotations) for an image folder, glob or COCO JSON,
    e.g. calibration images; bad images follow ``bad_images`` as in :func:`check_images`."""
    paths = list_images(spec)
    sizes, skipped = check_images(paths, bad_images, os.fspath(spec))
    kept = [path for path in paths if path in sizes]
    return {
        "info": {"source": "images", "images": os.fspath(spec), "skipped": skipped},
        "images": [
            {"id": number, "file_name": path.as_posix(), "height": sizes[path][0], "width": sizes[path][1]}
            for number, path in enumerate(kept, 1)
        ],
        "annotations": [],
        "categories": list(categories),
    }


# ---------------------------------------------------------------------------------------
# The demo data set: synthetic shapes


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


# ---------------------------------------------------------------------------------------
# The pipeline's evaluation and calibration splits


def dataset_categories(data: dict) -> list[dict]:
    """The categories the val split of the ``data:`` config will list, known before rule `data` runs (so that
    the engines record class names without waiting for it): the demo's shapes, the user's annotations'
    categories, none for images without annotations."""
    if data["source"] == "demo":
        return DEMO_CATEGORIES
    if not data.get("annotations"):
        return []
    try:
        categories = load_json(data["annotations"]).get("categories")
    except DatasetError:  # rule `data` refuses the file with the full story, before any engine is built
        return []
    return categories if isinstance(categories, list) else []


def prepare_data(
    data: dict, val_json: str | os.PathLike, calib_json: str | os.PathLike, calibration_images: str | None = None
) -> None:
    """Write the val and calib split JSONs from the ``data:`` config section.

    val: the demo split, or the user's ``images`` + ``annotations`` (images-only when
    ``annotations`` is unset). calib: ``calibration_images`` (folder, glob or COCO JSON)
    when given, else the demo calib split, else (user data) the val images.
    """
    if data["source"] == "demo":
        val = make_demo_split("val", data["demo"]["num_val"], data["demo"]["seed"], val_json)
    else:
        if data.get("annotations"):
            val = index_coco(data["annotations"], data.get("images"), data["bad_images"])
        else:
            if not data.get("images"):
                raise DatasetError(
                    "config.yaml",
                    ["data.source is coco but data.images is not set"],
                    "set data.images (and data.annotations for mAP)",
                )
            log.warning("data.annotations is not set: val has no annotations, so no mAP can be computed")
            val = index_images(data["images"], data["bad_images"])
        write_json(val_json, val, indent=1, sort_keys=False)
        log.info(
            "val: %d images, %d annotations, %d skipped",
            len(val["images"]),
            len(val["annotations"]),
            len(val["info"]["skipped"]),
        )
    if calibration_images:
        calib = index_images(calibration_images, data["bad_images"], val["categories"])
    elif data["source"] == "demo":
        make_demo_split("calib", data["demo"]["num_calib"], data["demo"]["seed"], calib_json)
        return
    else:
        log.warning(
            "calibration.images is not set: calibrating on the val images, so INT8 accuracy on val is optimistic"
        )
        calib = {**val, "info": {**val["info"], "calibration": "val images (calibration.images unset)"}}
    write_json(calib_json, calib, indent=1, sort_keys=False)
    log.info("calib: %d images, %d skipped", len(calib["images"]), len(calib["info"]["skipped"]))
