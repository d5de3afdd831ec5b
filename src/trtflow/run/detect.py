"""`trtflow detect`: a plan on image files, with the pipeline's own pre- and postprocessing.

Everything comes from the plan's JSON (`trtflow.formats.usage`): the preprocessing, the postprocessing and the class
names. The plan runs where this machine can run it; where it cannot, `detect_files` says why and, with
`fallback`, runs the best executor that can (`trtflow.run.executors.choose_executor`, verify's ladder, given the
network record, ONNX and head weights the JSON names: the TensorRT network definition where it was recorded); the
result names the executor that ran and its verification level. Images are read by `trtflow.common.images.read_image`,
so a bad file is named with the same message as in the pipeline, and left out while the rest are detected on; an
output no head can give (a label outside the plan's classes, a non-finite box or score, more detections than rows) is
refused with verify's reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2

from trtflow.artifacts import files_sha256, write_bytes, write_json
from trtflow.common.coco import DatasetError, list_images
from trtflow.common.images import BadImageError, read_image
from trtflow.formats.plan_metadata import PlanMetadata, metadata_path
from trtflow.precisions import PRECISIONS
from trtflow.run.detection_loop import ImpossibleOutput, detect_images
from trtflow.run.drawing import DEPLOYED_COLOR, bgr
from trtflow.run.executors import choose_executor
from trtflow.run.runtime import EngineRefused, read_metadata

log = logging.getLogger(__name__)
BOX_COLOR = bgr(DEPLOYED_COLOR)  # the report's deployed-box red


class DetectError(ValueError):
    """The plan, its JSON or its sources cannot serve `trtflow detect`; the message names the file and the fix."""


def usage_of(plan: Path) -> PlanMetadata:
    """The plan's JSON, checked for what detect reads (a plan built outside the pipeline lacks it)."""
    if not plan.is_file():
        precision = plan.stem.removeprefix("engine_")
        build = (
            f"snakemake -f {plan}"
            if plan.name.startswith("engine_") and plan.suffix == ".plan" and precision in PRECISIONS
            else f"snakemake -f results/engine_<precision>.plan, <precision> one of {', '.join(PRECISIONS)}"
        )
        raise DetectError(f"the plan {plan} does not exist; build it with the pipeline ({build})")
    metadata = read_metadata(plan)
    missing = [key for key in ("preprocess", "postprocess", "classes") if getattr(metadata, key) is None]
    if missing:
        raise DetectError(
            f"{metadata_path(plan)} has no {', '.join(missing)}: the plan was built outside the pipeline, so its "
            f"JSON does not say how to use it; build it with the pipeline (snakemake -f {plan})"
        )
    return metadata


def source_path(record: Mapping | None, what: str, plan: Path) -> Path:
    """A file the plan's JSON names under `sources` (a path relative to the pipeline's working directory): found
    from here, beside the plan (by its file name) or from a folder above the plan; its sha256 must be the recorded
    one."""
    if record is None:
        raise DetectError(
            f"{metadata_path(plan)} names no {what}: a features-only plan has no deployment "
            "form to fall back to; run it where the plan runs"
        )
    recorded = Path(record["path"])
    candidates = [recorded, plan.parent / recorded.name] + [folder / recorded for folder in plan.resolve().parents]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        raise DetectError(
            f"the {what} {recorded} that {plan} was built from is not found here, beside the plan nor above "
            f"{plan.parent}; run from the pipeline's folder, or copy it (or results/) with the plan"
        )
    if files_sha256(path) != record["sha256"]:
        raise DetectError(
            f"{path} is not the {what} {plan} was built from (sha256 {files_sha256(path)[:12]}…, "
            f"the plan's JSON records {record['sha256'][:12]}…); rebuild the plan (snakemake -f {plan})"
        )
    return path


def fallback_sources(plan: Path, metadata: PlanMetadata) -> dict[str, Path | None]:
    """What `choose_executor` falls back to, from the files the plan's JSON names: the network record (where one was
    written), then the features ONNX and head weights folder of the deployment-form rung. Those two are needed only
    where there is no record: beside one, a missing or changed file leaves that rung out (None) with a warning
    saying why."""
    recorded = metadata.network_record
    network = source_path(recorded, "network record", plan) if recorded else None
    try:
        onnx = source_path(metadata.sources["onnx"], "features ONNX", plan)
        weights_dir = source_path(metadata.sources["head_weights"], "head weights manifest", plan).parent
    except DetectError as missing:
        if network is None:
            raise
        log.warning("the deployment-form rung of --fallback is left out: %s", missing)
        return {"network": network, "onnx": None, "weights_dir": None}
    return {"network": network, "onnx": onnx, "weights_dir": weights_dir}


