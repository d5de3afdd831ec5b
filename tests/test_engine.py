"""trtflow.build.engine: real plans built on this CPU by TensorRT-RTX (ahead of time), from small
ONNX graphs that follow the features contract; bad inputs fail clearly; concurrent builds
and the timing-cache file survive each other. Full-TensorRT paths skip with the reason.
"""

import hashlib
import json
import multiprocessing
import re
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from trtflow.backend import BuildError, load_backend
from trtflow.build.engine import (
    CHECKPOINT_KEY,
    BatchProfile,
    EngineSettings,
    EngineSources,
    build_engine,
    check_features_onnx,
    check_same_checkpoint,
    merge_into_file,
    tensor_census,
)
from trtflow.formats.network_record import NetworkRecord
from trtflow.formats.plan_metadata import FORMAT, VERSION, PlanMetadata
from trtflow.formats.usage import INPUT_MEANING
from trtflow.precisions import FP8_E4M3

CHECKPOINT = "c0ffee" * 10 + "abcd"
MODEL_DIR = Path("results/demo_320")  # a `models:` entry's folder, where the engine rule finds its inputs


class TinyFeatures(torch.nn.Module):
    """One FPN level and its RPN head, named as trtflow.build.export names them."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fpn = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.objectness = torch.nn.Conv2d(8, 3, 1)
        self.deltas = torch.nn.Conv2d(8, 12, 1)

    def forward(self, images):
        p1 = self.fpn(torch.relu(self.stem(images)))
        return p1, self.objectness(p1), self.deltas(p1)


def _with_checkpoint(model: onnx.ModelProto, checkpoint: str = CHECKPOINT) -> onnx.ModelProto:
    model.metadata_props.add(key=CHECKPOINT_KEY, value=checkpoint)
    return model


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    program = torch.onnx.export(
        TinyFeatures().eval(),
        (torch.randn(1, 3, 32, 32),),
        dynamo=True,
        opset_version=18,
        input_names=["images"],
        output_names=["p1", "objectness_p1", "deltas_p1"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=64)}},
        verbose=False,
    )
    path = tmp_path_factory.mktemp("onnx") / "features.onnx"
    onnx.save(_with_checkpoint(program.model_proto), str(path))
    return path


def _qdq_conv(name, source, weight, scale):
    """Q/DQ on the activation (per tensor) and on the weights (per output channel), then Conv."""
    w_scale = (np.abs(weight).reshape(len(weight), -1).max(1) / 127).astype(np.float32)
    w_q = np.clip(np.round(weight / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    initializers = [
        numpy_helper.from_array(np.array(scale, np.float32), f"{name}_x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), f"{name}_x_zero"),
        numpy_helper.from_array(w_q, f"{name}_w_q"),
        numpy_helper.from_array(w_scale, f"{name}_w_scale"),
        numpy_helper.from_array(np.zeros(len(weight), np.int8), f"{name}_w_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", [source, f"{name}_x_scale", f"{name}_x_zero"], [f"{name}_x_q"]),
        helper.make_node("DequantizeLinear", [f"{name}_x_q", f"{name}_x_scale", f"{name}_x_zero"], [f"{name}_x_dq"]),
        helper.make_node(
            "DequantizeLinear", [f"{name}_w_q", f"{name}_w_scale", f"{name}_w_zero"], [f"{name}_w_dq"], axis=0
        ),
        helper.make_node("Conv", [f"{name}_x_dq", f"{name}_w_dq"], [name], pads=[weight.shape[-1] // 2] * 4),
    ]
    return nodes, initializers


@pytest.fixture(scope="module")
def qdq_onnx(tmp_path_factory) -> Path:
    """What the calibrate stage hands over: the same contract, with Q/DQ before every Conv."""
    rng = np.random.default_rng(0)
    stem, stem_init = _qdq_conv("stem", "images", rng.normal(size=(8, 3, 3, 3)).astype(np.float32), 0.03)
    obj, obj_init = _qdq_conv("objectness_p1", "p1", rng.normal(size=(3, 8, 1, 1)).astype(np.float32), 0.05)
    dlt, dlt_init = _qdq_conv("deltas_p1", "p1", rng.normal(size=(12, 8, 1, 1)).astype(np.float32), 0.05)
    nodes = [*stem, helper.make_node("Relu", ["stem"], ["p1"]), *obj, *dlt]
    p1_shape = ["batch", 8, 32, 32]
    graph = helper.make_graph(
        nodes,
        "features_qdq",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [
            helper.make_tensor_value_info("p1", TensorProto.FLOAT, p1_shape),
            helper.make_tensor_value_info("objectness_p1", TensorProto.FLOAT, ["batch", 3, 32, 32]),
            helper.make_tensor_value_info("deltas_p1", TensorProto.FLOAT, ["batch", 12, 32, 32]),
        ],
        [*stem_init, *obj_init, *dlt_init],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path_factory.mktemp("onnx") / "features.qdq.onnx"
    onnx.save(_with_checkpoint(model), str(path))
    return path


def _build(tmp_path, onnx_path, precision, **settings):
    plan, meta = tmp_path / f"engine_{precision}.plan", tmp_path / f"engine_{precision}.json"
    settings.setdefault("batch", BatchProfile(1, 2, 4))
    metadata = build_engine(
        EngineSources(onnx=onnx_path), EngineSettings(precision, **settings), plan, backend="tensorrt_rtx"
    )
    return plan, meta, metadata


def _check_plan_files(plan: Path, meta: Path, metadata: PlanMetadata):
    assert PlanMetadata.read(meta) == metadata
    assert meta.read_text().startswith(f'{{\n  "format": "{FORMAT}/{VERSION}",\n  "backend": "tensorrt_rtx",\n')
    data = plan.read_bytes()
    assert metadata.plan_bytes == len(data) > 10_000
    assert metadata.plan_sha256 == hashlib.sha256(data).hexdigest()
    assert metadata.backend == "tensorrt_rtx" and metadata.backend_version == load_backend("tensorrt_rtx").version
    assert metadata.built_on == "cpu-aot" and metadata.gpu is None
    assert {"8.0", "8.6", "8.9", "12.0"} <= set(metadata.compute_capabilities)
    assert "9.0" not in metadata.compute_capabilities
    assert not [p for p in plan.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_fp32_plan(tmp_path, tiny_onnx):
    plan, meta, metadata = _build(tmp_path, tiny_onnx, "fp32")
    _check_plan_files(plan, meta, metadata)
    assert metadata.inputs == [
        {
            "name": "images",
            "dtype": "FLOAT",
            "shape": [-1, 3, 32, 32],
            "profile": {"min": [1, 3, 32, 32], "opt": [2, 3, 32, 32], "max": [4, 3, 32, 32]},
            "layout": "NCHW",
            "meaning": INPUT_MEANING,
        }
    ]
    # built outside the pipeline: no preprocessing or classes to record, but the command that loads it
    assert metadata.preprocess is metadata.classes is None
    assert metadata.runtime["command"].endswith("--loadEngine=engine_fp32.plan --shapes=images:2x3x32x32")
    assert [(o["name"], o["dtype"], o["shape"]) for o in metadata.outputs] == [
        ("p1", "FLOAT", [-1, 8, 16, 16]),
        ("objectness_p1", "FLOAT", [-1, 3, 16, 16]),
        ("deltas_p1", "FLOAT", [-1, 12, 16, 16]),
    ]
    assert metadata.layer_precisions["source"] == "network_definition"
    assert metadata.layer_precisions["by_layer_type"]["CONVOLUTION"] == {"FLOAT": 4}
    assert metadata.sources["checkpoint_sha256"] == CHECKPOINT
    assert metadata.sources["onnx"]["sha256"] == hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()
    assert metadata.timing_cache["used"] is False


def test_fp16_plan_keeps_fp32_input(tmp_path, tiny_onnx):
    plan, meta, metadata = _build(tmp_path, tiny_onnx, "fp16")
    _check_plan_files(plan, meta, metadata)
    assert metadata.inputs[0]["dtype"] == "FLOAT"
    assert {o["dtype"] for o in metadata.outputs} == {"HALF"}  # a features-only plan hands fp16 maps to the head
    by_type = metadata.layer_precisions["by_layer_type"]
    assert by_type["CONVOLUTION"] == {"HALF": 4} and by_type["CAST"] == {"HALF": 1}
    assert "FLOAT" not in metadata.layer_precisions["output_dtypes"]


def test_int8_plan_from_qdq(tmp_path, qdq_onnx):
    plan, meta, metadata = _build(tmp_path, qdq_onnx, "int8")
    _check_plan_files(plan, meta, metadata)
    assert metadata.int8_mode == "explicit"
    by_type = metadata.layer_precisions["by_layer_type"]
    # engine.quantized_float: fp16 (the default): fp16 between the quantized layers
    assert by_type["QUANTIZE"] == {"INT8": 3} and by_type["DEQUANTIZE"] == {"HALF": 6}
    assert by_type["CONVOLUTION"] == {"HALF": 3}


def test_engine_json_records_the_files_it_was_given(tmp_path, tiny_onnx, monkeypatch):
    """Built from a `models:` entry's folder, the plan's JSON names that folder's files, which `trtflow detect`
    finds again (relative to the pipeline's working directory)."""
    monkeypatch.chdir(tmp_path)
    features = MODEL_DIR / "onnx/features.onnx"
    features.parent.mkdir(parents=True)
    features.write_bytes(tiny_onnx.read_bytes())
    plan, network = MODEL_DIR / "engine_fp32.plan", MODEL_DIR / "engine_fp32.network.safetensors"
    metadata = build_engine(
        EngineSources(onnx=features),
        EngineSettings("fp32"),
        plan,
        backend="tensorrt_rtx",
        network_record_path=network,
    )
    assert metadata.sources["onnx"]["path"] == str(features)
    assert metadata.network_record["path"] == str(network)
    assert metadata.runtime["command"].startswith("tensorrt_rtx --loadEngine=engine_fp32.plan ")
    assert set(re.findall(r"results/[^/\"]*", plan.with_suffix(".json").read_text())) == {str(MODEL_DIR)}


def test_debug_outputs_are_added_and_unknown_names_refused(tmp_path, tiny_onnx):
    network_names = [node.output[0] for node in onnx.load(str(tiny_onnx)).graph.node if node.op_type == "Relu"]
    _, _, metadata = _build(tmp_path, tiny_onnx, "fp32", debug_outputs=tuple(network_names))
    assert [o["name"] for o in metadata.outputs][-1] == network_names[0]
    with pytest.raises(ValueError, match=r"engine.debug_outputs \['no_such_tensor'\] are not tensors"):
        _build(tmp_path, tiny_onnx, "fp32", debug_outputs=("no_such_tensor",))


# -- the detector: features + the TensorRT-API head ------------------------------------------


@pytest.fixture(scope="module")
def small_detector(tmp_path_factory, default_config):
    """The demo detector (random weights) at 128x160: features.onnx, its int8 and fp8 Q/DQ twins, head weights."""
    from trtflow.build.export import export_features
    from trtflow.build.weights import export_head
    from trtflow.common.model import build_detector
    from trtflow.common.qdq import insert_qdq, quantization_plan

    torch.manual_seed(0)
    model = build_detector({**default_config["model"], "input": {"height": 128, "width": 160}}).eval()
    folder = tmp_path_factory.mktemp("detector")
    features = export_features(
        model,
        (128, 160),
        folder / "features.onnx",
        dynamic_batch=True,
        simplify=False,
        metadata={CHECKPOINT_KEY: CHECKPOINT},
    )
    export_head(model, (128, 160), folder / "weights", checkpoint_sha256=CHECKPOINT)
    plan = quantization_plan(features)
    amax = {name: 4.0 for name in plan.activations}
    onnx.save(insert_qdq(features, plan, amax), str(folder / "features.qdq.onnx"))
    onnx.save(insert_qdq(features, plan, amax, FP8_E4M3), str(folder / "features.fp8.qdq.onnx"))
    return folder


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_detector_plan_has_the_head_contract(tmp_path, small_detector, precision):
    onnx_path = small_detector / ("features.qdq.onnx" if precision == "int8" else "features.onnx")
    metadata = build_engine(
        EngineSources(onnx=onnx_path, head_weights=small_detector / "weights"),
        EngineSettings(precision, batch=BatchProfile(1, 2, 2), debug_outputs=("head.proposals",)),
        tmp_path / "engine.plan",
        backend="tensorrt_rtx",
    )
    manifest = json.loads((small_detector / "weights" / "manifest.json").read_text())
    k, proposals = manifest["box"]["detections_per_img"], manifest["rpn"]["post_nms_top_n"]
    assert [(o["name"], o["dtype"], o["shape"]) for o in metadata.outputs] == [
        ("num_detections", "INT32", [-1]),
        ("boxes", "FLOAT", [-1, k, 4]),
        ("scores", "FLOAT", [-1, k]),
        ("classes", "INT32", [-1, k]),
        ("head.proposals", "FLOAT", [-1, proposals, 4]),
    ]
    assert metadata.inputs[0]["profile"]["max"] == [2, 3, 128, 160]
    assert metadata.head and (metadata.roi_align, metadata.nms) == ("builtin", "static")
    assert metadata.plan_bytes == (tmp_path / "engine.plan").stat().st_size
    dtypes = metadata.layer_precisions["output_dtypes"]
    assert ("HALF" in dtypes) == (precision != "fp32")  # fp16 and int8 run the head in fp16
    assert ("INT8" in dtypes) == (precision == "int8")


def test_features_and_weights_from_different_checkpoints_fail_before_building(tmp_path, small_detector):
    model = onnx.load(str(small_detector / "features.onnx"))
    next(p for p in model.metadata_props if p.key == CHECKPOINT_KEY).value = "feedbeef" * 8  # another checkpoint
    other = tmp_path / "features.onnx"
    onnx.save(model, str(other))
    with pytest.raises(ValueError, match=r"exported from checkpoint feedbeeffeed\.\.\. but .*manifest.json holds"):
        build_engine(
            EngineSources(onnx=other, head_weights=small_detector / "weights"),
            EngineSettings("fp32"),
            tmp_path / "engine.plan",
            backend="tensorrt_rtx",
        )
    assert not (tmp_path / "engine.plan").exists()


# -- bad inputs ---------------------------------------------------------------------------


def test_int8_needs_the_qdq_onnx(tmp_path, tiny_onnx):
    qdq_twin = re.escape(str(tiny_onnx.with_name("features.qdq.onnx")))
    with pytest.raises(
        ValueError, match=rf"has no Q/DQ nodes: int8 .* from its Q/DQ graph {qdq_twin} \(rule calibrate"
    ):
        _build(tmp_path, tiny_onnx, "int8")
    assert not list(tmp_path.iterdir()), "a failed build left files"


def test_fp32_refuses_a_quantized_onnx(tmp_path, qdq_onnx):
    export = re.escape(str(qdq_onnx.with_name("features.onnx")))
    with pytest.raises(ValueError, match=rf"is quantized .* built from the unquantized features ONNX {export}$"):
        _build(tmp_path, qdq_onnx, "fp32")


def test_onnx_messages_name_the_models_files(tiny_onnx, qdq_onnx):
    """Under `models:` the files are results/<model>/...: each message names the file it was given and the
    files of that model that fix it, never the single-model results/onnx/."""
    features, qdq = MODEL_DIR / "onnx/features.onnx", MODEL_DIR / "onnx/features.qdq.onnx"
    manifest = MODEL_DIR / "weights/manifest.json"
    with pytest.raises(ValueError) as plain_for_int8:
        check_features_onnx(onnx.load(str(tiny_onnx)), features, EngineSettings("int8"))
    assert str(plain_for_int8.value) == (
        f"{features} has no Q/DQ nodes: int8 (engine.int8_mode: explicit) is built from its Q/DQ graph {qdq} "
        f"(rule calibrate: snakemake {qdq})"
    )
    with pytest.raises(ValueError) as quantized_for_fp16:
        check_features_onnx(onnx.load(str(qdq_onnx)), qdq, EngineSettings("fp16"))
    assert str(quantized_for_fp16.value).endswith(f"plan is built from the unquantized features ONNX {features}")
    model = onnx.load(str(qdq_onnx))
    with pytest.raises(ValueError) as other_checkpoint:
        check_same_checkpoint(model, qdq, "123456789abcdef", manifest)
    assert str(other_checkpoint.value).endswith(f"(snakemake -f {features} {qdq} {manifest})")
    del model.metadata_props[:]
    with pytest.raises(ValueError) as no_checkpoint:
        check_same_checkpoint(model, features, CHECKPOINT, manifest)
    assert str(no_checkpoint.value).endswith(f"re-export it with the pipeline (snakemake -f {features})")


def test_plugin_roi_align_needs_the_library():
    with pytest.raises(
        ValueError,
        match=r"^engine.roi_align = plugin needs a RoIAlign plugin library but none was "
        r"given; pass the one rule plugins writes as EngineSources\(plugin_library=",
    ):
        EngineSources(onnx=__file__).check(EngineSettings("fp32", roi_align="plugin"))


def test_implicit_int8_needs_its_table():
    settings = EngineSettings("int8", int8_mode="implicit")
    with pytest.raises(
        ValueError,
        match=r"int8_mode = implicit needs a calibration table but none was given; pass "
        r"the one rule calibrate writes as EngineSources\(calibration_table=",
    ):
        EngineSources(onnx=__file__).check(settings)
    with pytest.raises(FileNotFoundError, match=r"calibration table missing/int8calib.table does not exist"):
        EngineSources(onnx=__file__, calibration_table="missing/int8calib.table").check(settings)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"precision": "int8", "int8_mode": "implicit"}, "int8_mode = implicit needs TensorRT 10"),
        ({"roi_align": "plugin"}, "roi_align = plugin: .* set engine.roi_align: builtin"),
        ({"nms": "builtin_layer"}, "nms = builtin_layer: .* set engine.nms: static"),
    ],
)
def test_rtx_refuses_full_tensorrt_options(option, message):
    settings = EngineSettings(**{"precision": "fp32", **option})
    with pytest.raises(ValueError, match=message):
        settings.check_backend(load_backend("tensorrt_rtx"))


