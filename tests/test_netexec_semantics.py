"""trtflow.run.netexec against TensorRT's documented layer semantics, one TensorRT-RTX layer at a time.

Each test defines a one-layer network with TensorRT-RTX's network API, records it, evaluates it with
NetworkExecutor and compares the result with the formula TensorRT documents for that layer mode (quoted in
the test's docstring, with where NvInfer.h documents it). The last test checks that a dimension TensorRT
declares as -1 is checked against the layer's documented output-shape rule at run time.
"""

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from test_netexec import backend  # noqa: F401  (TensorRT-RTX, skipped where it is not installed)
from trtflow.formats.network_record import read_network
from trtflow.run import netexec
from trtflow.run.executors import network_definition_executor
from trtflow.run.netexec import NetworkExecutionError, NetworkExecutor


def new_network(backend):
    return backend.create_builder().create_network(0)


def constant(network, value, dtype):
    array = np.asarray(value, dtype=dtype)
    return network.add_constant(array.shape, array).get_output(0)


def evaluate(backend, network, **inputs) -> list[torch.Tensor]:
    return list(NetworkExecutor(read_network(network, backend.trt))(inputs).values())


def test_parametric_relu_scales_negative_inputs_by_the_broadcast_slope(backend):
    """NvInfer.h, INetworkDefinition::addParametricReLU / IParametricReLULayer: the output is the input where it is
    positive and input * slope elsewhere, the slope tensor broadcast to the input's shape (here (1, 3) against a
    dynamic batch of (2, 3))."""
    trt = backend.trt
    network = new_network(backend)
    x = network.add_input("x", trt.float32, (-1, 3))
    slope = constant(network, [[0.5, -2.0, 0.0]], np.float32)
    network.mark_output(network.add_parametric_relu(x, slope).get_output(0))
    values = torch.tensor([[-2.0, -1.0, -4.0], [3.0, 0.0, 5.0]])
    (result,) = evaluate(backend, network, x=values)
    assert result.tolist() == [[-1.0, 2.0, 0.0], [3.0, 0.0, 5.0]]


# x / scale (scale 0.5) for the FP8 quantize test: exact E4M3 values, ties between two of them (1.0625 between 1 and
# 1.125: the even mantissa is 1's; 1.1875: 1.25's; 1.5 * 2^-9 between the subnormals 2^-9 and 2^-8: 2^-8), values
# beyond the largest finite 448 (464, halfway to 480, which E4M3FN does not have; 1e6), signed zeros and underflow
FP8_QUANTIZE_CASES = [0.0, -0.0, 1.0, 1.0625, 1.1875, -1.0625, 3.0e-4, -3.0e-4, 1.5 * 2**-9, 2**-10]
FP8_QUANTIZE_CASES += [240.0, 440.0, 447.0, 448.0, 449.0, 464.0, 500.0, 1.0e6, -449.0, -1.0e6]


