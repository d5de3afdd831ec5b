"""The `data` stage: the pipeline's evaluation and calibration splits, from the demo shapes or users' COCO data.

Every split the pipeline uses is a COCO instances JSON under ``results/data/``
(``val.json``, ``calib.json``, ``train.json``) whose ``images[].file_name`` is a path
relative to the working directory (or absolute for user data), so any stage opens an
image with ``read_image(image["file_name"])`` (:mod:`trtflow.common.images`) from the working directory.
"""

from __future__ import annotations

import logging
import os

from trtflow.artifacts import write_json
from trtflow.build.demo_data import DEMO_CATEGORIES, make_demo_split
from trtflow.common.coco import DatasetError, index_coco, index_images, load_json

log = logging.getLogger(__name__)


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