def test_the_tensor_census_counts_dtypes_and_bytes_at_batch_1():
    """The engine JSON's census (network_record.tensor_dtypes): a dynamic batch counts as 1, constants apart."""
    record = NetworkRecord(
        inputs=[{"name": "images", "dtype": "FLOAT", "shape": [-1, 3, 4, 4]}],
        outputs=["y"],
        layers=[
            {"type": "CONSTANT", "outputs": [{"name": "scale", "dtype": "HALF", "shape": [2]}]},
            {"type": "CAST", "outputs": [{"name": "x16", "dtype": "HALF", "shape": [-1, 3, 4, 4]}]},
            {"type": "QUANTIZE", "outputs": [{"name": "y", "dtype": "FP8", "shape": [-1, 3, 4, 4]}]},
        ],
    )
    assert tensor_census(record) == {
        "activations": {
            "FLOAT": {"tensors": 1, "bytes": 192},
            "HALF": {"tensors": 1, "bytes": 96},
            "FP8": {"tensors": 1, "bytes": 48},
        },
        "constants": {"HALF": {"tensors": 1, "bytes": 4}},
    }


def test_fp8_targets_start_at_its_least_compute_capability():
    """TensorRT-RTX builds fp8 for the configured targets from 8.9 on, by default for the default ones from 8.9 on;
    the other precisions keep the configuration as it is (none: the backend's own default), and fp8 with no target
    left is refused by key."""
    rtx = load_backend("tensorrt_rtx")
    assert EngineSettings("fp8").build_targets(rtx) == ("8.9", "12.0", "12.1")
    assert EngineSettings("fp8", compute_capabilities=("8.6", "12.0")).build_targets(rtx) == ("12.0",)
    assert EngineSettings("int8").build_targets(rtx) == ()
    assert EngineSettings("int8", compute_capabilities=("8.6",)).build_targets(rtx) == ("8.6",)
    with pytest.raises(
        ValueError,
        match=r"engine.rtx.compute_capabilities = \['8.0', '8.6'\]: fp8 plans need compute "
        r"capability 8.9 or later with backend tensorrt_rtx \(Ada 8.9, .*\); add one of",
    ):
        EngineSettings("fp8", compute_capabilities=("8.0", "8.6")).check_backend(rtx)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"roi_align": "fast"}, r"engine.roi_align = 'fast': use one of builtin, plugin"),
        (
            {"batch": {"min": 4, "opt": 2, "max": 8}},
            r"engine.batch: \{'min': 4, 'opt': 2, 'max': 8\} needs 1 <= min <= opt <= max",
        ),
        ({"opt_level": 9}, r"engine.opt_level = 9: use 0 \(fastest build\) to 5"),
        ({"workspace_mb": 0}, r"engine.workspace_mb = 0: use a positive number of MiB"),
    ],
)
def test_bad_settings_name_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        EngineSettings.from_config(config, "fp32")


