"""trtflow.run.netexec: the TensorRT network definition handed to the builder, evaluated layer by layer on the CPU.

Every network here is a real INetworkDefinition of TensorRT-RTX (ONNX-parsed features + the API-built
head, exactly as the engine stage defines it), recorded by trtflow.formats.network_record. The executor is
checked against ONNX Runtime (features, Q/DQ as written) and torchvision (whole detectors), and shown
to catch head bugs that the deployment-form check (ONNX Runtime + StaticHead) cannot see.
"""

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import trtflow.build.head_network
from summation_order import convolutions_summed_in_two_halves
from test_engine import small_detector  # noqa: F401  (demo detector, random weights, 128x160, + Q/DQ twin)
from test_executors import Deployment, deployment, small_coco  # noqa: F401  (tamed tiny detector + a small COCO set)
from test_verify import plan_for_no_gpu_here
from test_weights import ARCHS, tame, torchvision_detector
from trtflow.build.engine import EngineSettings, EngineSources, define_network, qdq_to_fp16
from trtflow.common.metrics import coco_map
from trtflow.common.model import build_detector
from trtflow.common.onnxrun import OnnxSession
from trtflow.common.qdq import insert_qdq, quantization_plan
from trtflow.formats.head_weights import load_head
from trtflow.formats.network_record import NetworkRecord, NetworkRecordError, read_network
from trtflow.precisions import PRECISIONS
from trtflow.run.executors import network_definition_executor, onnxruntime_static_head_executor
from trtflow.run.netexec import NetworkExecutionError, NetworkExecutor
from trtflow.run.verify import Thresholds, VerifyError, match_detections, run_verify

rtx = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (pip install tensorrt-rtx-cu13) is not installed")


@pytest.fixture(scope="module")
def backend():
    from trtflow.backend import load_backend

    return load_backend("tensorrt_rtx")


def record_of(
    backend, onnx_path: Path, precision: str, weights: Path | None = None, manifest=None, **settings
) -> NetworkRecord:
    """The record of the network the engine stage defines for `precision` (features only without weights).
    `manifest` replaces the head metadata the network is built with (the deployment form keeps the file's);
    `settings` are further EngineSettings."""
    head = None
    if weights is not None:
        stored_manifest, tensors = load_head(weights)
        head = (manifest or stored_manifest, tensors)
    builder = backend.create_builder()
    network, parser = define_network(
        backend,
        builder,
        onnx.load(str(onnx_path)),
        EngineSources(onnx=onnx_path),
        EngineSettings(precision, **settings),
        head,
    )
    record = read_network(network, backend.trt)
    del parser
    return record


def images(batch: int, hw=(128, 160), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (batch, 3, *hw)).astype(np.float32)


# --------------------------------------------------------------------------- the features network


def test_fp32_features_network_matches_onnxruntime(backend, small_detector):
    onnx_path = small_detector / "features.onnx"
    record = record_of(backend, onnx_path, "fp32")
    assert {layer["type"] for layer in record.layers} >= {"CONVOLUTION", "RESIZE", "POOLING", "ELEMENTWISE"}
    batch = images(2)
    evaluated = NetworkExecutor(record)({"images": torch.from_numpy(batch)})
    reference = OnnxSession(onnx_path, providers=["CPUExecutionProvider"])(batch)
    assert list(evaluated) == list(reference)
    for name, expected in reference.items():
        error = np.abs(evaluated[name].numpy() - expected).max()
        assert error <= 1e-5 * np.abs(expected).max(), name


