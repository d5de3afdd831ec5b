"""What a runtime needs to use a plan without this repository, kept in the plan's JSON (results/engine_*.json).

`plan_usage` describes the input (name, shape, dtype, NCHW layout), the exact preprocessing of
`trtflow.common.preprocess`, the class names, what each output means, the postprocessing the pipeline applies
(`trtflow.common.postprocess`), the TensorRT version and GPUs the plan runs on, and the equivalent trtexec command.
The engine stage writes it into the plan's `trtflow.formats.plan_metadata.PlanMetadata`; it is plain data, so a runtime
without this repository reads it, and the run side reads it back through that format without the build side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from trtflow.backend import COMMAND_LINE_RUNNERS

INPUT_MEANING = (
    "preprocessed images, float32 NCHW: see `preprocess` (keep-ratio resize into height x width, "
    "content at the top-left, pad_value on the right and bottom, colour order, (x/255 - mean) / std)"
)
OUTPUT_MEANINGS = {
    "num_detections": "detections per image (int32); rows of boxes/scores/classes beyond it are padding (score 0)",
    "boxes": "x1, y1, x2, y2 per detection in network-input pixels; original pixels: x / ratio of the letterbox "
    "(ratio = min(height / image height, width / image width)), clipped to the image",
    "scores": "the detection's class score, per image in decreasing order",
    "classes": "the model label of the detection: `label` in `classes` (0, background, never occurs)",
}
PREPROCESS_STEPS = (
    "decode to 8-bit BGR as cv2.imread does (EXIF orientation applied, grey repeated, alpha dropped)",
    "ratio = min(height / image height, width / image width); resize to (round(h * ratio), round(w * ratio)) with "
    "cv2.INTER_AREA when shrinking, cv2.INTER_LINEAR when enlarging",
    "place it at the top-left of a height x width canvas filled with pad_value (padding right and bottom)",
    "reorder channels to `color`, scale to 0..1 (x / 255), subtract mean and divide by std per channel",
    "HWC -> CHW, stack images into the batch",
)
POSTPROCESS_STEPS = (
    "keep the first num_detections rows of each image",
    "drop scores <= score_thresh, per-class NMS at iou_thresh, keep the max_detections best",
    "map boxes to original pixels (divide by the letterbox ratio) and clip to the image; drop zero-area boxes",
)


def classes_of(categories: Sequence[Mapping]) -> list[dict]:
    """Model label -> COCO category, as `trtflow.common.metrics.category_labels` numbers them (1.. in sorted id order)."""
    return [
        {"label": label, "category_id": category["id"], "name": category["name"]}
        for label, category in enumerate(sorted(categories, key=lambda c: c["id"]), 1)
    ]


def shapes_argument(inputs: Sequence[Mapping]) -> str:
    """trtexec's --shapes: each input at its profile's opt shape (its static shape where it has no profile)."""
    return ",".join(
        f"{entry['name']}:" + "x".join(str(d) for d in entry.get("profile", {}).get("opt", entry["shape"]))
        for entry in inputs
    )


def plan_usage(
    inputs: Sequence[Mapping],
    outputs: Sequence[Mapping],
    *,
    backend: str,
    backend_version: str,
    compute_capabilities: Sequence[str],
    plan_path: str | Path,
    usage: Mapping | None,
) -> dict:
    """The fields of `trtflow.formats.plan_metadata.PlanMetadata` a runtime reads, from what the build knows (the network's
    `inputs` and `outputs`, the backend and the GPUs the plan targets) and the pipeline's `usage` ({"preprocess":
    preprocess settings, "postprocess": config postprocess:, "categories": the data set's COCO categories}); without
    `usage` (a plan built outside the pipeline) those three are None."""
    usage = usage or {}
    preprocess, postprocess = usage.get("preprocess"), usage.get("postprocess")
    categories = usage.get("categories")
    runner = COMMAND_LINE_RUNNERS.get(backend, "trtexec")
    return {
        "inputs": [{**entry, "layout": "NCHW", "meaning": INPUT_MEANING} for entry in inputs],
        "outputs": [
            {**entry, "meaning": OUTPUT_MEANINGS.get(entry["name"], "a debug output (engine.debug_outputs)")}
            for entry in outputs
        ],
        "preprocess": None if preprocess is None else {**preprocess, "steps": list(PREPROCESS_STEPS)},
        "postprocess": None if postprocess is None else {**postprocess, "steps": list(POSTPROCESS_STEPS)},
        "classes": None if categories is None else classes_of(categories),
        "runtime": {
            "backend": backend,
            "version": backend_version,
            "compute_capabilities": compute_capabilities,
            "command": f"{runner} --loadEngine={Path(plan_path).name} --shapes={shapes_argument(inputs)}",
        },
    }