def test_settings_from_config():
    settings = EngineSettings.from_config(
        {
            "workspace_mb": 512,
            "opt_level": 4,
            "batch": {"min": 1, "opt": 4, "max": 8},
            "roi_align": "builtin",
            "nms": "static",
            "int8_mode": "explicit",
            "rtx": {"compute_capabilities": ["8.6", 12.0]},
            "debug_outputs": ["p2"],
        },
        "fp16",
    )
    assert settings == EngineSettings(
        "fp16", 512, 4, BatchProfile(1, 4, 8), compute_capabilities=("8.6", "12.0"), debug_outputs=("p2",)
    )
    assert settings.head_dtype == "float16"


def test_different_checkpoints_are_refused(tiny_onnx):
    model = onnx.load(str(tiny_onnx))
    check_same_checkpoint(model, tiny_onnx, CHECKPOINT, Path("manifest.json"))
    with pytest.raises(ValueError, match=r"from checkpoint c0ffeec0ffee\.\.\. but manifest.json holds .* 123456789abc"):
        check_same_checkpoint(model, tiny_onnx, "123456789abcdef", Path("manifest.json"))
    del model.metadata_props[:]
    with pytest.raises(ValueError, match="has no 'trtflow.checkpoint_sha256' metadata"):
        check_same_checkpoint(model, tiny_onnx, CHECKPOINT, Path("manifest.json"))


