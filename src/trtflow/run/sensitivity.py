"""Which quantized layers cost accuracy, and the fewest to leave in float for an mAP budget (issue "when
quantization costs accuracy"): rules `sensitivity` and `float_layers`, for any quantized precision.

A layer is a weighted op the Q/DQ plan quantizes, with the shortcut of the residual Add it fuses with
(`trtflow.common.qdq.QuantizationPlan.layers`): the unit TensorRT fuses and runs in INT8 (or FP8).

- `measure_sensitivity` (rule sensitivity, results/calib/sensitivity_<precision>.json): for each layer, the simulated
  mAP with only that layer left in float (`trtflow.run.simulated.SimulatedDetection`, on a seeded val subset of
  `calibration.sensitivity.num_images`) and a cheap signal, the SQNR of the features network's outputs with only
  that layer quantized (one batch, against the float outputs computed once); the Spearman rank correlation of the
  two says how far the cheap signal alone (`calibration.sensitivity.rank_by: sqnr`) can be trusted.
- `choose_float_layers` (rule float_layers, results/calib/float_layers_<precision>.json): from everything quantized,
  the layers in the sensitivity ranking's order are left in float one at a time until the simulated mAP drop on
  verify's images meets the budget; every other scale stays as calibrated. Rule quantized_graph writes the graph
  with exactly that set.

The scales are ranges.json's (rule calibrate): no step recalibrates, so the budget's stage reruns alone.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from trtflow.artifacts import software_versions, write_json
from trtflow.common.images import read_image
from trtflow.common.onnxrun import OnnxSession
from trtflow.common.preprocess import preprocess_batch
from trtflow.common.qdq import CalibratedGraph
from trtflow.precisions import PRECISIONS
from trtflow.run.simulated import HEAD, SimulatedDetection
from trtflow.run.subset import val_subset

log = logging.getLogger(__name__)


class BudgetUnreachable(ValueError):
    """No float set meets the mAP budget: even with every layer in float the drop is larger."""


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of two sequences (ties get their average rank); NaN where either is constant."""

    def ranks(values) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values), dtype=np.float64)
        for value in np.unique(values):  # ties: the mean of their ranks
            tied = values == value
            ranked[tied] = ranked[tied].mean()
        return ranked

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def sqnr_db(reference: Mapping[str, np.ndarray], quantized: Mapping[str, np.ndarray]) -> float | None:
    """10 log10(signal power / noise power) over every output; None where the outputs are exact (no noise)."""
    signal = sum(float(np.square(reference[name], dtype=np.float64).sum()) for name in reference)
    noise = sum(
        float(np.square(reference[name].astype(np.float64) - quantized[name], dtype=np.float64).sum())
        for name in reference
    )
    return None if noise == 0 else 10.0 * math.log10(signal / noise)


def layer_record(graph: CalibratedGraph, index: int) -> dict:
    """A quantized layer as sensitivity_<precision>.json names it: node name, op type and weight initializer."""
    node = graph.model.graph.node[index]
    weights = [name for name, (_, edges) in graph.plan.weights.items() if any(e[0] == index for e in edges)]
    return {"name": node.name, "op_type": node.op_type, "weight": weights[0] if weights else None}


def first_batch(coco: Mapping, preprocess: dict, batch_size: int) -> np.ndarray:
    """The first `batch_size` images of `coco`, preprocessed: what the SQNR is measured on."""
    images = [read_image(image["file_name"]) for image in coco["images"][:batch_size]]
    return preprocess_batch(images, preprocess)[0]


def measure_sensitivity(
    features_onnx: str | Path,
    ranges_json: str | Path,
    weights_dir: str | Path,
    val_json: str | Path,
    out_path: str | Path,
    *,
    precision: str,
    keep_float: Mapping | None,
    settings: Mapping,
    preprocess: dict,
    postprocess: dict,
    batch_size: int = 8,
) -> dict:
    """Rule sensitivity (see the module docstring). `settings` is config `calibration.sensitivity`."""
    started = time.perf_counter()
    features = CalibratedGraph(features_onnx, ranges_json, PRECISIONS[precision].quantized, keep_float)
    val = json.loads(Path(val_json).read_text())
    subset = val_subset(val, settings, key="calibration.sensitivity.num_images")
    coco = subset.coco(val)
    log.info("%d quantized layers; %d of %d val images", len(features.names), len(subset.images), subset.of)

    batch = first_batch(coco, preprocess, batch_size)
    reference = OnnxSession(features.model)(batch)
    layers = []
    for index in features.plan.layers:
        outputs = OnnxSession(features.graph(features.plan.only_layers({index})))(batch)
        layers.append({**layer_record(features, index), "sqnr_db": sqnr_db(reference, outputs)})
    signal_seconds = time.perf_counter() - started

    document = {"precision": precision, "images": subset.block(), "signal_images": len(batch)}
    if settings["measure_map"]:
        detection = SimulatedDetection(
            weights_dir, val_json, preprocess=preprocess, postprocess=postprocess, coco=coco, batch_size=batch_size
        )
        float_map = detection.mAP(features.model, desc="float")
        quantized_map = detection.mAP(features.with_float(), desc="quantized")
        for layer in layers:
            layer["float_mAP"] = detection.mAP(features.with_float([layer["name"]]), desc=layer["name"])
            layer["gain_points"] = 100.0 * (layer["float_mAP"] - quantized_map)
        correlation = rank_correlation([layer["gain_points"] for layer in layers], [-cheap(layer) for layer in layers])
        document |= {
            "fp32_mAP": float_map,
            "quantized_mAP": quantized_map,
            "drop_points": 100.0 * (float_map - quantized_map),
            "rank_correlation": None if math.isnan(correlation) else correlation,
        }
    by_gain = settings["rank_by"] == "map"
    ranking = sorted(layers, key=lambda layer: (-layer["gain_points"], cheap(layer)) if by_gain else cheap(layer))
    document |= {
        "layers": layers,
        "rank_by": settings["rank_by"],
        "ranking": [layer["name"] for layer in ranking],
        "seconds": {"signal": signal_seconds, "total": time.perf_counter() - started},
        "executor": "onnxruntime",
        "head": HEAD,
        "software": software_versions(),
    }
    write_json(out_path, document, indent=1, sort_keys=False)
    return document


