"""calibration.keep_float.auto (issue 25): rule sensitivity's per-layer measurements, rule float_layers' choice, and
the rules around them, on the demo run of conftest's `completed_run`."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

import trtflow.run.sensitivity
from snakemake_runs import clone, config_overlay, planned, snakemake
from test_qdq import resnet_like_model
from trtflow.common.qdq import quantization_plan
from trtflow.config import with_defaults
from trtflow.run.sensitivity import (
    BudgetUnreachable,
    choose_float_layers,
    measure_sensitivity,
    rank_correlation,
    sqnr_db,
)

# the demo's quantized layers, but for these left in float by pattern: the test measures five (node_Conv_210 to 218,
# the c2/c3 blocks), so that it takes seconds
FEW_LAYERS = {"nodes": ["node_conv2d_*", "node_Conv_20?", "node_Conv_22?"], "op_types": []}


def demo_settings(config: dict) -> dict:
    return {
        "preprocess": {"input": config["model"]["input"], **config["preprocess"]},
        "postprocess": config["postprocess"],
    }


def test_keep_float_auto_is_short_for_auto_true_with_no_patterns():
    config = {"calibration": {"keep_float": "auto"}}
    assert with_defaults(config) == []
    assert config["calibration"]["keep_float"] == {
        "auto": True,
        "nodes": [],
        "op_types": [],
        "max_map_drop_points": None,
    }


def test_rank_correlation_and_sqnr_are_the_textbook_numbers():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: ranks (0.5, 0.5, 2) and (0, 1, 2) correlate at sqrt(3)/2
    assert rank_correlation([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))
    signal = {"a": np.ones(100, np.float32)}
    assert sqnr_db(signal, {"a": signal["a"] + 0.1}) == pytest.approx(20.0)  # power ratio 1 / 0.01
    assert sqnr_db(signal, signal) is None


class QuantizeCount:
    """Stands in for the simulated mAP (SimulatedDetection) where no detector exists: 0.9, less a point for each
    QuantizeLinear left in the graph."""

    def __init__(self, *args, **kwargs):
        pass

    def mAP(self, graph: onnx.ModelProto, desc: str = "") -> float:
        return 0.9 - 0.01 * sum(node.op_type == "QuantizeLinear" for node in graph.graph.node)


def test_a_budget_that_every_layer_in_float_misses_is_refused_naming_the_best_map(tmp_path, monkeypatch):
    """test_qdq's small graph has a Concat whose inputs share one scale: its Q/DQ belong to no layer, so with all nine
    layers in float two QuantizeLinear stay (mAP 0.88 here, 2 points below float): a budget of 0.5 is refused."""
    model = resnet_like_model()
    onnx.save(model, tmp_path / "features.onnx")
    plan = quantization_plan(model)
    ranges = {"qdq_placement": "trtflow", "tensors": {name: {"amax": 1.0} for name in plan.activations}}
    (tmp_path / "ranges.json").write_text(json.dumps(ranges))
    ranking = [model.graph.node[i].name for i in plan.layers]
    (tmp_path / "sensitivity.json").write_text(json.dumps({"ranking": ranking}))
    (tmp_path / "val.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    monkeypatch.setattr(trtflow.run.sensitivity, "SimulatedDetection", QuantizeCount)
    arguments = dict(
        precision="int8",
        keep_float={},
        budget_key="calibration.keep_float.max_map_drop_points",
        verify_subset={"num_images": None, "seed": 0},
        preprocess={},
        postprocess={},
    )
    files = [tmp_path / name for name in ("features.onnx", "ranges.json", "sensitivity.json")]
    with pytest.raises(BudgetUnreachable) as refusal:
        choose_float_layers(
            *files, tmp_path, tmp_path / "val.json", tmp_path / "out.json", budget_points=0.5, **arguments
        )
    assert str(refusal.value) == (
        "calibration.keep_float.max_map_drop_points: 0.5 cannot be met: with all 9 quantized layers in float the "
        "simulated int8 mAP is 0.8800, a drop of 2.00 points from 0.9000 (the Q/DQ of no layer, a Concat's, stay); "
        "raise the budget or leave those in float (calibration.keep_float.nodes)"
    )
    assert not (tmp_path / "out.json").exists()
    # a budget the Concat's two points fit: met with every layer in float but lateral_conv, whose input and Add
    # shortcut are the Concat's own quantized tensors (no QuantizeLinear more): taken back by the pruning pass
    choice = choose_float_layers(
        *files, tmp_path, tmp_path / "val.json", tmp_path / "out.json", budget_points=2.5, **arguments
    )
    assert choice["drop_points"] == pytest.approx(2.0) and sorted(choice["float_layers"]) == sorted(
        name for name in ranking if name != "lateral_conv"
    )


@pytest.fixture(scope="module")
def fragile_layer(completed_run, tmp_path_factory, default_config):
    """The demo with one deliberately fragile layer: the input of the c3 block's second convolution (read by that
    convolution alone) calibrated to 1000 times its range, as rare huge outliers in the calibration images would set
    a max-based range; its INT8 step then rounds every ordinary value to zero. Written outside the code under test
    (ranges.json edited), measured by rule sensitivity's and rule float_layers' functions."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(completed_run)  # val.json names its images from the run's folder, where the rules run
        results = completed_run / "results"
        folder = tmp_path_factory.mktemp("fragile")
        model = onnx.load(results / "onnx/features.onnx")
        conv = next(
            n for n in model.graph.node if n.op_type == "Conv" and n.input[1] == "backbone.body.c3.conv2.0.weight"
        )
        ranges = json.loads((results / "calib/ranges.json").read_text())
        ranges["tensors"][conv.input[0]]["amax"] *= 1000.0
        (folder / "ranges.json").write_text(json.dumps(ranges))
        common = dict(precision="int8", keep_float=FEW_LAYERS, **demo_settings(default_config))
        sensitivity = measure_sensitivity(
            results / "onnx/features.onnx",
            folder / "ranges.json",
            results / "weights",
            results / "data/val.json",
            folder / "sensitivity.json",
            settings={"num_images": 8, "seed": 0, "measure_map": True, "rank_by": "sqnr"},
            **common,
        )
        choice = choose_float_layers(
            results / "onnx/features.onnx",
            folder / "ranges.json",
            folder / "sensitivity.json",
            results / "weights",
            results / "data/val.json",
            folder / "float_layers.json",
            budget_points=0.5,
            budget_key="calibration.keep_float.max_map_drop_points",
            verify_subset={"num_images": 8, "seed": 0},
            **common,
        )
        # FP8 (E4M3) spans 2^-9 .. 448 of a scale: a range 1000 times too wide still leaves the values representable;
        # 10^6 times rounds them all to zero, as 1000 does for int8
        fp8, calibrated = {}, ranges["tensors"][conv.input[0]]["amax"] / 1000.0
        for factor in (1e3, 1e6):
            ranges["tensors"][conv.input[0]]["amax"] = calibrated * factor
            (folder / f"ranges_fp8_{factor:g}.json").write_text(json.dumps(ranges))
            fp8[factor] = measure_sensitivity(
                results / "onnx/features.onnx",
                folder / f"ranges_fp8_{factor:g}.json",
                results / "weights",
                results / "data/val.json",
                folder / f"sensitivity_fp8_{factor:g}.json",
                settings={"num_images": 8, "seed": 0, "measure_map": False, "rank_by": "sqnr"},
                **{**common, "precision": "fp8"},
            )
        return conv.name, sensitivity, choice, fp8


