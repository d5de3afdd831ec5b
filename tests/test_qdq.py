"""Q/DQ placement (trtflow.common.qdq) on a small ResNet-like graph, its numerics in ONNX Runtime, and a TensorRT-RTX build."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtflow.common.onnxrun import OnnxSession
from trtflow.common.qdq import KeepFloat, insert_qdq, quantization_plan, quantize_weight, shared_amax
from trtflow.precisions import FP8_E4M3

INPUT_SHAPE = (1, 3, 32, 32)


def resnet_like_model(seed: int = 0) -> onnx.ModelProto:
    """stem conv, an identity residual block, a projected-shortcut block (with BatchNorm), a Concat that
    feeds a conv, an FPN-style Add(lateral conv, non-conv) and a Gemm classifier."""
    rng = np.random.default_rng(seed)
    initializers = []

    def weight(name, *shape):
        fan_in = int(np.prod(shape[1:]))
        initializers.append(
            numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32), name)
        )
        return name

    def bias(name, n):
        initializers.append(numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), name))
        return name

    def conv(name, x, w, b, out, **attrs):
        return helper.make_node("Conv", [x, w, b], [out], name, **attrs)

    nodes = [
        conv("stem_conv", "images", weight("stem_w", 8, 3, 3, 3), bias("stem_b", 8), "stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem"], ["a"], "stem_relu"),
        conv("b1_conv1", "a", weight("b1_w1", 8, 8, 3, 3), bias("b1_b1", 8), "c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "b1_relu1"),
        conv("b1_conv2", "r1", weight("b1_w2", 8, 8, 3, 3), bias("b1_b2", 8), "c2", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["c2", bias("bn_scale", 8), bias("bn_bias", 8), bias("bn_mean", 8), "bn_var"],
            ["bn2"],
            "b1_bn2",
        ),
        helper.make_node("Add", ["bn2", "a"], ["add1"], "b1_add"),
        helper.make_node("Relu", ["add1"], ["o1"], "b1_relu"),
        conv(
            "b2_conv1", "o1", weight("b2_w1", 16, 8, 3, 3), bias("b2_b1", 16), "d1", pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Relu", ["d1"], ["dr1"], "b2_relu1"),
        conv("b2_conv2", "dr1", weight("b2_w2", 16, 16, 3, 3), bias("b2_b2", 16), "d2", pads=[1, 1, 1, 1]),
        conv("b2_shortcut", "o1", weight("b2_ws", 16, 8, 1, 1), bias("b2_bs", 16), "sc", strides=[2, 2]),
        helper.make_node("Add", ["d2", "sc"], ["add2"], "b2_add"),
        helper.make_node("Relu", ["add2"], ["o2"], "b2_relu"),
        helper.make_node("MaxPool", ["o2"], ["mp"], "pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["o2", "mp"], ["cat"], "cat", axis=1),
        conv("head_conv", "cat", weight("head_w", 16, 32, 1, 1), bias("head_b", 16), "h"),
        conv("lateral_conv", "o2", weight("lat_w", 16, 16, 1, 1), bias("lat_b", 16), "lat"),
        helper.make_node("Add", ["lat", "mp"], ["p"], "fpn_add"),
        helper.make_node("GlobalAveragePool", ["h"], ["g"], "gap"),
        helper.make_node("Flatten", ["g"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", weight("fc_w", 10, 16), bias("fc_b", 10)], ["logits"], "fc", transB=1),
    ]
    initializers.append(numpy_helper.from_array(np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5, "bn_var"))
    graph = helper.make_graph(
        nodes,
        "resnet_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, INPUT_SHAPE)],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, (1, 10)),
            helper.make_tensor_value_info("p", TensorProto.FLOAT, (1, 16, 16, 16)),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="trtflow-tests")
    onnx.checker.check_model(model, full_check=True)
    return model


def consumer_names(model, plan):
    """tensor -> names of the nodes whose input reads its dequantized copy."""
    return {name: {model.graph.node[i].name for i, _ in edges} for name, edges in plan.activations.items()}


def test_placement_follows_tensorrt_rules():
    model = resnet_like_model()
    plan = quantization_plan(model)
    assert consumer_names(model, plan) == {
        "images": {"stem_conv"},
        "a": {"b1_conv1", "b1_add"},  # conv input + shortcut of the identity residual (through BatchNorm)
        "r1": {"b1_conv2"},
        "o1": {"b2_conv1", "b2_shortcut"},
        "dr1": {"b2_conv2"},
        "sc": {"b2_add"},  # projected shortcut: the shallower of two conv branches
        "o2": {"cat", "lateral_conv"},
        "mp": {"cat", "fpn_add"},  # Concat input + non-conv input of an Add after a conv
        "cat": {"head_conv"},
        "f": {"fc"},
    }
    assert {name: axis for name, (axis, _) in plan.weights.items()} == {
        "stem_w": 0,
        "b1_w1": 0,
        "b1_w2": 0,
        "b2_w1": 0,
        "b2_w2": 0,
        "b2_ws": 0,
        "head_w": 0,
        "lat_w": 0,
        "fc_w": 0,
    }
    assert plan.scale_groups == (("o2", "mp", "cat"),)


def test_keep_float_by_name_and_op_type():
    model = resnet_like_model()
    plan = quantization_plan(model, KeepFloat(nodes=("head_*", "b1_add"), op_types=("Gemm",)))
    consumers = consumer_names(model, plan)
    assert consumers["a"] == {"b1_conv1"}
    assert "cat" not in consumers and "f" not in consumers
    assert "head_w" not in plan.weights and "fc_w" not in plan.weights
    assert consumers["mp"] == {"cat", "fpn_add"}
    assert plan.scale_groups == (("o2", "mp"),)


def test_a_layer_is_a_weighted_op_with_the_residual_add_it_fuses():
    """TensorRT fuses a convolution with the Add that follows it (the shortcut's Q/DQ feeds the fused kernel), so a
    layer left in float (calibration.keep_float.auto) takes that shortcut Q/DQ along; a Concat's belong to no layer."""
    model = resnet_like_model()
    plan = quantization_plan(model)
    names = {i: model.graph.node[i].name for i in plan.layers}
    assert sorted(names.values()) == sorted(
        ["stem_conv", "b1_conv1", "b1_conv2", "b2_conv1", "b2_conv2", "b2_shortcut", "head_conv", "lateral_conv", "fc"]
    )
    fused = {model.graph.node[add].name: names[layer] for (add, _), layer in plan.fused_adds.items()}
    # b1_add: b1_conv2 (through BatchNorm) + the identity shortcut; b2_add: the deeper of two convs; fpn_add: the conv
    assert fused == {"b1_add": "b1_conv2", "b2_add": "b2_conv2", "fpn_add": "lateral_conv"}
    index = {name: i for i, name in names.items()}

    floated = plan.without_layers({index["b1_conv2"], index["lateral_conv"]})
    consumers = consumer_names(model, floated)
    assert consumers["a"] == {"b1_conv1"} and "r1" not in consumers  # b1_add's shortcut went with b1_conv2
    assert consumers["mp"] == {"cat"} and consumers["o2"] == {"cat"}  # the Concat stays quantized
    assert "b1_w2" not in floated.weights and "lat_w" not in floated.weights and "b1_w1" in floated.weights
    assert floated.scale_groups == (("o2", "mp", "cat"),)
    assert index["b1_conv2"] not in floated.layers and len(floated.layers) == len(plan.layers) - 2

    alone = plan.only_layers({index["b2_conv2"]})
    assert consumer_names(model, alone) == {"dr1": {"b2_conv2"}, "sc": {"b2_add"}}
    assert list(alone.weights) == ["b2_w2"] and alone.scale_groups == ()
    # every layer in float leaves only the Concat's Q/DQ
    assert consumer_names(model, plan.without_layers(plan.layers)) == {"o2": {"cat"}, "mp": {"cat"}}


def test_per_channel_weights_are_symmetric_int8():
    rng = np.random.default_rng(1)
    weight = (
        rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
        * np.array([1, 10, 0.01, 0], np.float32)[:, None, None, None]
    )
    quantized, scale = quantize_weight(weight, axis=0)
    assert quantized.dtype == np.int8 and scale.dtype == np.float32
    np.testing.assert_allclose(scale[:3], np.abs(weight[:3]).max(axis=(1, 2, 3)) / 127, rtol=1e-7)
    assert scale[3] == 1.0 and not quantized[3].any()
    assert np.abs(quantized[:3]).reshape(3, -1).max(axis=1).tolist() == [127, 127, 127]
    dequantized = quantized.astype(np.float32) * scale[:, None, None, None]
    assert np.all(np.abs(dequantized - weight) <= scale[:, None, None, None] / 2 + 1e-7)


def test_per_channel_weights_are_symmetric_fp8():
    """E4M3 weights: per-channel scale amax / 448, the largest magnitude of each channel on 448, every weight the
    nearest E4M3 value of weight / scale (relative error at most 2^-4, half the spacing of 3 mantissa bits, above
    the smallest normal 2^-6; an absolute 2^-10 below it)."""
    rng = np.random.default_rng(1)
    weight = (
        rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
        * np.array([1, 10, 0.01, 0], np.float32)[:, None, None, None]
    )
    quantized, scale = quantize_weight(weight, axis=0, quantized=FP8_E4M3)
    assert quantized.dtype == ml_dtypes.float8_e4m3fn and scale.dtype == np.float32
    np.testing.assert_allclose(scale[:3], np.abs(weight[:3]).max(axis=(1, 2, 3)) / 448, rtol=1e-7)
    assert scale[3] == 1.0 and not quantized[3].astype(np.float32).any()
    on_grid = quantized.astype(np.float32)
    assert np.abs(on_grid[:3]).reshape(3, -1).max(axis=1).tolist() == [448, 448, 448]
    exact = weight / scale[:, None, None, None]
    assert np.all(np.abs(on_grid - exact) <= np.maximum(np.abs(exact) * 2**-4, 2**-10))


def calibrated_amax(model, batches=4):
    """Min-max ranges of every planned tensor from ONNX Runtime runs on random images."""
    from trtflow.build.calibrate import collect_histograms, compute_amax

    rng = np.random.default_rng(2)
    images = (rng.standard_normal(INPUT_SHAPE).astype(np.float32) for _ in range(batches))
    statistics = collect_histograms(model, images, progress=False)
    return compute_amax(statistics.histograms, "minmax")


def test_qdq_graph_structure_and_determinism():
    model = resnet_like_model()
    plan = quantization_plan(model)
    amax = calibrated_amax(model)
    qdq = insert_qdq(model, plan, amax)
    assert qdq.SerializeToString() == insert_qdq(model, plan, amax).SerializeToString()

    ops = [node.op_type for node in qdq.graph.node]
    assert ops.count("QuantizeLinear") == len(plan.activations)
    assert ops.count("DequantizeLinear") == len(plan.activations) + len(plan.weights)
    initializers = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    # biases stay float, float weights are gone, int8 weights have per-channel float32 scales
    assert all(initializers[b].dtype == np.float32 for b in ("stem_b", "fc_b", "head_b"))
    assert "stem_w" not in initializers and initializers["stem_w_quantized"].dtype == np.int8
    assert initializers["stem_w_scale"].shape == (8,)
    # graph outputs are the float tensors, never a Q/DQ output
    assert [o.name for o in qdq.graph.output] == ["logits", "p"]
    # the Concat group shares one scale: the largest amax of its members
    shared = max(amax["o2"], amax["mp"], amax["cat"])
    for name in ("o2", "mp", "cat"):
        assert initializers[f"{name}_scale"] == np.float32(np.float32(shared) / np.float32(127))
    assert shared_amax(plan, amax)["r1"] == amax["r1"]


def test_fp8_qdq_graph_is_the_int8_placement_in_float8_e4m3fn_at_opset_19():
    """One writer, two dtypes: the same Q/DQ nodes and names, FLOAT8E4M3FN weights and zero points, scales
    amax / 448, the opset raised to 19 (FP8 Q/DQ) only for FP8; the int8 graph keeps the model's opset."""
    model = resnet_like_model()
    plan = quantization_plan(model)
    amax = calibrated_amax(model)
    int8, fp8 = insert_qdq(model, plan, amax), insert_qdq(model, plan, amax, FP8_E4M3)
    assert fp8.SerializeToString() == insert_qdq(model, plan, amax, FP8_E4M3).SerializeToString()
    assert [(n.op_type, n.name) for n in fp8.graph.node] == [(n.op_type, n.name) for n in int8.graph.node]
    assert [o.version for o in int8.opset_import] == [o.version for o in model.opset_import] == [17]
    assert [o.version for o in fp8.opset_import] == [19]
    types = {t.name: t.data_type for t in fp8.graph.initializer}
    assert types["stem_w_quantized"] == types["stem_w_zero_point"] == types["r1_zero_point"] == TensorProto.FLOAT8E4M3FN
    initializers = {t.name: numpy_helper.to_array(t) for t in fp8.graph.initializer}
    shared = shared_amax(plan, amax)
    for name in plan.activations:
        assert initializers[f"{name}_scale"] == np.float32(np.float32(shared[name]) / np.float32(448)), name
    image = np.random.default_rng(3).standard_normal(INPUT_SHAPE).astype(np.float32)
    for expected, actual in zip(OnnxSession(model)(image).values(), OnnxSession(fp8)(image).values()):
        error = np.abs(actual - expected).max() / np.abs(expected).max()
        # applied, and small: 3 mantissa bits round each value by up to 2^-4 of it (measured 0.078; int8 0.024)
        assert 1e-4 < error < 0.1


def test_qdq_model_runs_close_to_float():
    model = resnet_like_model()
    plan = quantization_plan(model)
    qdq = insert_qdq(model, plan, calibrated_amax(model))
    image = np.random.default_rng(3).standard_normal(INPUT_SHAPE).astype(np.float32)
    reference = OnnxSession(model)(image).values()
    simulated = OnnxSession(qdq)(image).values()
    for expected, actual in zip(reference, simulated):
        error = np.abs(actual - expected).max() / np.abs(expected).max()
        assert 1e-4 < error < 0.05  # quantization is really applied, and stays small (measured 0.024)


def test_qdq_model_builds_with_tensorrt_rtx(tmp_path):
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu13) is not installed")
    model = resnet_like_model()
    qdq = insert_qdq(model, quantization_plan(model), calibrated_amax(model))
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse(qdq.SerializeToString())
    assert parsed, [str(parser.get_error(i)) for i in range(parser.num_errors)]
    layer_types = {network.get_layer(i).type for i in range(network.num_layers)}
    assert {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE} <= layer_types
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    assert plan is not None and plan.nbytes > 10_000


def test_fp8_qdq_model_builds_with_tensorrt_rtx_for_fp8_gpus_only():
    """TensorRT-RTX 1.7 on a CPU builds the FP8 Q/DQ graph for Ada (8.9) and Blackwell (12.0), and refuses Ampere
    (8.6): the row's least compute capability (trtflow.precisions) is the backend's."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu13) is not installed")
    model = resnet_like_model()
    qdq = insert_qdq(model, quantization_plan(model), calibrated_amax(model), FP8_E4M3).SerializeToString()
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    built = {}
    for target in ("SM86", "SM89", "SM120"):
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        assert parser.parse(qdq), [str(parser.get_error(i)) for i in range(parser.num_errors)]
        assert trt.DataType.FP8 in {network.get_layer(i).get_output(0).dtype for i in range(network.num_layers)}
        config = builder.create_builder_config()
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, target), 0)
        built[target] = builder.build_serialized_network(network, config) is not None
    assert built == {"SM86": False, "SM89": True, "SM120": True}


def test_old_opset_is_rejected():
    model = resnet_like_model()
    model.opset_import[0].version = 11
    with pytest.raises(ValueError, match="opset 11"):
        quantization_plan(model)