def test_qdq_features_network_matches_onnxruntime_as_written(backend, small_detector):
    """INT8 as TensorRT defines it: the first quantized tensor identical, and every output within the band that
    ONNX Runtime itself needs when only its summation order changes: within four quantization steps, at most
    0.1 % of elements beyond two (every activation at amax 4.0). Not "within two steps" everywhere: a convolution
    summed in another order moves a value across a rounding boundary now and then, and the one-step flip grows
    through the later quantized layers. ONNX Runtime on the same graph with each convolution summed in two halves
    leaves two steps on these images too (2.4-2.9 steps on this machine's images of seeds 0-2)."""
    onnx_path = small_detector / "features.qdq.onnx"
    record = record_of(backend, onnx_path, "int8", quantized_float="fp32")
    first = next(layer for layer in record.layers if layer["type"] == "QUANTIZE")
    assert first["inputs"][0] == "images" and first["outputs"][0]["dtype"] == "INT8"
    quantized = first["outputs"][0]["name"]
    batch = np.concatenate([images(2, seed=seed) for seed in range(3)])
    outputs = record.outputs
    evaluated = NetworkExecutor(record)({"images": torch.from_numpy(batch)}, names=[*outputs, quantized])
    reference = OnnxSession(onnx_path, providers=["CPUExecutionProvider"], extra_outputs=[quantized])(batch)
    assert evaluated[quantized].dtype == torch.int8
    assert np.array_equal(evaluated[quantized].numpy(), reference[quantized])
    reordered = OnnxSession(
        convolutions_summed_in_two_halves(onnx.load(str(onnx_path))), providers=["CPUExecutionProvider"]
    )(batch)
    step = 4.0 / 127
    for runtime, values in (("netexec", evaluated), ("onnxruntime reordered", reordered)):
        off = {name: np.abs(np.asarray(values[name], dtype=np.float32) - reference[name]) / step for name in outputs}
        assert max(error.max() for error in off.values()) <= 4, runtime
        assert max((error > 2).mean() for error in off.values()) <= 1e-3, runtime
    assert max(np.abs(reordered[name] - reference[name]).max() for name in outputs) > 2 * step


def test_fp8_features_network_matches_onnxruntime_within_its_reordering_band(backend, small_detector):
    """FP8 end to end (every activation at amax 4.0): relative to each output's largest magnitude, no output of the
    executor is further from ONNX Runtime than ONNX Runtime is from itself with each convolution summed in two
    halves, and the executor moves at most 1 % of the elements (measured: at most 0.0121 against
    ONNX Runtime's own 0.0272, and 0.47 % of elements against about 70 %; beyond float32 summation error, 1e-4): a
    sum in another order moves a value across an E4M3 rounding boundary now and then, which the later quantized
    layers carry on."""
    onnx_path = small_detector / PRECISIONS["fp8"].features_graph
    record = record_of(backend, onnx_path, "fp8", quantized_float="fp32")
    batch = np.concatenate([images(2, seed=seed) for seed in range(3)])
    evaluated = NetworkExecutor(record)({"images": torch.from_numpy(batch)})
    reference = OnnxSession(onnx_path, providers=["CPUExecutionProvider"])(batch)
    reordered = OnnxSession(
        convolutions_summed_in_two_halves(onnx.load(str(onnx_path))), providers=["CPUExecutionProvider"]
    )(batch)

    def off(values) -> dict[str, np.ndarray]:
        return {
            name: np.abs(np.asarray(values[name], dtype=np.float32) - expected) / np.abs(expected).max()
            for name, expected in reference.items()
        }

    band = max(error.max() for error in off(reordered).values())
    assert band > 0.01  # the control does move outputs
    assert max(error.max() for error in off(evaluated).values()) <= band
    assert max((error > 1e-4).mean() for error in off(evaluated).values()) <= 0.01


def test_summing_convolutions_in_two_halves_keeps_the_function(small_detector):
    """The control above changes summation order only: on the float graph every output, and on the Q/DQ graph the
    first convolution (weights through DequantizeLinear, its input the identical quantized image), agree within
    float32 summation error."""
    first_convolution = next(
        node.output[0]
        for node in onnx.load(str(small_detector / "features.qdq.onnx")).graph.node
        if node.op_type == "Conv"
    )
    batch = images(2)
    for graph, names in (("features.onnx", None), ("features.qdq.onnx", [first_convolution])):
        model = onnx.load(str(small_detector / graph))
        reference = OnnxSession(model, extra_outputs=names or [])(batch)
        reordered = OnnxSession(convolutions_summed_in_two_halves(model), extra_outputs=names or [])(batch)
        for name in names or reference:
            expected = reference[name]
            assert np.abs(reordered[name] - expected).max() <= 1e-5 * np.abs(expected).max(), (graph, name)