def test_a_fragile_layer_is_the_most_costly_by_map_and_by_sqnr(fragile_layer):
    fragile, sensitivity, _, _ = fragile_layer
    layers = {layer["name"]: layer for layer in sensitivity["layers"]}
    assert sorted(layers) == ["node_Conv_210", "node_Conv_212", "node_Conv_214", "node_Conv_216", "node_Conv_218"]
    assert fragile == "node_Conv_214" and sensitivity["ranking"][0] == fragile
    others = [layer for name, layer in layers.items() if name != fragile]
    # alone in float it gives back most of what quantization took (measured: 68 of 68 points); any other, nothing
    assert sensitivity["drop_points"] > 30
    assert layers[fragile]["gain_points"] > 0.8 * sensitivity["drop_points"]
    assert max(layer["gain_points"] for layer in others) < 2
    # alone quantized, its outputs are noise (measured 7 dB), the others' at least 30 dB
    assert layers[fragile]["sqnr_db"] < 12 < 30 < min(layer["sqnr_db"] for layer in others)
    assert sensitivity["rank_correlation"] is not None and sensitivity["images"] == {"images": 8, "of": 100, "seed": 0}


def test_the_float_set_for_a_budget_is_the_fragile_layer_alone(fragile_layer):
    fragile, _, choice, _ = fragile_layer
    assert choice["float_layers"] == [fragile] and choice["of_layers"] == 5
    steps = [(step["change"], step["float_layers"]) for step in choice["steps"]]
    assert steps == [("none", 0), ("all", 5), ("add", 1)]
    assert choice["steps"][1]["drop_points"] == pytest.approx(0.0)  # every layer in float is the float graph
    assert choice["drop_points"] <= 0.5 < choice["steps"][0]["drop_points"]