def draw(image_bgr, detections: Sequence[Mapping], names: Mapping[int, str]):
    """The image with each detection's box, class name and score."""
    canvas = image_bgr.copy()
    for entry in detections:
        x, y, w, h = (round(v) for v in entry["bbox"])
        cv2.rectangle(canvas, (x, y), (x + w, y + h), BOX_COLOR, 2)
        label = f"{names.get(entry['category_id'], entry['category_id'])} {entry['score']:.2f}"
        cv2.putText(canvas, label, (x, max(12, y - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, BOX_COLOR, 1, cv2.LINE_AA)
    return canvas


def image_files(inputs: Sequence[str | Path]) -> tuple[list[Path], list[dict]]:
    """The image files the inputs name, in order: a file as is; a folder (its images, recursively), a glob pattern
    or a COCO JSON through `trtflow.common.coco.list_images`, sorted. An input that names none, or a file that
    `read_image` refuses, is left out as {"file_name", "reason"} in the second list."""
    files, skipped = [], []
    for spec in inputs:
        path = Path(spec)
        try:
            named = [path] if path.is_file() and path.suffix.lower() != ".json" else list_images(spec)
        except DatasetError as error:
            skipped.append({"file_name": str(spec), "reason": str(error).replace("\n", " ")})
            continue
        for file in named:
            try:
                read_image(file)  # a bad image is reported before any model loads
            except (BadImageError, OSError) as error:
                skipped.append({"file_name": str(file), "reason": str(error)})
            else:
                files.append(file)
    return files, skipped


def detect_files(
    plan: str | Path,
    images: Sequence[str | Path],
    *,
    out_json: str | Path | None = None,
    coco_results: str | Path | None = None,
    draw_dir: str | Path | None = None,
    fallback: bool = False,
    batch_size: int = 8,
    score_thresh: float = 0.0,
) -> dict:
    """COCO-style detections of the plan (or, with `fallback`, its best runnable stand-in) on `images` (files,
    folders, glob patterns or COCO JSONs: see `image_files`).

    Returns {"plan", "precision", "executor", "engine_executed", ..., "images": [{"id", "file_name"}],
    "categories", "detections": COCO results, "skipped": [{"file_name", "reason"}], "seconds": {"detect",
    "per_image"}} (seconds: the wall time from reading the images to the postprocessed detections, in all and per
    image); written to `out_json` when given, the detections alone (the list pycocotools' `COCO.loadRes` takes) to
    `coco_results` when given, and each image drawn with its boxes into `draw_dir/<stem>.png` when given. Image ids
    are 1.. over the images read, in the order given; detections scoring below `score_thresh` are left out of all
    three.
    """
    plan = Path(plan)
    metadata = usage_of(plan)
    files, skipped = image_files(images)
    if not files:
        reasons = "; ".join(entry["reason"] for entry in skipped) or "no inputs"
        raise DetectError(f"no usable image among the inputs ({reasons}); name image files, folders or globs")
    entries = [{"id": number, "file_name": str(path)} for number, path in enumerate(files, 1)]
    stems = [path.stem for path in files]
    if draw_dir is not None and len(set(stems)) < len(stems):
        raise DetectError(
            f"--draw {draw_dir}: two images share a file name stem ({stems}); each is drawn into "
            "<stem>.png, so give them distinct names"
        )
    try:
        chosen = choose_executor(
            metadata.precision, plan, fallback=fallback, **(fallback_sources(plan, metadata) if fallback else {})
        )
    except EngineRefused as refused:  # only without fallback: the ladder takes the next level otherwise
        raise DetectError(
            f"{refused}; the plan cannot run on this machine; pass --fallback to run the best "
            "executor that can (named in the output)"
        ) from None
    executor = chosen.executor
    if chosen.level != "engine":
        log.warning("%s does not run here: the detections are %s's", plan, executor.name)
    classes = metadata.classes
    started = time.perf_counter()
    try:
        detections = detect_images(
            executor,
            entries,
            {entry["label"]: entry["category_id"] for entry in classes},
            metadata.preprocess,
            metadata.postprocess,
            batch_size=batch_size,
            desc=f"detect ({executor.name})",
        )
    except ImpossibleOutput as error:  # the reason verify would fail the plan for
        raise DetectError(f"{executor.name} (level {chosen.level}) gave an impossible output: {error}") from None
    seconds = time.perf_counter() - started  # reading, preprocessing, the executor and postprocessing
    detections = [entry for entry in detections if entry["score"] >= score_thresh]
    result = {
        "plan": str(plan),
        "precision": metadata.precision,
        "executor": executor.name,
        **chosen.status(),
        "executor_details": dict(executor.details),
        "images": entries,
        "categories": [{"id": entry["category_id"], "name": entry["name"]} for entry in classes],
        "detections": detections,
        "skipped": skipped,
        "seconds": {"detect": round(seconds, 3), "per_image": round(seconds / len(entries), 4)},
    }
    if out_json is not None:
        write_json(out_json, result)
    if coco_results is not None:
        write_json(coco_results, detections, sort_keys=False)
    if draw_dir is not None:
        names = {entry["category_id"]: entry["name"] for entry in classes}
        for entry, stem in zip(entries, stems):
            drawn = draw(read_image(entry["file_name"]), [d for d in detections if d["image_id"] == entry["id"]], names)
            write_bytes(Path(draw_dir) / f"{stem}.png", cv2.imencode(".png", drawn)[1].tobytes())
    return result