def cheap(layer: Mapping) -> float:
    """A layer's SQNR as a sort key: lower is more sensitive; an exact layer (no noise) last."""
    return math.inf if layer["sqnr_db"] is None else layer["sqnr_db"]


def choose_float_layers(
    features_onnx: str | Path,
    ranges_json: str | Path,
    sensitivity_json: str | Path,
    weights_dir: str | Path,
    val_json: str | Path,
    out_path: str | Path,
    *,
    precision: str,
    keep_float: Mapping | None,
    budget_points: float,
    budget_key: str,
    verify_subset: Mapping,
    preprocess: dict,
    postprocess: dict,
    batch_size: int = 8,
) -> dict:
    """Rule float_layers (see the module docstring): the fewest layers, in the ranking's order, whose float set meets
    `budget_points` (COCO mAP points, the config key `budget_key`) on verify's val images (`verify_subset`).

    Raises BudgetUnreachable, naming the best mAP reached, where even every layer in float misses the budget (the
    Q/DQ that belong to no layer, a Concat's, stay)."""
    features = CalibratedGraph(features_onnx, ranges_json, PRECISIONS[precision].quantized, keep_float)
    ranking = json.loads(Path(sensitivity_json).read_text())["ranking"]
    if sorted(ranking) != sorted(features.names):
        raise ValueError(
            f"{sensitivity_json} ranks other layers than the Q/DQ plan of {features_onnx} has: rerun it "
            "(snakemake --forcerun sensitivity)"
        )
    coco = json.loads(Path(val_json).read_text())
    subset = val_subset(coco, verify_subset)
    detection = SimulatedDetection(
        weights_dir,
        val_json,
        preprocess=preprocess,
        postprocess=postprocess,
        coco=subset.coco(coco),
        batch_size=batch_size,
    )
    float_map = detection.mAP(features.model, desc="float")

    def step(floated: list[str], change: str, layer: str | None = None) -> dict:
        value = detection.mAP(features.with_float(floated), desc=f"{len(floated)} float")
        drop = 100.0 * (float_map - value)
        log.info("%d layers in float (%s %s): mAP %.4f, drop %.2f points", len(floated), change, layer, value, drop)
        return {"change": change, "layer": layer, "float_layers": len(floated), "mAP": value, "drop_points": drop}

    steps = [step([], "none")]
    chosen, final = [], steps[0]
    if final["drop_points"] > budget_points:
        every = step(ranking, "all")
        steps.append(every)
        if every["drop_points"] > budget_points:
            raise BudgetUnreachable(
                f"{budget_key}: {budget_points} cannot be met: with all {len(ranking)} quantized layers in float the "
                f"simulated {precision} mAP is {every['mAP']:.4f}, a drop of {every['drop_points']:.2f} points from "
                f"{float_map:.4f} (the Q/DQ of no layer, a Concat's, stay); raise the budget or leave those in float "
                "(calibration.keep_float.nodes)"
            )
        # the most costly first, until the budget is met (all of them meet it: the step above)
        chosen, final = list(ranking), every
        for count in range(1, len(ranking)):
            steps.append(step(ranking[:count], "add", ranking[count - 1]))
            if steps[-1]["drop_points"] <= budget_points:
                chosen, final = ranking[:count], steps[-1]
                break
        # then each earlier choice back to quantized where the budget holds without it: the ranking measured layers
        # one at a time, and a later layer may have made an earlier one unneeded
        for name in chosen[-2::-1]:
            trial = [other for other in chosen if other != name]
            steps.append(step(trial, "remove", name))
            steps[-1]["accepted"] = steps[-1]["drop_points"] <= budget_points
            if steps[-1]["accepted"]:
                chosen, final = trial, steps[-1]
    document = {
        "precision": precision,
        "budget_points": budget_points,
        "budget_key": budget_key,
        "images": subset.block(),
        "fp32_mAP": float_map,
        "float_layers": chosen,
        "of_layers": len(ranking),
        "mAP": final["mAP"],
        "drop_points": final["drop_points"],
        "steps": steps,
        "executor": "onnxruntime",
        "head": HEAD,
        "software": software_versions(),
    }
    write_json(out_path, document, indent=1, sort_keys=False)
    return document