def test_the_stage_is_precision_generic_fp8_has_its_own_fragile_range(fragile_layer):
    """The same measurement in FP8 (scale amax/448, E4M3): the range that zeroes int8 (x1000, measured 7.3 dB) leaves
    FP8's values representable (measured 37.5 dB, as good as the others), and only a range 10^6 times too wide makes
    the layer the most costly."""
    fragile, int8, _, fp8 = fragile_layer
    sqnr = {
        factor: {layer["name"]: layer["sqnr_db"] for layer in document["layers"]} for factor, document in fp8.items()
    }
    int8_sqnr = {layer["name"]: layer["sqnr_db"] for layer in int8["layers"]}
    assert all(document["precision"] == "fp8" and "fp32_mAP" not in document for document in fp8.values())
    assert sqnr[1e3][fragile] > 30 > 12 > int8_sqnr[fragile]
    assert fp8[1e6]["ranking"][0] == fragile
    assert sqnr[1e6][fragile] < 12 < 30 < min(value for name, value in sqnr[1e6].items() if name != fragile)


def test_fp8_gets_its_own_choice_and_graph(auto_run):
    overlay = config_overlay(
        auto_run,
        "fp8.yaml",
        auto() + "engine:\n  precisions: [int8, fp8]\n  rtx: {compute_capabilities: ['8.9']}\n",
    )
    jobs = planned(auto_run, "results/onnx/features.fp8.qdq.onnx", *overlay)
    assert jobs == ["float_layers[fp8]", "quantized_graph[features.fp8.qdq.onnx]", "sensitivity[fp8]"]


def auto(keep_float: str = "{auto: true}", more: str = "") -> str:
    """A config overlay with keep_float: auto, the SQNR alone (the measurements of rule sensitivity that take
    seconds: the mAP per layer is tested on the fragile layer above) and rule float_layers' mAP on 16 of verify's
    images (no verify runs here)."""
    return (
        f"verify:\n  num_images: 16\n"
        f"calibration:\n  keep_float: {keep_float}\n  sensitivity: {{measure_map: false}}\n{more}"
    )


@pytest.fixture(scope="module")
def auto_run(completed_run, tmp_path_factory):
    """The completed demo run (percentile calibration) again with keep_float: auto, up to the int8 plan."""
    workdir = clone(completed_run, tmp_path_factory.mktemp("auto") / "run")
    # the target first: --configfile takes every word after it
    snakemake(workdir, "results/engine_int8.plan", *config_overlay(workdir, "auto.yaml", auto()))
    return workdir


def test_auto_on_the_default_calibration_leaves_nothing_in_float_and_changes_no_int8_artifact(completed_run, auto_run):
    choice = json.loads((auto_run / "results/calib/float_layers_int8.json").read_text())
    assert choice["float_layers"] == [] and [step["change"] for step in choice["steps"]] == ["none"]
    assert choice["drop_points"] <= choice["budget_points"] == 0.5
    assert choice["budget_key"] == "verify.thresholds.int8.max_map_drop_points"
    for artifact in ("onnx/features.qdq.onnx", "calib/ranges.json", "calib/int8calib.table", "engine_int8.plan"):
        assert (auto_run / "results" / artifact).read_bytes() == (completed_run / "results" / artifact).read_bytes()
    recorded = json.loads((auto_run / "results/engine_int8.json").read_text())["sources"]["float_layers"]
    assert recorded["layers"] == [] and recorded["of_layers"] == 36
    assert recorded["simulated_drop_points"] == choice["drop_points"]


def test_a_budget_reruns_the_choice_and_a_calibration_both(auto_run):
    budget = config_overlay(auto_run, "budget.yaml", auto("{auto: true, max_map_drop_points: 1.0}"))
    assert planned(auto_run, "results/engine_int8.plan", *budget) == [
        "engine[int8]",
        "float_layers[int8]",
        "quantized_graph[features.qdq.onnx]",
    ]
    entropy = config_overlay(auto_run, "entropy.yaml", auto(more="  algorithm: entropy\n"))
    assert planned(auto_run, "results/engine_int8.plan", *entropy) == [
        "calibrate",
        "engine[int8]",
        "float_layers[int8]",
        "quantized_graph[features.qdq.onnx]",
        "sensitivity[int8]",
    ]


def test_a_negative_budget_is_refused_before_any_job(completed_run):
    overlay = config_overlay(
        completed_run, "negative.yaml", "calibration:\n  keep_float: {auto: true, max_map_drop_points: -0.5}\n"
    )
    result = snakemake(completed_run, *overlay, "--dry-run", check=False)
    assert result.returncode != 0
    assert "calibration.keep_float.max_map_drop_points: -0.5 is less than the minimum of 0" in result.console
    assert "Traceback" not in result.console and "rule " not in result.console
