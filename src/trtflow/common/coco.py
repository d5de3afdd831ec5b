"""Users' data sets as COCO JSON: image listing (folder, glob or COCO JSON), COCO instances JSONs read and
checked against their images, and both indexed as trtflow's split JSON.

Data sets apply the ``bad_images`` policy: ``fail`` raises one :class:`DatasetError` naming every offender,
``skip`` leaves them out and lists them in the split JSON's ``info["skipped"]``.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from pathlib import Path

from tqdm import tqdm

from trtflow.common.images import BadImageError, read_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
BAD_IMAGE_POLICIES = ("fail", "skip")
SKIP_HINT = (
    "or set `data.bad_images: skip` in config.yaml to leave them out "
    "(each is then listed in the split JSON's info.skipped)"
)


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