def onnxruntime_fp8_quantize(values: np.ndarray, scale: float) -> np.ndarray:
    """ONNX's QuantizeLinear to FLOAT8E4M3FN (opset 19, saturate=1: round to nearest even, saturate to +-448), in
    ONNX Runtime, as bytes."""
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["y"])],
        "quantize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(values.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, list(values.shape))],
        [
            helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
            helper.make_tensor("zero", TensorProto.FLOAT8E4M3FN, [], [0.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": values})[0]).view(np.uint8)


def test_fp8_quantize_rounds_to_nearest_even_and_saturates(backend):
    """NvInfer.h, IQuantizeLayer: output = clamp(round(input / scale) + zeroPt), rounding to nearest ties to even,
    clamped to [-448, 448] for FP8 (E4M3), the zero point zero. Bit for bit as ONNX Runtime's QuantizeLinear to
    FLOAT8E4M3FN, and the documented values where the cases are picked to tell roundings apart."""
    trt = backend.trt
    network = new_network(backend)
    x = network.add_input("x", trt.float32, (len(FP8_QUANTIZE_CASES),))
    quantized = network.add_quantize(x, constant(network, 0.5, np.float32), trt.DataType.FP8).get_output(0)
    network.mark_output(quantized)
    values = np.asarray(FP8_QUANTIZE_CASES, dtype=np.float32) * np.float32(0.5)
    (result,) = evaluate(backend, network, x=torch.from_numpy(values))
    assert result.dtype == torch.float8_e4m3fn
    bits = result.view(torch.uint8).numpy()
    assert np.array_equal(bits, onnxruntime_fp8_quantize(values, 0.5))
    documented = dict(zip(FP8_QUANTIZE_CASES, bits.view(ml_dtypes.float8_e4m3fn).astype(np.float32).tolist()))
    assert [documented[case] for case in (1.0625, 1.1875, -1.0625, 1.5 * 2**-9)] == [1.0, 1.25, -1.0, 2**-8]
    assert [documented[case] for case in (449.0, 464.0, 1.0e6, -1.0e6)] == [448.0, 448.0, 448.0, -448.0]
    assert bits[:2].tolist() == [0x00, 0x80]  # 0.0 and -0.0: the sign stays (no zero point added)


def test_max_average_blend_pooling_weights_the_average_by_the_blend_factor(backend):
    """NvInfer.h, PoolingType::kMAX_AVERAGE_BLEND and IPoolingLayer::setBlendFactor: the output is
    (1 - blendFactor) * maxPool + blendFactor * avgPool."""
    trt = backend.trt
    network = new_network(backend)
    x = network.add_input("x", trt.float32, (1, 1, 2, 4))
    layer = network.add_pooling_nd(x, trt.PoolingType.MAX_AVERAGE_BLEND, (2, 2))
    layer.stride_nd = (2, 2)
    layer.blend_factor = 0.25
    network.mark_output(layer.get_output(0))
    values = torch.tensor([[[[1.0, 2.0, 0.0, 0.0], [3.0, 10.0, 0.0, 8.0]]]])
    (result,) = evaluate(backend, network, x=values)
    # windows: max 10, average 4 -> 0.75 * 10 + 0.25 * 4; max 8, average 2 -> 0.75 * 8 + 0.25 * 2
    assert result.flatten().tolist() == [8.5, 6.5]


@pytest.mark.parametrize("trips, expected", [(3, 321.0), (5, 54321.0)])
def test_a_reverse_iterator_counts_back_from_the_trip_count(backend, trips, expected):
    """NvInfer.h, IIteratorLayer::setReverse: with reverse=true the iterator is addGather(tensor, M-1-I, 0),
    where I is the iteration number and M the trip count of the kCOUNT trip limit (not the tensor's length).
    A recurrence v <- 10 v + row writes the rows read, first to last, as digits."""
    trt = backend.trt
    network = new_network(backend)
    x = network.add_input("x", trt.float32, (5,))
    loop = network.add_loop()
    loop.add_trip_limit(constant(network, trips, np.int32), trt.TripLimit.COUNT)
    row = loop.add_iterator(x, 0, True).get_output(0)
    value = loop.add_recurrence(constant(network, 0.0, np.float32))
    shifted = network.add_elementwise(
        value.get_output(0), constant(network, 10.0, np.float32), trt.ElementWiseOperation.PROD
    )
    step = network.add_elementwise(shifted.get_output(0), row, trt.ElementWiseOperation.SUM).get_output(0)
    value.set_input(1, step)
    network.mark_output(loop.add_loop_output(step, trt.LoopOutput.LAST_VALUE).get_output(0))
    (result,) = evaluate(backend, network, x=torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert float(result) == expected


def test_a_reverse_iterator_in_a_loop_without_a_trip_count_is_refused(backend):
    """IIteratorLayer::setReverse defines the reverse order by the kCOUNT trip limit's M: a WHILE-only loop has
    none."""
    trt = backend.trt
    network = new_network(backend)
    x = network.add_input("x", trt.float32, (5,))
    loop = network.add_loop()
    running = loop.add_recurrence(constant(network, True, np.bool_))
    loop.add_trip_limit(running.get_output(0), trt.TripLimit.WHILE)
    row = loop.add_iterator(x, 0, True).get_output(0)
    above = network.add_elementwise(row, constant(network, 3.0, np.float32), trt.ElementWiseOperation.GREATER)
    running.set_input(1, above.get_output(0))
    network.mark_output(loop.add_loop_output(row, trt.LoopOutput.LAST_VALUE).get_output(0))
    with pytest.raises(NetworkExecutionError, match="reverse iterator .* needs a COUNT trip limit"):
        evaluate(backend, network, x=torch.arange(5, dtype=torch.float32))


def resize_network(backend, size_in: int, scale: float):
    trt = backend.trt
    network = new_network(backend)
    layer = network.add_resize(network.add_input("x", trt.float32, (1, size_in)))
    layer.scales = [1.0, scale]
    layer.resize_mode = trt.InterpolationMode.LINEAR
    layer.coordinate_transformation = trt.ResizeCoordinateTransformation.HALF_PIXEL
    network.mark_output(layer.get_output(0))
    return network


def test_resize_with_a_scale_whose_ratio_is_not_exact_is_refused(backend):
    """NvInfer.h, IResizeLayer::setScales: outputDims[i] = floor(inputDims[i] * scales[i]); the coordinate
    transforms (ResizeCoordinateTransformation::kHALF_PIXEL: x_origin = (x_resized + 0.5) * (length_origin /
    length_resize) - 0.5) use the ratio of lengths, ONNX's Resize uses 1 / scale, and TensorRT's ONNX parser
    hands ONNX scales to setScales. With 5 * 1.5 = 7.5 -> 7 the two differ (5/7 against 2/3), so which one
    TensorRT applies is not settled by its documentation: netexec refuses rather than pick one."""
    with pytest.raises(
        NetworkExecutionError, match=r"scale 1.5 on axis 1 maps length 5 -> 7, .* set the output dimensions"
    ):
        evaluate(backend, resize_network(backend, 5, 1.5), x=torch.arange(5, dtype=torch.float32)[None])


def test_resize_with_an_exact_scale_follows_the_length_ratio(backend):
    """With 4 * 2.0 = 8 the two readings agree: HALF_PIXEL x_origin = (x_resized + 0.5) * 4/8 - 0.5, linear
    interpolation, coordinates clamped to the input, as torch's align_corners=False upsampling."""
    values = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    (result,) = evaluate(backend, resize_network(backend, 4, 2.0), x=values)
    expected = torch.nn.functional.interpolate(values[None], scale_factor=2.0, mode="linear", align_corners=False)
    assert result.tolist() == expected[0].tolist()
    assert result.tolist() == [[0.0, 0.25, 0.75, 2.0, 4.0, 4.25, 2.75, 2.0]]


def test_a_float32_scale_that_maps_lengths_exactly_is_followed(backend):
    """TensorRT holds scales as float32: 0.1 is 0.100000001, and 30 x 0.100000001 is 3.00000004, whose floor is the
    output length 3. The two readings agree on 3 / 30 there (within float32 rounding), so the layer is evaluated by
    the documented ratio of lengths, like torch's linear upsampling to size 3."""
    values = torch.arange(30, dtype=torch.float32)[None]
    (result,) = evaluate(backend, resize_network(backend, 30, 0.1), x=values)
    expected = torch.nn.functional.interpolate(values[None], size=3, mode="linear", align_corners=False)
    assert result.tolist() == expected[0].tolist() == [[4.5, 14.5, 24.5]]


def test_a_refused_mode_is_refused_when_the_executor_is_made(backend, tmp_path):
    """verify's ladder falls back from the network-definition level where the executor cannot be made: a layer mode
    netexec refuses only when the layer is evaluated (here the inexact resize above) is found by the one evaluation
    of a zero batch that network_definition_executor makes, not halfway through verification."""
    path = tmp_path / "network.safetensors"
    read_network(resize_network(backend, 5, 1.5), backend.trt).save(path)
    with pytest.raises(NetworkExecutionError, match=r"scale 1.5 on axis 1 maps length 5 -> 7"):
        network_definition_executor(path)


def element_wise_gather_network(backend, data_shape, indices_shape):
    trt = backend.trt
    network = new_network(backend)
    data = network.add_input("data", trt.float32, data_shape)
    indices = network.add_input("indices", trt.int32, indices_shape)
    layer = network.add_gather_v2(data, indices, trt.GatherMode.DEFAULT)
    layer.axis = 1
    layer.num_elementwise_dims = 1
    network.mark_output(layer.get_output(0))
    return network


@pytest.mark.parametrize(
    "data_shape, indices_shape, declared_batch",
    [((-1, 4, 2), (1, 2), -1), ((1, 4, 2), (3, 2), 3), ((-1, 4, 2), (-1, 2), -1)],
    ids=["dynamic-data", "broadcast-data", "both-dynamic"],
)
def test_gather_with_one_element_wise_dimension_broadcasts_it(backend, data_shape, indices_shape, declared_batch):
    """NvInfer.h, IGatherLayer (GatherMode::kDEFAULT): the first nbElementwiseDims dimensions of the output are the
    broadcast of those of data and indices (broadcasting across the element-wise dimension is supported); the rest
    are data's, with the gather axis replaced by the indices' remaining dimensions. Batch 3 against batch 1."""
    network = element_wise_gather_network(backend, data_shape, indices_shape)
    data_batch, indices_batch = (1 if shape[0] == 1 else 3 for shape in (data_shape, indices_shape))
    data = torch.arange(data_batch * 8, dtype=torch.float32).reshape(data_batch, 4, 2)
    indices = torch.tensor([[3, 0], [1, 1], [2, 3]], dtype=torch.int32)[:indices_batch]
    record = read_network(network, backend.trt)
    assert record.layers[0]["outputs"][0]["shape"] == [declared_batch, 2, 2]
    (result,) = NetworkExecutor(record)({"data": data, "indices": indices}).values()
    expected = torch.stack([data[b % data_batch][indices[b % indices_batch].long()] for b in range(3)])
    assert result.shape == (3, 2, 2) and torch.equal(result, expected)


@pytest.mark.parametrize(
    "reverse, values, expected", [(False, [1.0, 2.0, 1e8], [0.0, 1.0, 3.0]), (True, [1e8, 2.0, 1.0], [3.0, 1.0, 0.0])]
)
def test_exclusive_cumulative_sum_keeps_small_terms_next_to_a_large_one(backend, reverse, values, expected):
    """NvInfer.h, ICumulativeLayer: the exclusive sum is y[j] = sum(x[0..j-1]) (forward) or sum(x[j+1..n-1])
    (reverse). In float32, sum(x[0..j]) - x[j] loses 1 + 2 next to 1e8; the exclusive sum itself does not."""
    trt = backend.trt
    network = new_network(backend)
    x = network.add_input("x", trt.float32, (3,))
    layer = network.add_cumulative(x, constant(network, 0, np.int32), trt.CumulativeOperation.SUM, True, reverse)
    network.mark_output(layer.get_output(0))
    (result,) = evaluate(backend, network, x=torch.tensor(values))
    assert result.tolist() == expected


def test_nms_layer_topk_limit_bounds_each_batch_item_and_output_is_by_score(backend):
    """NvInfer.h, INMSLayer: per batch item the boxes are sorted by score without regard to class and only the
    TopK limit best of them are considered (setTopKBoxLimit: the limit counts the boxes above the score threshold
    of a batch item, not of a class); SelectedIndices is ordered by batch index, then by decreasing score within
    each batch item (not by class). No two boxes overlap here: the limit alone decides."""
    trt = backend.trt
    boxes = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]]])
    scores = torch.tensor([[[0.8, 0.1], [0.3, 0.9], [0.7, 0.2], [0.1, 0.6]]])
    network = new_network(backend)
    layer = network.add_nms(
        network.add_input("boxes", trt.float32, (1, 4, 4)),
        network.add_input("scores", trt.float32, (1, 4, 2)),
        constant(network, 4, np.int32),
    )
    layer.topk_box_limit = 3
    network.mark_output(layer.get_output(0))
    network.mark_output(layer.get_output(1))
    selected, count = evaluate(backend, network, boxes=boxes, scores=scores)
    # (batch, class, box) by score: (0, 1, 1) 0.9, (0, 0, 0) 0.8, (0, 0, 2) 0.7; the limit of 3 drops (0, 1, 3) 0.6
    assert selected.tolist() == [[0, 1, 1], [0, 0, 0], [0, 0, 2]] and int(count) == 3