@pytest.mark.parametrize("quantized_float", ["fp32", "fp16"])
@pytest.mark.parametrize("precision, dtype", [("int8", torch.int8), ("fp8", torch.float8_e4m3fn)])
def test_qdq_features_network_layer_by_layer_matches_onnxruntime(
    backend, small_detector, tmp_path, precision, dtype, quantized_float
):
    """Each quantize layer, fed ONNX Runtime's value of its input, gives ONNX Runtime's int8 (FP8 E4M3) tensor bit
    for bit (scale, round half to even, saturate), and with every quantized tensor shared each output the executor
    computes (the RPN head's; the feature maps feed quantize layers and are given) is within float32 summation error
    (fp16 rounding where engine.quantized_float: fp16, against ONNX Runtime running the same fp16 graph): what
    remains between the two runtimes end to end is summation order, not INT8 (FP8) semantics. The fp8 network's
    weights are FP8 constants, read from the network definition (network_record.weight_bytes)."""
    onnx_path = small_detector / PRECISIONS[precision].features_graph
    record = record_of(backend, onnx_path, precision, quantized_float=quantized_float)
    if quantized_float == "fp16":  # ONNX Runtime runs the graph the engine stage parses
        onnx.save(qdq_to_fp16(onnx.load(str(onnx_path))), str(tmp_path / "fp16.onnx"))
        onnx_path = tmp_path / "fp16.onnx"
    network = NetworkExecutor(record)
    activations = [layer for layer in record.layers if layer["type"] == "QUANTIZE"]  # weights are int8 constants
    feeds = sorted({layer["inputs"][0] for layer in activations} - {"images"})
    quantized = [layer["outputs"][0]["name"] for layer in activations]
    assert len(activations) >= 10
    batch = images(2, seed=1)
    reference = OnnxSession(onnx_path, providers=["CPUExecutionProvider"], extra_outputs=feeds + quantized)(batch)
    outputs = record.outputs
    evaluated = network(
        {"images": torch.from_numpy(batch)},
        forced={name: torch.from_numpy(reference[name]) for name in feeds},
        names=[*outputs, *quantized],
    )
    for name in quantized:
        assert evaluated[name].dtype == dtype
        bits = evaluated[name].view(torch.uint8).numpy()  # bytes: E4M3 has NaN codes and -0
        assert np.array_equal(bits, np.asarray(reference[name]).view(np.uint8)), name
    computed = [name for name in outputs if name not in feeds]  # the feature maps feed quantize layers: forced
    assert {"objectness_p2", "deltas_p2"} <= set(computed)
    tolerance = {"fp32": 1e-5, "fp16": 2**-10}[quantized_float]
    for name in computed:
        expected = np.asarray(reference[name], dtype=np.float32)
        assert np.abs(evaluated[name].float().numpy() - expected).max() <= tolerance * np.abs(expected).max(), name


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_networks_hold_no_float32_activation_under_quantized_float_fp16(backend, small_detector, precision):
    """engine.quantized_float: fp16 (the default): the only float32 activation of the int8 and fp8 features networks
    is the image input, cast to fp16 before it is quantized; fp32 keeps every float tensor float32."""

    def float32_activations(record) -> list[str]:
        return [
            tensor["name"]
            for layer in record.layers
            if layer["type"] != "CONSTANT"
            for tensor in layer["outputs"]
            if tensor["dtype"] == "FLOAT"
        ]

    onnx_path = small_detector / PRECISIONS[precision].features_graph
    fp16 = record_of(backend, onnx_path, precision)
    assert [tensor["dtype"] for tensor in fp16.inputs] == ["FLOAT"]
    assert float32_activations(fp16) == []
    assert {"DEQUANTIZE", "CONVOLUTION", "RESIZE", "ELEMENTWISE", "POOLING"} <= {
        layer["type"] for layer in fp16.layers if layer["outputs"][0]["dtype"] == "HALF"
    }
    assert len(float32_activations(record_of(backend, onnx_path, precision, quantized_float="fp32"))) > 50