def test_static_batch_must_match_the_profile(tmp_path, tiny_onnx):
    model = onnx.load(str(tiny_onnx))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    static = tmp_path / "static.onnx"
    onnx.save(model, str(static))
    with pytest.raises(ValueError, match=r"static batch of 1 but engine.batch = .*to \{min: 1, opt: 1, max: 1\}"):
        _build(tmp_path, static, "fp32")
    _, _, metadata = _build(tmp_path, static, "fp32", batch=BatchProfile(1, 1, 1))
    assert metadata.inputs[0]["shape"] == [1, 3, 32, 32] and "profile" not in metadata.inputs[0]


def test_unreadable_onnx_names_the_file(tmp_path):
    broken = tmp_path / "features.onnx"
    broken.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=rf"{broken} is not a readable ONNX model"):
        _build(tmp_path / "out", broken, "fp32")
    assert not (tmp_path / "out").exists()


def test_missing_onnx_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ONNX .*nothing.onnx does not exist; build it first"):
        _build(tmp_path, tmp_path / "nothing.onnx", "fp32")


def test_build_errors_carry_tensorrt_messages(tmp_path):
    # A batch hard-coded into a Reshape (a classic export mistake) only fails when TensorRT builds the profile.
    nodes = [
        helper.make_node("Reshape", ["images", "flat"], ["p1"]),
        helper.make_node("Relu", ["images"], ["objectness_p1"]),
        helper.make_node("Sigmoid", ["images"], ["deltas_p1"]),
    ]
    image_shape = ["batch", 3, 4, 4]
    graph = helper.make_graph(
        nodes,
        "hard_coded_batch",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, image_shape)],
        [
            helper.make_tensor_value_info("p1", TensorProto.FLOAT, [1, 48]),
            helper.make_tensor_value_info("objectness_p1", TensorProto.FLOAT, image_shape),
            helper.make_tensor_value_info("deltas_p1", TensorProto.FLOAT, image_shape),
        ],
        [numpy_helper.from_array(np.array([1, 48], np.int64), "flat")],
    )
    path = tmp_path / "features.onnx"
    onnx.save(_with_checkpoint(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])), str(path))
    with pytest.raises(BuildError, match=r"failed to build the engine; TensorRT said:\n.*reshape would change volume"):
        _build(tmp_path / "out", path, "fp32")
    assert not (tmp_path / "out").exists()


