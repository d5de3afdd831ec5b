"""trtflow.build.head_network: the head built with the TensorRT network API.

TensorRT-RTX builds real plans on this CPU-only machine (ahead of time) but cannot run them, so the
tests here build: fp32 with a dynamic batch, fp16 with a static one, both box-head kinds, the MobileNet
level layout; they check the output contract, that only layers every backend builds are used, and the
errors for the full-TensorRT-only options. Numbers are checked where an engine can run (trtflow.run.verify).
"""

import pytest
import torch

import trtflow.build.head_network
import trtflow.common.head
from test_weights import tame, tiny_fpn_detector, torchvision_detector
from trtflow.backend import load_backend
from trtflow.backend.roi_align_plugin import register_plugins
from trtflow.build.head_network import HeadBuildError, add_head
from trtflow.build.weights import export_head
from trtflow.common.plugins import DEFAULT_LIBRARY
from trtflow.formats.head_weights import load_head

rtx = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (pip install tensorrt-rtx-cu13) is not installed")

CONTRACT = {"num_detections": "INT32", "boxes": "FLOAT", "scores": "FLOAT", "classes": "INT32"}
DEBUG_TENSORS = (
    "head.proposals",
    "head.proposal_scores",
    "head.proposal_valid",
    "head.roi_features",
    "head.class_logits",
    "head.box_deltas",
    "head.candidate_scores",
    "head.candidate_boxes",
)


def exported(tmp_path, model, input_hw):
    export_head(model, input_hw, tmp_path, checkpoint_sha256="0" * 64)
    return load_head(tmp_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("tiny"), tame(tiny_fpn_detector(), (96, 128)), (96, 128))


@pytest.fixture(scope="module")
def tiny_conv(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("conv"), tame(tiny_fpn_detector(conv_head=True), (96, 128)), (96, 128))


def head_network(trt, manifest, batch, feature_dtype):
    """A strongly typed network whose inputs stand where the parsed features.onnx outputs stand."""
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    features, objectness, deltas = {}, {}, {}
    for level, sizes, ratios in zip(
        manifest["features"], manifest["rpn"]["anchor_sizes"], manifest["rpn"]["aspect_ratios"]
    ):
        (h, w), anchors, name = level["size"], len(sizes) * len(ratios), level["name"]
        features[name] = network.add_input(name, feature_dtype, (batch, level["channels"], h, w))
        objectness[f"objectness_{name}"] = network.add_input(
            f"objectness_{name}", feature_dtype, (batch, anchors, h, w)
        )
        deltas[f"deltas_{name}"] = network.add_input(f"deltas_{name}", feature_dtype, (batch, 4 * anchors, h, w))
    return builder, network, (features, objectness, deltas)


def build(trt, builder, network, batch_range=None):
    config = builder.create_builder_config()
    if batch_range is not None:
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            rest = tuple(tensor.shape)[1:]
            profile.set_shape(tensor.name, *[(b, *rest) for b in batch_range])
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "TensorRT-RTX refused to build the head"
    return plan


def layer_types(network) -> set[str]:
    return {network.get_layer(i).type.name for i in range(network.num_layers)}


def tensor_names(network) -> set[str]:
    return {
        network.get_layer(i).get_output(j).name
        for i in range(network.num_layers)
        for j in range(network.get_layer(i).num_outputs)
    }


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_head_builds_with_tensorrt_rtx(tiny, tiny_conv, dtype):
    """fp32: TwoMLPHead, fp32 features, dynamic batch 1..3. fp16: conv box head, fp16 features, batch 2."""
    (manifest, tensors), batch, feature_dtype, batch_range = (
        (tiny, -1, rtx.float32, (1, 2, 3)) if dtype == "float32" else (tiny_conv, 2, rtx.float16, None)
    )
    builder, network, inputs = head_network(rtx, manifest, batch, feature_dtype)
    outputs = add_head(network, rtx, manifest, tensors, *inputs, dtype=dtype)
    k = manifest["box"]["detections_per_img"]
    shapes = {"num_detections": (batch,), "boxes": (batch, k, 4), "scores": (batch, k), "classes": (batch, k)}
    assert set(outputs) == set(CONTRACT)
    for name, kind in CONTRACT.items():
        tensor = outputs[name]
        assert (tensor.name, tensor.dtype.name, tuple(tensor.shape)) == (name, kind, shapes[name])
        network.mark_output(tensor)
    types = layer_types(network)
    assert {"TOPK", "GATHER", "TRIP_LIMIT", "RECURRENCE", "MATRIX_MULTIPLY", "SELECT"} <= types
    assert not types & {"NMS", "NON_ZERO", "PLUGIN_V2", "PLUGIN_V3"}
    assert ("CONVOLUTION" in types) == (dtype == "float16")
    assert set(DEBUG_TENSORS) <= tensor_names(network)
    plan = build(rtx, builder, network, batch_range)
    assert plan.nbytes > 100_000


def test_budgets_larger_than_candidates_build(tmp_path):
    """4 levels x pre_nms_top_n 8 < post_nms_top_n 60, and 60 proposals x 1 class < 100 detections:
    both are padded (Slice FILL sized from the dynamic batch)."""
    model = tame(tiny_fpn_detector(num_classes=2), (96, 128))
    model.rpn._pre_nms_top_n["testing"] = 8
    manifest, tensors = exported(tmp_path, model, (96, 128))
    builder, network, inputs = head_network(rtx, manifest, -1, rtx.float32)
    outputs = add_head(network, rtx, manifest, tensors, *inputs, dtype="float32")
    assert tuple(outputs["scores"].shape) == (-1, 100)
    for tensor in outputs.values():
        network.mark_output(tensor)
    assert "SLICE" in layer_types(network)
    assert build(rtx, builder, network, (1, 2, 2)).nbytes > 100_000