def test_forcing_or_reading_a_tensor_the_network_does_not_compute_is_refused(backend, small_detector):
    network = NetworkExecutor(record_of(backend, small_detector / "features.onnx", "fp32"))
    with pytest.raises(ValueError, match=r"forced tensors \['no_such_tensor'\] are not computed outside loops"):
        network({"images": torch.from_numpy(images(1))}, forced={"no_such_tensor": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"tensors \['no_such_tensor'\] are not computed outside loops"):
        network({"images": torch.from_numpy(images(1))}, names=["no_such_tensor"])


# --------------------------------------------------------------------------- whole detectors


def network_detections(deployment, record: NetworkRecord, tmp_path: Path):
    path = tmp_path / "network.safetensors"
    record.save(path)
    return deployment.detections(network_definition_executor(path))


@pytest.fixture(scope="module")
def torchvision_reference(deployment):
    return deployment.detections(deployment.torchvision)


@pytest.mark.parametrize("precision, min_recall, max_dscore", [("fp32", 1.0, 1e-4), ("fp16", 0.97, 0.02)])
def test_network_definition_matches_torchvision(
    backend, deployment, torchvision_reference, tmp_path, precision, min_recall, max_dscore
):
    record = record_of(backend, deployment.onnx, precision, deployment.weights)
    matching = match_detections(torchvision_reference, network_detections(deployment, record, tmp_path))
    assert len(torchvision_reference) >= 50
    assert matching.recall >= min_recall and matching.precision >= min_recall
    assert np.abs(matching.dscores).max() <= max_dscore


def test_the_inms_layer_head_matches_torchvision(backend, deployment, torchvision_reference, tmp_path):
    """`engine.nms: builtin_layer` (full TensorRT's INMSLayer + a scatter into the keep mask) defined with
    TensorRT-RTX's network API, whose builder cannot build it: the definition alone is checked here."""
    record = record_of(backend, deployment.onnx, "fp32", deployment.weights, nms="builtin_layer")
    assert {"NMS", "SCATTER"} <= {layer["type"] for layer in record.layers}
    matching = match_detections(torchvision_reference, network_detections(deployment, record, tmp_path))
    assert matching.recall == 1.0 and matching.precision == 1.0 and np.abs(matching.dscores).max() <= 1e-4


# fasterrcnn_mobilenet_v3_large_320_fpn at these budgets is fasterrcnn_mobilenet_v3_large_fpn but for the resize of
# its transform, which trtflow never runs (run_detector feeds the backbone): the next test shows it, so the 320 arch is
# not run through netexec a second time (about 10 s)
SAME_AS = {"fasterrcnn_mobilenet_v3_large_320_fpn": "fasterrcnn_mobilenet_v3_large_fpn"}


def settings_of(module) -> dict:
    """A module's plain settings (numbers, strings, and tuples, lists and dicts of them, such as the RPN's
    _pre_nms_top_n), and those of its helper objects (the box coders' weights), not its submodules or tensors."""

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(plain(v) for v in value.values())
        if isinstance(value, (tuple, list)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str))

    helpers = {
        k: settings_of(v)
        for k, v in vars(module).items()
        if hasattr(v, "__dict__") and not isinstance(v, (torch.nn.Module, torch.Tensor))
    }
    return {**{k: v for k, v in vars(module).items() if plain(v)}, **helpers}


@pytest.mark.parametrize("arch, same", SAME_AS.items())
def test_the_320_arch_is_the_large_fpn_arch_but_for_the_resize_trtflow_never_runs(arch, same):
    (model, twin) = (torchvision_detector(name) for name in (arch, same))
    state, twin_state = model.state_dict(), twin.state_dict()
    assert state.keys() == twin_state.keys() and all(torch.equal(state[k], twin_state[k]) for k in state)
    assert [name for name, _ in model.named_children()] == ["transform", "backbone", "rpn", "roi_heads"]
    for name in ("backbone", "rpn", "roi_heads"):
        part, twin_part = getattr(model, name), getattr(twin, name)
        assert repr(part) == repr(twin_part), name
        for (path, module), (_, twin_module) in zip(part.named_modules(), twin_part.named_modules()):
            assert settings_of(module) == settings_of(twin_module), f"{name}.{path}"
    assert model.transform.min_size != twin.transform.min_size  # what makes it an arch of its own


@pytest.mark.parametrize("arch", [arch for arch in ARCHS if arch not in SAME_AS])
def test_torchvision_architectures_with_random_weights(backend, arch, tmp_path):
    """Every torchvision architecture of the schema (random weights, 128x160): the fp32 network the engine
    stage defines gives torchvision's detections; its fp16 network and its Q/DQ network (every activation at
    amax 4.0) hold only layers netexec implements and give the head contract. (SAME_AS: an arch that is another's.)"""
    case = Deployment(tmp_path, tame(torchvision_detector(arch), (128, 160)), (128, 160))
    reference = case.detections(case.torchvision)
    record = record_of(backend, case.onnx, "fp32", case.weights)
    matching = match_detections(reference, network_detections(case, record, tmp_path))
    assert len(reference) >= 20
    assert matching.recall >= 0.99 and matching.precision >= 0.99
    assert np.abs(matching.dscores).max() <= 1e-4

    features = onnx.load(str(case.onnx))
    plan = quantization_plan(features)
    onnx.save(insert_qdq(features, plan, {name: 4.0 for name in plan.activations}), str(tmp_path / "qdq.onnx"))
    batch = torch.from_numpy(images(1))
    detections_per_img = case.manifest["box"]["detections_per_img"]
    for precision, source in (("fp16", case.onnx), ("int8", tmp_path / "qdq.onnx")):
        outputs = NetworkExecutor(record_of(backend, source, precision, case.weights))({"images": batch})
        assert [(name, tuple(t.shape)) for name, t in outputs.items()] == [
            ("num_detections", (1,)),
            ("boxes", (1, detections_per_img, 4)),
            ("scores", (1, detections_per_img)),
            ("classes", (1, detections_per_img)),
        ]


