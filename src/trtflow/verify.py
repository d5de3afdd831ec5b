"""Stage `verify`: every precision's detections against the PyTorch reference, on the val split.

The deployed executor runs through `trtflow.detection_loop.detect_dataset`, the same pre- and
postprocessing as the reference. Its detections are matched to the reference's (same image, same
class, IoU >= `verify.match_iou`, greedy: reference detections in descending score each take the
best-overlapping unmatched deployed one) giving match recall / precision, |Δscore| and box IoU of
the matched pairs; both sets are scored with COCO mAP. Thresholds per precision come from config. An output no
head can give (`trtflow.executors.ImpossibleOutput`: a label outside the classes, a non-finite box or score, more
detections than rows) is a failed verdict with its reason, not a crash.

Which executor, strongest first, and the level the JSON claims (`verified_level`):
- ``engine``: the plan ran (`trtflow.runtime`, a GPU it was built for);
- ``network-definition``: the exact TensorRT network the plan was built from, evaluated layer by layer
  (`trtflow.netexec`, from the record beside the plan): what remains unverified is TensorRT's own
  compilation of that network;
- ``deployment-form``: only the algorithm's twin (ONNX Runtime + StaticHead, the engine's inputs and head
  dtype): neither the plan nor the TensorRT network ran.
`passed` means the thresholds held at that level; `verify.require` names the least level a run accepts.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from trtflow.artifacts import software_versions, write_json
from trtflow.detection_loop import detect_dataset
from trtflow.executors import (
    Executor,
    ImpossibleOutput,
    default_device,
    network_definition_executor,
    onnxruntime_static_head_executor,
    tensorrt_executor,
)
from trtflow.head import PRECISIONS, head_dtype
from trtflow.head_weights import load_head
from trtflow.metrics import coco_map
from trtflow.netexec import NetworkExecutionError
from trtflow.runtime import EngineRefused

log = logging.getLogger(__name__)

LEVELS = ("deployment-form", "network-definition", "engine")  # weakest first
UNVERIFIED = {
    "engine": None,
    "network-definition": "TensorRT's compilation of this network (layer fusion, kernel choice, reduced-precision "
    "kernels) did not run here",
    "deployment-form": "neither the plan nor the TensorRT network definition ran here: only the algorithm's "
    "ONNX Runtime + PyTorch twin was checked",
}


class VerifyError(RuntimeError):
    """A precision falls below its verify thresholds."""


# --------------------------------------------------------------------------- matching


def xyxy(boxes_xywh: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 4) x (m, 4) x1y1x2y2 -> (n, m) IoU; pairs of zero union give 0."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def zero_area(entry: Mapping) -> bool:
    """A box the postprocessing clipped to nothing (it lay in the letterbox padding): IoU cannot compare it."""
    return entry["bbox"][2] <= 0 or entry["bbox"][3] <= 0


@dataclass
class Matching:
    """Deployed detections matched one-to-one to reference detections (COCO results entries)."""

    reference: int  # number of reference detections of positive area
    deployed: int  # number of deployed detections of positive area
    pairs: list[tuple[int, int]]  # (reference index, deployed index)
    dscores: np.ndarray  # deployed score - reference score, per pair
    ious: np.ndarray  # box IoU, per pair
    zero_area: tuple[int, int] = (0, 0)  # (reference, deployed) detections left out: boxes of zero area

    @property
    def recall(self) -> float:
        """Share of reference detections found again; 1 when the reference has none."""
        return len(self.pairs) / self.reference if self.reference else 1.0

    @property
    def precision(self) -> float:
        """Share of deployed detections that match a reference one; 1 when none were deployed."""
        return len(self.pairs) / self.deployed if self.deployed else 1.0

    def summary(self) -> dict:
        matched = len(self.pairs)
        return {
            "reference_detections": self.reference,
            "deployed_detections": self.deployed,
            "matched": matched,
            "match_recall": self.recall,
            "match_precision": self.precision,
            "mean_abs_dscore": float(np.abs(self.dscores).mean()) if matched else None,
            "max_abs_dscore": float(np.abs(self.dscores).max()) if matched else None,
            "mean_iou": float(self.ious.mean()) if matched else None,
            "zero_area_detections": {"reference": self.zero_area[0], "deployed": self.zero_area[1]},
        }


def match_detections(reference: list[dict], deployed: list[dict], iou_thresh: float = 0.9) -> Matching:
    """Greedy one-to-one matching within each (image, category): reference detections by descending score
    each take the unmatched deployed detection of highest IoU, if that IoU >= `iou_thresh`.

    Zero-area boxes (detections in the letterbox padding, clipped away) have no IoU; they are counted
    apart, not matched."""
    groups: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for side, entries in enumerate((reference, deployed)):
        for index, entry in enumerate(entries):
            if not zero_area(entry):
                groups[entry["image_id"], entry["category_id"]][side].append(index)
    pairs = []
    for ref_indices, dep_indices in groups.values():
        if not ref_indices or not dep_indices:
            continue
        ref_indices = sorted(ref_indices, key=lambda i: -reference[i]["score"])
        overlap = iou_matrix(
            xyxy([reference[i]["bbox"] for i in ref_indices]), xyxy([deployed[j]["bbox"] for j in dep_indices])
        )
        taken = np.zeros(len(dep_indices), bool)
        for row, ref_index in enumerate(ref_indices):
            candidates = np.where(taken, -1.0, overlap[row])
            best = int(np.argmax(candidates))
            if candidates[best] >= iou_thresh:
                taken[best] = True
                pairs.append((ref_index, dep_indices[best], float(overlap[row, best])))
    pairs.sort()
    degenerate = (sum(map(zero_area, reference)), sum(map(zero_area, deployed)))
    return Matching(
        reference=len(reference) - degenerate[0],
        deployed=len(deployed) - degenerate[1],
        pairs=[(r, d) for r, d, _ in pairs],
        dscores=np.array([deployed[d]["score"] - reference[r]["score"] for r, d, _ in pairs], np.float64),
        ious=np.array([iou for _, _, iou in pairs], np.float64),
        zero_area=degenerate,
    )


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


# --------------------------------------------------------------------------- executors


def float16_runs_on(device: torch.device) -> str | None:
    """None where float16 matmul and convolution run on `device`, else the error that says why not."""
    try:
        x = torch.ones(1, 2, 4, 4, dtype=torch.float16, device=device)
        torch.nn.functional.conv2d(x, torch.ones(2, 2, 1, 1, dtype=torch.float16, device=device))
        x.flatten(1) @ torch.ones(32, 2, dtype=torch.float16, device=device)
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return None


def deployment_executor(
    precision: str, onnx: str | Path, weights_dir: str | Path, *, device: str | torch.device | None = None
) -> Executor:
    """The deployment-form reference as the engine of `precision` is built: `onnx` is features.onnx for fp32
    and fp16, features.qdq.onnx for int8; the head runs float32 for fp32, float16 otherwise. Where the
    head's device cannot run float16 it runs float32 and `details["note"]` says so."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    device = torch.device(device) if device is not None else default_device()
    dtype, note = head_dtype(precision), None
    if dtype == "float16" and (problem := float16_runs_on(device)):
        dtype, note = "float32", f"float16 head does not run on {device} ({problem}): head ran in float32"
    manifest, tensors = load_head(weights_dir)
    return onnxruntime_static_head_executor(onnx, manifest, tensors, head_dtype=dtype, device=device).with_note(note)