def test_mobilenet_level_layout_builds(tmp_path):
    """Two stride-32 maps (p5_0 pooled, p5_1 not), 15 anchors per location, a pool level."""
    model = torchvision_detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    model.roi_heads.box_head.fc6 = torch.nn.Linear(256 * 49, 64)  # a small box head keeps the build fast
    model.roi_heads.box_head.fc7 = torch.nn.Linear(64, 64)
    model.roi_heads.box_predictor = type(model.roi_heads.box_predictor)(64, 3)
    manifest, tensors = exported(tmp_path, model, (128, 160))
    builder, network, inputs = head_network(rtx, manifest, 1, rtx.float32)
    outputs = add_head(network, rtx, manifest, tensors, *inputs, dtype="float32")
    for tensor in outputs.values():
        network.mark_output(tensor)
    assert build(rtx, builder, network).nbytes > 100_000


def test_inputs_in_manifest_order_are_accepted(tiny):
    manifest, tensors = tiny
    _, network, (features, objectness, deltas) = head_network(rtx, manifest, 1, rtx.float32)
    outputs = add_head(
        network,
        rtx,
        manifest,
        tensors,
        list(features.values()),
        list(objectness.values()),
        list(deltas.values()),
        dtype=rtx.float32,
    )
    assert tuple(outputs["boxes"].shape) == (1, manifest["box"]["detections_per_img"], 4)


def test_full_tensorrt_options_refused_on_rtx(tiny):
    manifest, tensors = tiny
    _, network, inputs = head_network(rtx, manifest, 1, rtx.float32)
    with pytest.raises(HeadBuildError, match="roi_align: plugin needs full TensorRT.*set engine.roi_align: builtin"):
        add_head(network, rtx, manifest, tensors, *inputs, dtype="float32", roi_align="plugin")


def test_bad_requests_fail_clearly(tiny):
    manifest, tensors = tiny
    _, network, inputs = head_network(rtx, manifest, 1, rtx.float32)
    with pytest.raises(HeadBuildError, match="dtype='int8'"):
        add_head(network, rtx, manifest, tensors, *inputs, dtype="int8")
    with pytest.raises(HeadBuildError, match="roi_align = 'grid': use one of builtin, plugin"):
        add_head(network, rtx, manifest, tensors, *inputs, dtype="float32", roi_align="grid")
    with pytest.raises(HeadBuildError, match="nms = 'soft': use one of static, builtin_layer"):
        add_head(network, rtx, manifest, tensors, *inputs, dtype="float32", nms="soft")
    with pytest.raises(KeyError, match="objectness_p2"):
        add_head(network, rtx, manifest, tensors, inputs[0], {}, inputs[2], dtype="float32")


def test_top_k_beyond_tensorrt_limit_fails_clearly(tmp_path):
    """At 256x320 the stride-4 level has 15360 anchors: a pre_nms_top_n of 4000 cannot be a TopK."""
    model = tiny_fpn_detector()
    model.rpn._pre_nms_top_n["testing"] = 4000
    manifest, tensors = exported(tmp_path, model, (256, 320))
    _, network, inputs = head_network(rtx, manifest, 1, rtx.float32)
    with pytest.raises(HeadBuildError, match="top-4000 exceeds TensorRT's TopK limit of 3840"):
        add_head(network, rtx, manifest, tensors, *inputs, dtype="float32")


def test_network_mirrors_every_head_piece():
    """head_network.py has a builder for each functional piece of head.py, under the same name."""
    pieces = [
        "flatten_rpn_level",
        "decode_boxes",
        "clip_boxes",
        "sides_at_least",
        "pairwise_iou",
        "greedy_nms",
        "rpn_proposals",
        "fpn_levels",
        "bilinear_taps",
        "sample_positions",
        "multilevel_roi_align",
        "box_head",
        "linear",
        "box_detections",
    ]
    for piece in pieces:
        assert callable(getattr(trtflow.common.head, piece)) and callable(getattr(trtflow.build.head_network, piece)), (
            piece
        )


@pytest.mark.needs_full_tensorrt
def test_full_tensorrt_options_build(tmp_path):
    """roi_align: plugin and nms: builtin_layer build only where full TensorRT is (GPU machines)."""
    trt = load_backend("tensorrt").trt
    if not DEFAULT_LIBRARY.is_file():
        pytest.skip(f"{DEFAULT_LIBRARY} is not built (rule plugins)")
    register_plugins(load_backend("tensorrt"), DEFAULT_LIBRARY)
    manifest, tensors = exported(tmp_path, tame(tiny_fpn_detector(), (96, 128)), (96, 128))
    builder, network, inputs = head_network(trt, manifest, 1, trt.float32)
    outputs = add_head(
        network, trt, manifest, tensors, *inputs, dtype="float16", roi_align="plugin", nms="builtin_layer"
    )
    for tensor in outputs.values():
        network.mark_output(tensor)
    assert {"NMS", "PLUGIN_V3"} <= layer_types(network)
    assert build(trt, builder, network).nbytes > 0