# --------------------------------------------------------------------------- it can fail


def transposed_fc_weight(manifest, monkeypatch):
    """The first box-head FC reads its weight in the transposed memory order (same shape, scrambled)."""
    linear = trtflow.build.head_network.linear
    first = next(layer["name"] for layer in manifest["box_head"]["layers"] if layer["kind"] == "linear")

    def scrambled(g, x, layer, tensors):
        if layer["name"] == first:
            name = f"{layer['name']}.weight"
            weight = tensors[name]
            tensors = {**tensors, name: np.ascontiguousarray(weight.reshape(weight.shape[::-1]).T)}
        return linear(g, x, layer, tensors)

    monkeypatch.setattr(trtflow.build.head_network, "linear", scrambled)
    return manifest


def swapped_box_coder_weights(manifest, monkeypatch):
    weights = manifest["box"]["box_coder_weights"]
    return {**manifest, "box": {**manifest["box"], "box_coder_weights": [*weights[2:], *weights[:2]]}}


def nms_threshold_off(manifest, monkeypatch):
    return {**manifest, "box": {**manifest["box"], "nms_thresh": manifest["box"]["nms_thresh"] + 0.2}}


def level_mapping_shifted(manifest, monkeypatch):
    """Each RoI samples the FPN map one level coarser than torchvision's LevelMapper assigns (an off-by-one
    in the level index; the coarsest level stays)."""
    fpn_levels = trtflow.build.head_network.fpn_levels

    def shifted(g, boxes, roi_pool):
        return g.minimum(g.add(fpn_levels(g, boxes, roi_pool), 1), len(roi_pool["scales"]) - 1)

    monkeypatch.setattr(trtflow.build.head_network, "fpn_levels", shifted)
    return manifest


RECALL_ONLY = Thresholds(min_match_recall=0.99, min_match_precision=0.99)  # this test's bars before issue 21


def overshoot(thresholds: Thresholds, summary: Mapping) -> float:
    """How many times its allowance the worst criterion of `thresholds` uses: the share of reference detections
    missed over the share min_match_recall lets miss, likewise unmatched deployed ones and min_match_precision, and
    max |Δscore| over max_abs_dscore. A verdict fails above 1."""
    used = []
    if thresholds.min_match_recall is not None:
        used.append((1 - summary["match_recall"]) / (1 - thresholds.min_match_recall))
    if thresholds.min_match_precision is not None:
        used.append((1 - summary["match_precision"]) / (1 - thresholds.min_match_precision))
    if thresholds.max_abs_dscore is not None and summary["max_abs_dscore"] is not None:
        used.append(summary["max_abs_dscore"] / thresholds.max_abs_dscore)
    return max(used)


@pytest.mark.parametrize(
    "bug, least",
    # overshoot on the tamed detector with the fp32 defaults / with RECALL_ONLY: 130 / 68, 200 / 100, 7.5 / 3.75,
    # 151 / 76 (the NMS threshold only loses detections: recall 0.962, precision 1, |Δscore| 1e-5)
    [
        (transposed_fc_weight, 100),
        (swapped_box_coder_weights, 150),
        (nms_threshold_off, 6),
        (level_mapping_shifted, 100),
    ],
)
def test_a_wrong_head_fails_at_network_definition_level_only(
    backend, deployment, torchvision_reference, tmp_path, monkeypatch, default_config, bug, least
):
    """The fp32 verdict as configured (config.yaml `verify.thresholds.fp32`) passes the right head with room to
    spare and fails each wrong one by `least` times its allowance or more, beyond what recall and precision at 0.99
    gave (about twice: the recall allowance is halved)."""
    manifest = bug(json.loads((deployment.weights / "manifest.json").read_text()), monkeypatch)
    record = record_of(backend, deployment.onnx, "fp32", deployment.weights, manifest=manifest)
    monkeypatch.undo()
    thresholds = Thresholds.from_config(default_config["verify"]["thresholds"]["fp32"])
    deployment_form = onnxruntime_static_head_executor(
        deployment.onnx, deployment.manifest, deployment.tensors, device="cpu"
    )
    twin = match_detections(torchvision_reference, deployment.detections(deployment_form)).summary()
    assert thresholds.failures(twin) == [] and overshoot(thresholds, twin) <= 0.01  # the twin head is right
    wrong = match_detections(torchvision_reference, network_detections(deployment, record, tmp_path)).summary()
    assert thresholds.failures(wrong)  # the network handed to TensorRT is wrong
    assert overshoot(thresholds, wrong) >= least > overshoot(RECALL_ONLY, wrong)