def level_status(level: str, reasons: list[str]) -> dict:
    """What a verify result says of what ran: its level, what that leaves unverified, why nothing stronger ran."""
    status = {"verified_level": level, "engine_executed": level == "engine", "unverified": UNVERIFIED[level]}
    return status | ({"reason": "; ".join(reasons)} if reasons else {})


def choose_executor(
    precision: str,
    *,
    plan: str | Path,
    onnx: str | Path,
    weights_dir: str | Path,
    network: str | Path | None = None,
    cuda_graph: bool = False,
) -> tuple[Executor, dict]:
    """The strongest executor this machine can run: the engine, else the recorded network definition
    (`network`, the record beside the plan), else the deployment-form reference; with `level_status`."""
    try:
        return tensorrt_executor(plan, cuda_graph=cuda_graph), level_status("engine", [])
    except EngineRefused as refused:
        reasons = [str(refused)]
    if network is not None:
        try:
            executor = network_definition_executor(network)
            log.warning("%s; verifying the TensorRT network definition instead", reasons[0])
            return executor, level_status("network-definition", reasons)
        except (NetworkExecutionError, FileNotFoundError) as error:
            reasons.append(f"the network definition cannot be evaluated: {error}")
    log.warning("%s; verifying the deployment-form reference instead", "; ".join(reasons))
    return deployment_executor(precision, onnx, weights_dir), level_status("deployment-form", reasons)