# -- concurrency ----------------------------------------------------------------------------


def _append_entry(path: str, entry: str) -> None:
    def merge(stored: bytes | None) -> bytes:
        entries = json.loads(stored) if stored else []
        time.sleep(0.2)  # hold the lock long enough for the writers to overlap
        return json.dumps(sorted([*entries, entry])).encode()

    merge_into_file(Path(path), merge)


def test_locked_merge_keeps_every_concurrent_writer(tmp_path):
    path = tmp_path / "cache" / "timing.cache"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_entry, args=(str(path), f"build{i}")) for i in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [writer.exitcode for writer in writers] == [0] * 4
    assert json.loads(path.read_bytes()) == ["build0", "build1", "build2", "build3"]


def _build_in_process(onnx_path: str, out_dir: str, precision: str) -> None:
    out = Path(out_dir)
    build_engine(
        EngineSources(onnx=onnx_path),
        EngineSettings(precision),
        out / f"engine_{precision}.plan",
        backend="tensorrt_rtx",
        timing_cache=out / "cache" / "timing.cache",
    )


def test_two_concurrent_builds_share_the_output_directory(tmp_path, tiny_onnx):
    model = onnx.load(str(tiny_onnx))  # a static batch of 1 matches the default engine.batch
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    static = tmp_path / "features.onnx"
    onnx.save(model, str(static))
    context = multiprocessing.get_context("spawn")
    builds = [context.Process(target=_build_in_process, args=(str(static), str(tmp_path), p)) for p in ("fp32", "fp16")]
    for build in builds:
        build.start()
    for build in builds:
        build.join(120)
    assert [build.exitcode for build in builds] == [0, 0]
    for precision in ("fp32", "fp16"):
        metadata = json.loads((tmp_path / f"engine_{precision}.json").read_text())
        plan = (tmp_path / f"engine_{precision}.plan").read_bytes()
        assert metadata["plan_sha256"] == hashlib.sha256(plan).hexdigest()
        assert metadata["precision"] == precision
        # TensorRT-RTX ignores timing caches; the metadata says so instead of writing an empty one.
        assert metadata["timing_cache"] == {
            "used": False,
            "reason": f"tensorrt_rtx {metadata['backend_version']} does not use timing caches",
        }