# --------------------------------------------------------------------------- verify's level


@pytest.mark.needs_no_cuda
def test_verify_claims_the_network_definition_level_and_honours_require(
    backend, deployment, torchvision_reference, tmp_path
):
    network = tmp_path / "engine_fp32.network.safetensors"
    record_of(backend, deployment.onnx, "fp32", deployment.weights).save(network)
    reference, metrics = tmp_path / "reference.json", tmp_path / "metrics.json"
    reference.write_text(json.dumps(torchvision_reference))
    metrics.write_text(json.dumps({"mAP": 0.5, "mAP50": 0.5}))
    kwargs = dict(
        plan=plan_for_no_gpu_here(tmp_path),
        network=network,
        onnx=deployment.onnx,
        weights_dir=deployment.weights,
        val_json=deployment.coco,
        reference_detections=reference,
        reference_metrics=metrics,
        preprocess=deployment.preprocess,
        postprocess=deployment.postprocess,
        thresholds=Thresholds(min_match_recall=1.0),
        detections_out=tmp_path / "detections.json",
    )
    result = run_verify("fp32", settings={"require": "network-definition"}, out_json=tmp_path / "fp32.json", **kwargs)
    assert result["executor"] == "tensorrt-network" and result["verified_level"] == "network-definition"
    assert result["engine_executed"] is False and "compilation" in result["unverified"]
    assert result["passed"] and result["match_recall"] == 1.0 and result["max_abs_dscore"] <= 1e-4
    with pytest.raises(
        VerifyError,
        match="verify.require is engine but the fp32 plan can only be verified at level "
        "network-definition here: cannot run",
    ):
        run_verify("fp32", settings={"require": "engine"}, out_json=tmp_path / "strict.json", **kwargs)


# --------------------------------------------------------------------------- a large detector's verify job

R50_INPUT = (800, 1344)  # the README's input size for fasterrcnn_resnet50_fpn
VERIFY_JOB_PEAK_BOUND = 3e9  # bytes of resident memory a verify job may peak at (issue 26; docs/BENCHMARKS.md, README)
# a verify job of its own: run_verify with the JSON arguments given, then the process's peak resident memory
VERIFY_JOB = """
import json, sys
from pathlib import Path
from trtflow.run.verify import Thresholds, run_verify
arguments = json.loads(sys.argv[1])
run_verify("fp32", **{**arguments, "thresholds": Thresholds(**arguments["thresholds"])})
print(next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")))
"""