# --------------------------------------------------------------------------- declared -1 dimensions


def zipped_gather(layer, inputs, _):
    """The gather this module's broadcast test replaced: data and indices paired by zip, which truncates."""
    data, indices = inputs
    axis = layer["params"]["axis"]
    return [torch.stack([netexec.gather_axis(d, i, axis - 1) for d, i in zip(data, indices)])]


def test_a_dynamic_dimension_that_disagrees_with_the_shape_rule_is_refused(backend, monkeypatch):
    """The gather output's batch is declared -1 (the data's batch is dynamic); IGatherLayer's output-shape rule
    makes it the broadcast of data's and indices' first dimension, 3 here. A gather that truncates to 1 is
    refused by the shape check alone."""
    network = element_wise_gather_network(backend, (-1, 4, 2), (1, 2))
    record = read_network(network, backend.trt)
    assert record.layers[0]["outputs"][0]["shape"] == [-1, 2, 2]
    monkeypatch.setitem(netexec.LAYERS, "GATHER", zipped_gather)
    executor = NetworkExecutor(record)
    with pytest.raises(
        NetworkExecutionError,
        match=r"layer 0 .*\(GATHER\): computed shape \[1, 2, 2\], TensorRT declared \[-1, 2, 2\], "
        r"which its output-shape rule makes \[3, 2, 2\] for inputs of shapes \[\[3, 4, 2\], \[1, 2\]\]",
    ):
        executor({"data": torch.zeros(3, 4, 2), "indices": torch.zeros(1, 2, dtype=torch.int32)})
