"""Stage `verify`: every precision's detections against the PyTorch reference, on the val split.

The strongest executor this machine can run for the plan (`trtflow.run.executors.choose_executor`) runs through
`trtflow.run.detection_loop.detect_dataset`, the same pre- and postprocessing as the reference. Its detections are
matched to the reference's (`trtflow.run.matching`: same image, same class, IoU >= `verify.match_iou`) giving match
recall / precision, |Δscore| and box IoU of the matched pairs; both sets are scored with COCO mAP. Thresholds per
precision come from config. An output no head can give (`trtflow.run.detection_loop.ImpossibleOutput`: a label outside the
classes, a non-finite box or score, more detections than rows) is a failed verdict with its reason, not a crash.

The JSON claims the level of the executor that ran (`verified_level`, one of `trtflow.run.executors.LEVELS`) and says
what that level leaves unverified. `passed` means the thresholds held at that level; `verify.require` names the
least level a run accepts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from trtflow.artifacts import software_versions, write_json
from trtflow.common.metrics import coco_map, label_categories
from trtflow.run.detection_loop import ImpossibleOutput, detect_images
from trtflow.run.executors import ExecutorChoice, choose_executor
from trtflow.run.levels import LEVELS
from trtflow.run.matching import match_detections
from trtflow.run.subset import check_shards, images_of_shard, subset_claims, val_subset

log = logging.getLogger(__name__)


class VerifyError(RuntimeError):
    """A precision falls below its verify thresholds."""


# --------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class Thresholds:
    """A precision's pass criteria (config `verify.thresholds.<precision>`); unset ones are not checked.

    `max_abs_dscore` bounds |deployed score - reference score| over the matched pairs (none matched: nothing to
    bound, recall says it); the scores compared are COCO results', written to 5 decimals, so 1e-5 is one step.
    `max_map_drop_points` is in COCO mAP points (0-100 scale): 0.5 allows mAP 0.849 -> 0.844.
    """

    min_match_recall: float | None = None
    min_match_precision: float | None = None
    max_abs_dscore: float | None = None
    max_map_drop_points: float | None = None

    @classmethod
    def from_config(cls, section: Mapping | None) -> Thresholds:
        return cls(**(section or {}))

    def failures(self, result: Mapping) -> list[str]:
        found = []
        if self.min_match_recall is not None and result["match_recall"] < self.min_match_recall:
            found.append(f"match_recall {result['match_recall']:.4f} < {self.min_match_recall}")
        if self.min_match_precision is not None and result["match_precision"] < self.min_match_precision:
            found.append(f"match_precision {result['match_precision']:.4f} < {self.min_match_precision}")
        dscore = result["max_abs_dscore"]
        if self.max_abs_dscore is not None and dscore is not None and dscore > self.max_abs_dscore:
            found.append(f"max_abs_dscore {dscore:.5f} > {self.max_abs_dscore}")
        if self.max_map_drop_points is not None and result["map_drop_points"] > self.max_map_drop_points:
            found.append(f"mAP drop {result['map_drop_points']:.2f} points > {self.max_map_drop_points}")
        return found


# --------------------------------------------------------------------------- the stage


def detect_shard(
    precision: str,
    chosen: ExecutorChoice,
    *,
    val_json: str | Path,
    subset: Mapping | None = None,
    shard: int = 0,
    preprocess: dict,
    postprocess: dict,
    batch_size: int = 8,
) -> dict:
    """The `chosen` executor over one shard of the val images verification runs on (`trtflow.run.subset`;
    `subset`: config `verify:`, None: all images, one shard): {"images": their ids, "ran": what ran (executor,
    level, details, software), "detections"} or, where it gave what no head can, "impossible_output" in place of
    the detections."""
    executor = chosen.executor
    ran = {
        "precision": precision,
        "executor": executor.name,
        **chosen.status(),
        "executor_details": dict(executor.details),
        "software": software_versions(),
    }
    coco = json.loads(Path(val_json).read_text())
    images = images_of_shard(coco, subset, shard)
    found = {"images": [image["id"] for image in images], "ran": ran}
    try:
        detections = detect_images(
            executor,
            images,
            label_categories(coco),
            preprocess,
            postprocess,
            batch_size=batch_size,
            desc=f"verify {precision} ({executor.name})",
        )
    except ImpossibleOutput as error:  # a wrong network: a verdict, not a crash
        return {**found, "impossible_output": str(error)}
    return {**found, "detections": detections}


def verify_shards(
    precision: str,
    shards: list[dict],
    *,
    val_json: str | Path,
    subset: Mapping | None = None,
    sources: list[str] | None = None,
    reference_detections: str | Path,
    reference_metrics: str | Path,
    thresholds: Thresholds,
    match_iou: float = 0.9,
) -> tuple[dict, list[dict]]:
    """The verdict of the executor's detections, gathered from `shards` (`detect_shard`'s, in order; `sources`
    names their files), against the reference (its detections, and the COCO metrics the reference stage computed
    from them): (verify result, deployed detections).

    An output no head can give (`trtflow.run.detection_loop.ImpossibleOutput`) is a failed verdict: the result says
    `passed: false`, its reason under `impossible_output` and `failures`, and holds no detections or numbers."""
    coco = json.loads(Path(val_json).read_text())
    chosen = val_subset(coco, subset or {})
    sources = sources or [f"shard {index}" for index in range(len(shards))]
    check_shards([shard["images"] for shard in shards], chosen, sources)
    ran = shards[0]["ran"]
    differing = [source for shard, source in zip(shards, sources) if shard["ran"] != ran]
    if differing:
        raise VerifyError(
            f"{precision}: the shards {differing} ran another executor, level or software than the first shard: one "
            "verdict claims one level; run the verify shards on alike machines, or unset verify.shard_images"
        )
    held = {key: value for key, value in asdict(thresholds).items() if value is not None}
    impossible = next((shard["impossible_output"] for shard in shards if "impossible_output" in shard), None)
    if impossible is not None:
        failure = f"impossible output: {impossible}"
        return {**ran, "impossible_output": impossible, "thresholds": held, "failures": [failure], "passed": False}, []
    deployed = [detection for shard in shards for detection in shard["detections"]]
    reference = json.loads(Path(reference_detections).read_text())
    matching = match_detections(reference, deployed, match_iou)
    ground_truth = chosen.coco(coco)
    metrics = coco_map(ground_truth, deployed, source=val_json)
    reference_metrics = json.loads(Path(reference_metrics).read_text())
    result = {
        **ran,
        "images": metrics["images"],
        **matching.summary(),
        "match_iou": match_iou,
        "mAP": metrics["mAP"],
        "mAP50": metrics["mAP50"],
        "reference_mAP": reference_metrics["mAP"],
        "reference_mAP50": reference_metrics["mAP50"],
        "map_drop_points": 100.0 * (reference_metrics["mAP"] - metrics["mAP"]),
        **subset_claims(chosen, ground_truth, reference, deployed, matching),
        "thresholds": held,
    }
    result["failures"] = thresholds.failures(result)
    result["passed"] = not result["failures"]
    return result, deployed


def verify_detections(
    precision: str,
    chosen: ExecutorChoice,
    *,
    val_json: str | Path,
    reference_detections: str | Path,
    reference_metrics: str | Path,
    preprocess: dict,
    postprocess: dict,
    thresholds: Thresholds,
    match_iou: float = 0.9,
    batch_size: int = 8,
    subset: Mapping | None = None,
) -> tuple[dict, list[dict]]:
    """Run the `chosen` executor over the val images verification runs on (`subset`: config `verify:`; None: all)
    in one shard, and judge its detections (`verify_shards`)."""
    shard = detect_shard(
        precision,
        chosen,
        val_json=val_json,
        subset={**(subset or {}), "shard_images": None},
        preprocess=preprocess,
        postprocess=postprocess,
        batch_size=batch_size,
    )
    return verify_shards(
        precision,
        [shard],
        val_json=val_json,
        subset=subset,
        reference_detections=reference_detections,
        reference_metrics=reference_metrics,
        thresholds=thresholds,
        match_iou=match_iou,
    )


def checked_choice(precision: str, plan, *, network, onnx, weights_dir, settings: Mapping) -> ExecutorChoice:
    """The strongest executor that runs here for the plan; refused below `settings["require"]` (a LEVELS name)."""
    chosen = choose_executor(
        precision,
        plan,
        network=network,
        onnx=onnx,
        weights_dir=weights_dir,
        cuda_graph=settings.get("cuda_graph", False),
    )
    required = settings.get("require", LEVELS[0])
    if LEVELS.index(chosen.level) < LEVELS.index(required):
        raise VerifyError(
            f"verify.require is {required} but the {precision} plan can only be verified at level "
            f"{chosen.level} here: {'; '.join(chosen.reasons)}"
        )
    return chosen


def run_verify_shard(
    precision: str,
    shard: int,
    *,
    plan,
    onnx,
    weights_dir,
    val_json,
    preprocess: dict,
    postprocess: dict,
    settings: Mapping,
    out_json,
    network=None,
) -> dict:
    """Rule `verify_shard`: the executor over shard `shard` of the images (`detect_shard`), written to `out_json`
    for rule `verify` to gather."""
    chosen = checked_choice(precision, plan, network=network, onnx=onnx, weights_dir=weights_dir, settings=settings)
    found = detect_shard(
        precision,
        chosen,
        val_json=val_json,
        subset=settings,
        shard=shard,
        preprocess=preprocess,
        postprocess=postprocess,
        batch_size=settings.get("batch_size", 8),
    )
    write_json(out_json, found)
    return found


def run_verify(
    precision: str,
    *,
    plan,
    onnx,
    weights_dir,
    val_json,
    reference_detections,
    reference_metrics,
    preprocess: dict,
    postprocess: dict,
    thresholds: Thresholds,
    enforce: bool = True,
    settings: Mapping,
    out_json,
    detections_out,
    network=None,
    shards: list | None = None,
) -> dict:
    """Rule `verify`: choose the executor, compare, write results/verify/{precision}.json and the deployed
    detections; with `shards` (the files of rule verify_shard, in order), gather them instead of running the
    executor. Fails (after logging the numbers) below the precision's thresholds where `enforce` (config
    `verify.enforce` lists the precision; otherwise the JSON says `passed: false` and the log warns), and when
    the strongest executor that runs here is below `settings["require"]` (a LEVELS name).

    `settings`: config `verify:` (match_iou, batch_size, require, cuda_graph, num_images, seed, shard_images).
    """
    if shards:
        result, deployed = verify_shards(
            precision,
            [json.loads(Path(path).read_text()) for path in shards],
            val_json=val_json,
            subset=settings,
            sources=[str(path) for path in shards],
            reference_detections=reference_detections,
            reference_metrics=reference_metrics,
            thresholds=thresholds,
            match_iou=settings.get("match_iou", 0.9),
        )
    else:
        chosen = checked_choice(precision, plan, network=network, onnx=onnx, weights_dir=weights_dir, settings=settings)
        result, deployed = verify_detections(
            precision,
            chosen,
            val_json=val_json,
            reference_detections=reference_detections,
            reference_metrics=reference_metrics,
            preprocess=preprocess,
            postprocess=postprocess,
            thresholds=thresholds,
            match_iou=settings.get("match_iou", 0.9),
            batch_size=settings.get("batch_size", 8),
            subset=settings,
        )
    print(json.dumps(result, indent=2))
    write_json(detections_out, deployed)
    write_json(out_json, result)
    level = f"{result['executor']}, level {result['verified_level']}"
    if not result["passed"] and not enforce:
        log.warning(
            "%s (%s) fails verification (%s) but verify.enforce does not list it",
            precision,
            level,
            "; ".join(result["failures"]),
        )
    elif "impossible_output" in result:
        raise VerifyError(f"{precision} ({level}) fails verification: {result['failures'][0]}")
    elif not result["passed"]:
        raise VerifyError(
            f"{precision} ({level}) fails verification: {'; '.join(result['failures'])} "
            f"(thresholds: verify.thresholds.{precision} in config.yaml; all numbers in the log above)"
        )
    return result