@pytest.mark.needs_no_cuda
def test_a_large_detector_verifies_at_network_definition_within_the_memory_bound(backend, default_config, tmp_path):
    """Issue 26's acceptance: docs/BENCHMARKS.md's large case, torchvision fasterrcnn_resnet50_fpn (random weights,
    seed 0, 5 classes, config.yaml's head) at 800x1344, verifies fp32 as configured at level network-definition in
    a fresh process (one 640x480 image), whose peak resident memory (VmHWM: a child's getrusage maxrss would carry
    this process's peak across exec) stays under the 3 GB bound: 1.40 GB on a 2-core Xeon. With netexec keeping every
    tensor to the end of the forward pass (NetworkExecutor.last_readers unused) the same job peaked at 4.31 GB and
    failed here."""
    torch.manual_seed(0)
    model = build_detector({**default_config["model"], "arch": "fasterrcnn_resnet50_fpn", "num_classes": 5}).eval()
    case = Deployment(tmp_path, model, R50_INPUT)
    case.coco.write_text(json.dumps(small_coco(tmp_path, [(480, 640)])))
    network = tmp_path / "engine_fp32.network.safetensors"
    record_of(backend, case.onnx, "fp32", case.weights).save(network)
    reference = case.detections(case.torchvision)
    (tmp_path / "reference.json").write_text(json.dumps(reference))
    (tmp_path / "metrics.json").write_text(json.dumps(coco_map(case.coco, reference)))
    arguments = {
        "plan": str(plan_for_no_gpu_here(tmp_path)),
        "network": str(network),
        "onnx": str(case.onnx),
        "weights_dir": str(case.weights),
        "val_json": str(case.coco),
        "reference_detections": str(tmp_path / "reference.json"),
        "reference_metrics": str(tmp_path / "metrics.json"),
        "preprocess": case.preprocess,
        "postprocess": case.postprocess,
        "thresholds": default_config["verify"]["thresholds"]["fp32"],
        "settings": default_config["verify"],
        "out_json": str(tmp_path / "fp32.json"),
        "detections_out": str(tmp_path / "fp32_detections.json"),
    }
    job = subprocess.run(
        [sys.executable, "-c", VERIFY_JOB, json.dumps(arguments)], capture_output=True, text=True, timeout=600
    )
    assert job.returncode == 0, job.stderr[-3000:]
    peak = int(job.stdout.splitlines()[-1].split()[1]) * 1024  # "VmHWM:  1408300 kB", kB of 1024 bytes
    result = json.loads((tmp_path / "fp32.json").read_text())
    assert result["executor"] == "tensorrt-network" and result["verified_level"] == "network-definition"
    assert result["images"] == 1 and result["reference_detections"] >= 40
    assert result["passed"] and result["match_recall"] == 1.0 and result["match_precision"] == 1.0
    assert peak < VERIFY_JOB_PEAK_BOUND, f"the verify job peaked at {peak / 1e9:.2f} GB"


# --------------------------------------------------------------------------- semantics and refusals


def test_loops_with_iterator_and_trip_count(backend):
    """A running sum over an ITERATOR, a COUNT trip limit and a LAST_VALUE output, against torch."""
    trt = backend.trt
    network = backend.create_builder().create_network(0)
    x = network.add_input("x", trt.float32, (5, 3))
    loop = network.add_loop()
    loop.add_trip_limit(network.add_constant((), np.asarray(5, dtype=np.int32)).get_output(0), trt.TripLimit.COUNT)
    row = loop.add_iterator(x, 0, False).get_output(0)
    total = loop.add_recurrence(network.add_constant((3,), np.zeros(3, dtype=np.float32)).get_output(0))
    step = network.add_elementwise(total.get_output(0), row, trt.ElementWiseOperation.SUM).get_output(0)
    total.set_input(1, step)
    network.mark_output(loop.add_loop_output(step, trt.LoopOutput.LAST_VALUE).get_output(0))
    values = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    (result,) = NetworkExecutor(read_network(network, trt))({"x": values}).values()
    assert torch.equal(result, values.sum(0))


def test_quantize_rounds_half_to_even_and_saturates(backend):
    trt = backend.trt
    network = backend.create_builder().create_network(0)
    x = network.add_input("x", trt.float32, (6,))
    scale = network.add_constant((), np.asarray(0.5, dtype=np.float32)).get_output(0)
    quantize = network.add_quantize(x, scale, trt.int8)
    network.mark_output(quantize.get_output(0))
    (result,) = NetworkExecutor(read_network(network, trt))(
        {"x": torch.tensor([0.25, 0.75, -0.25, 1.25, 100, -100])}
    ).values()
    assert result.tolist() == [0, 2, 0, 2, 127, -128]


def test_an_unknown_layer_type_is_refused_by_index_name_and_type(backend):
    trt = backend.trt
    network = backend.create_builder().create_network(0)
    x = network.add_input("x", trt.float32, (1, 4, 2, 2))
    layer = network.add_lrn(x, 3, 1.0, 0.75, 1.0)
    layer.name = "normalise"
    network.mark_output(layer.get_output(0))
    with pytest.raises(
        NetworkExecutionError,
        match=r"layer 0 'normalise' \(LRN\): the network-definition executor "
        "does not implement LRN layers",
    ):
        NetworkExecutor(read_network(network, trt))