# -- full TensorRT (skipped here) -------------------------------------------------------------


@pytest.mark.needs_full_tensorrt
def test_tensorrt_timing_cache_grows_across_concurrent_builds(tmp_path, tiny_onnx):
    cache = tmp_path / "cache" / "timing.cache"
    context = multiprocessing.get_context("spawn")
    builds = [
        context.Process(target=_build_in_process, args=(str(tiny_onnx), str(tmp_path), precision))
        for precision in ("fp32", "fp16")
    ]
    for build in builds:
        build.start()
    for build in builds:
        build.join(300)
    assert [build.exitcode for build in builds] == [0, 0]
    assert cache.stat().st_size > 0
    for precision in ("fp32", "fp16"):
        metadata = json.loads((tmp_path / f"engine_{precision}.json").read_text())
        assert metadata["timing_cache"]["used"] and metadata["built_on"] == "gpu"


@pytest.mark.needs_full_tensorrt
def test_tensorrt_10_implicit_int8_from_the_table(tmp_path, tiny_onnx):
    backend = load_backend("tensorrt")
    if not backend.capabilities.implicit_calibrator:
        pytest.skip(f"{backend.describe()} removed implicit INT8 (TensorRT 11+)")
    scale = np.float32(2.0 / 127).view(np.uint32)
    table = tmp_path / "int8calib.table"
    names = ["images", "p1", "objectness_p1", "deltas_p1"]
    table.write_text(f"TRT-{backend.major}000-EntropyCalibration2\n" + "".join(f"{n}: {scale:08x}\n" for n in names))
    metadata = build_engine(
        EngineSources(onnx=tiny_onnx, calibration_table=table),
        EngineSettings("int8", int8_mode="implicit", batch=BatchProfile(1, 2, 4)),
        tmp_path / "engine_int8.plan",
        backend=backend,
    )
    assert metadata.int8_mode == "implicit"
    assert metadata.layer_precisions["source"] == "engine_inspector"
    assert metadata.layer_precisions["output_dtypes"].get("INT8", 0) > 0