# --------------------------------------------------------------------------- the stage


def verify_detections(
    precision: str,
    executor: Executor,
    status: Mapping,
    *,
    val_json: str | Path,
    reference_detections: str | Path,
    reference_metrics: str | Path,
    preprocess: dict,
    postprocess: dict,
    thresholds: Thresholds,
    match_iou: float = 0.9,
    batch_size: int = 8,
) -> tuple[dict, list[dict]]:
    """Run `executor` over the val split and compare with the reference (its detections, and the COCO
    metrics the reference stage computed from them): (verify result, deployed detections).

    An output no head can give (`trtflow.executors.ImpossibleOutput`) is a failed verdict: the result says
    `passed: false`, its reason under `impossible_output` and `failures`, and holds no detections or numbers."""
    ran = {
        "precision": precision,
        "executor": executor.name,
        **status,
        "executor_details": dict(executor.details),
        "software": software_versions(),
    }
    held = {key: value for key, value in asdict(thresholds).items() if value is not None}
    try:
        deployed = detect_dataset(
            executor,
            val_json,
            preprocess,
            postprocess,
            batch_size=batch_size,
            desc=f"verify {precision} ({executor.name})",
        )
    except ImpossibleOutput as error:  # a wrong network: a verdict, not a crash
        failure = f"impossible output: {error}"
        return {**ran, "impossible_output": str(error), "thresholds": held, "failures": [failure], "passed": False}, []
    reference = json.loads(Path(reference_detections).read_text())
    matching = match_detections(reference, deployed, match_iou)
    metrics = coco_map(val_json, deployed)
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
        "thresholds": held,
    }
    result["failures"] = thresholds.failures(result)
    result["passed"] = not result["failures"]
    return result, deployed


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
) -> dict:
    """Rule `verify`: choose the executor, compare, write results/verify/{precision}.json and the deployed
    detections. Fails (after logging the numbers) below the precision's thresholds where `enforce` (config
    `verify.enforce` lists the precision; otherwise the JSON says `passed: false` and the log warns), and when
    the strongest executor that runs here is below `settings["require"]` (a LEVELS name).

    `settings`: config `verify:` (match_iou, batch_size, require, cuda_graph).
    """
    executor, status = choose_executor(
        precision,
        plan=plan,
        onnx=onnx,
        weights_dir=weights_dir,
        network=network,
        cuda_graph=settings.get("cuda_graph", False),
    )
    required = settings.get("require", LEVELS[0])
    if LEVELS.index(status["verified_level"]) < LEVELS.index(required):
        raise VerifyError(
            f"verify.require is {required} but the {precision} plan can only be verified at level "
            f"{status['verified_level']} here: {status['reason']}"
        )
    result, deployed = verify_detections(
        precision,
        executor,
        status,
        val_json=val_json,
        reference_detections=reference_detections,
        reference_metrics=reference_metrics,
        preprocess=preprocess,
        postprocess=postprocess,
        thresholds=thresholds,
        match_iou=settings.get("match_iou", 0.9),
        batch_size=settings.get("batch_size", 8),
    )
    print(json.dumps(result, indent=2))
    write_json(detections_out, deployed)
    write_json(out_json, result)
    level = f"{executor.name}, level {status['verified_level']}"
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