def test_wrong_input_shape_is_refused(backend, small_detector):
    record = record_of(backend, small_detector / "features.onnx", "fp32")
    with pytest.raises(
        ValueError,
        match=r"input 'images' has shape \[1, 3, 64, 64\]; the network declares "
        r"\[-1, 3, 128, 160\]",
    ):
        NetworkExecutor(record)({"images": torch.zeros(1, 3, 64, 64)})


def test_record_round_trip_and_bad_files(backend, small_detector, tmp_path):
    record = record_of(backend, small_detector / "features.qdq.onnx", "int8")
    path = tmp_path / "network.safetensors"
    record.save(path)
    loaded = NetworkRecord.load(path)
    assert loaded.layers == record.layers and loaded.outputs == record.outputs and loaded.inputs == record.inputs
    assert loaded.arrays.keys() == record.arrays.keys()
    assert all(
        np.array_equal(loaded.arrays[k], v) and loaded.arrays[k].dtype == v.dtype for k, v in record.arrays.items()
    )
    assert loaded.source["module"] == "tensorrt_rtx"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(NetworkRecordError, match="broken.safetensors is not a trtflow network record"):
        NetworkRecord.load(broken)
    with pytest.raises(FileNotFoundError, match="missing.network.safetensors does not exist"):
        NetworkRecord.load(tmp_path / "missing.network.safetensors")


def test_nms_layer_selects_like_torchvision(backend):
    """INMSLayer as built on TensorRT-RTX's network API (which cannot build it into a plan) against
    torchvision's NMS, as NvInfer.h documents the layer: per batch item the (box, class) scores above the
    score threshold, best first without regard to class, of which only the TopK limit are considered (per
    batch item); per class, greedy NMS among those, at most MaxOutputBoxesPerClass kept; the selected
    indices ordered by batch, then by decreasing score."""
    import torchvision

    trt = backend.trt
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(2, 40, 2, generator=generator) * 50
    boxes = torch.cat([corners, corners + 5 + torch.rand(2, 40, 2, generator=generator) * 30], -1)
    scores = torch.rand(2, 40, 3, generator=generator)
    network = backend.create_builder().create_network(0)
    constant = lambda value, dtype: network.add_constant((), np.asarray(value, dtype=dtype)).get_output(0)  # noqa: E731
    layer = network.add_nms(
        network.add_input("boxes", trt.float32, (2, 40, 4)),
        network.add_input("scores", trt.float32, (2, 40, 3)),
        constant(6, np.int32),
    )
    layer.set_input(3, constant(0.4, np.float32))
    layer.set_input(4, constant(0.2, np.float32))
    layer.topk_box_limit = 30
    network.mark_output(layer.get_output(0))
    network.mark_output(layer.get_output(1))
    selected, count = NetworkExecutor(read_network(network, trt))({"boxes": boxes, "scores": scores}).values()
    expected = []
    for batch in range(2):
        flat = scores[batch].flatten()  # (box, class) pairs, box-major
        best = torch.sort(flat, descending=True, stable=True).indices
        best = best[flat[best] > 0.2][:30]
        assert (flat > 0.2).sum() > 30 and len(set((best % 3).tolist())) == 3  # the limit bites, across classes
        kept = []
        for cls in range(3):
            box = best[best % 3 == cls] // 3
            score = scores[batch, box, cls]
            kept += [
                (float(score[i]), cls, int(box[i])) for i in torchvision.ops.nms(boxes[batch, box], score, 0.4)[:6]
            ]
        expected += [[batch, kept_class, kept_box] for _, kept_class, kept_box in sorted(kept, reverse=True)]
    assert selected.tolist() == expected and int(count) == len(expected) > 12
    assert [row[1] for row in expected] != sorted(row[1] for row in expected)  # classes interleave by score


def test_scatter_nd_writes_the_updates(backend):
    trt = backend.trt
    network = backend.create_builder().create_network(0)
    data = network.add_input("data", trt.float32, (2, 5))
    indices = network.add_constant((3, 2), np.asarray([[0, 1], [1, 4], [0, 3]], dtype=np.int32)).get_output(0)
    updates = network.add_constant((3,), np.asarray([7, 8, 9], dtype=np.float32)).get_output(0)
    network.mark_output(network.add_scatter(data, indices, updates, trt.ScatterMode.ND).get_output(0))
    (result,) = NetworkExecutor(read_network(network, trt))({"data": torch.zeros(2, 5)}).values()
    assert result.tolist() == [[0, 7, 0, 9, 0], [0, 0, 0, 0, 8]]
