"""trtflow.formats.network_record: what the record holds of each layer, and what it knowingly leaves out.

One-layer TensorRT-RTX networks (its network API is TensorRT's), recorded and evaluated by trtflow.run.netexec
against the rule TensorRT documents; and the completeness guard: every attribute of every layer class the
executor implements is recorded and read, declared irrelevant with a reason, or refused unless at its default
(the same guard runs on every full TensorRT version's bindings in tests/test_trt_bindings_matrix.py).
"""

import inspect

import numpy as np
import pytest
import torch

from trtflow.formats.network_record import (
    DEFAULT_ONLY,
    IRRELEVANT_ATTRIBUTES,
    LAYER_ATTRIBUTES,
    LOOP_BOUNDARIES,
    interface_attributes,
    parameter,
    read_network,
    unaccounted_attributes,
)
from trtflow.run import netexec
from trtflow.run.netexec import NetworkExecutionError, NetworkExecutor

rtx = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (pip install tensorrt-rtx-cu13) is not installed")


@pytest.fixture(scope="module")
def backend():
    from trtflow.backend import load_backend

    return load_backend("tensorrt_rtx")


def int_constant(network, values) -> object:
    return network.add_constant((len(values),), np.asarray(values, dtype=np.int32)).get_output(0)


def test_slice_follows_its_axes(backend):
    """ISliceLayer axes (NvInfer.h ISliceLayer::setAxes, TensorRT 10.3+; Python API ISliceLayer docstring): where
    axes are given, as the `axes` attribute or as input 5, start, size and stride hold one entry per listed axis
    and every other axis is taken whole (the docstring's example: input {{0, 2, 4}, {1, 3, 5}}, start {1},
    size {2}, stride {1}, axes {1} -> {{2, 4}, {3, 5}}). A negative axis counts from the last, as TensorRT-RTX's
    shape inference reads it. The WRAP case has the same shape along either axis, so only the values tell."""
    trt = backend.trt
    network = backend.create_builder().create_network(0)
    x = network.add_input("x", trt.float32, (2, 3, 4))
    square = network.add_input("square", trt.float32, (3, 3))
    last = network.add_slice(x, (1,), (2,), (1,))
    last.axes = (-1,)
    wrapped = network.add_slice(square, (1,), (3,), (1,))
    wrapped.axes = (1,)
    wrapped.mode = trt.SampleMode.WRAP
    dynamic = network.add_slice(x, (0, 1), (2, 1), (2, 1))
    dynamic.set_input(5, int_constant(network, [2, 0]))  # axis 2: 0, 2; axis 0: 1
    for layer in (last, wrapped, dynamic):
        network.mark_output(layer.get_output(0))
    record = read_network(network, trt)
    assert [layer["params"].get("axes") for layer in record.layers if layer["type"] == "SLICE"] == [[-1], [1], None]
    values, grid = torch.arange(24.0).reshape(2, 3, 4), torch.arange(9.0).reshape(3, 3)
    results = list(NetworkExecutor(record)({"x": values, "square": grid}).values())
    assert torch.equal(results[0], values[:, :, 1:3])
    assert results[1].tolist() == [[1, 2, 0], [4, 5, 3], [7, 8, 6]]  # columns 1, 2, 0 (rows would be [3, 4, 5], ...)
    assert torch.equal(results[2], values[1:2, :, 0:4:2])


def test_blocked_quantize_and_dequantize(backend):
    """Blocked Q/DQ (NvInfer.h IQuantizeLayer / IDequantizeLayer::setBlockShape; Python API IQuantizeLayer
    block_shape; TensorRT's Quantize operator page): a scale of the input's rank holds one value per block, each
    dimension of the input divided into blocks of `block_shape` (-1: the whole extent); a last, partial block
    keeps its scale (TensorRT-RTX builds a (5, 4) input with a (3, 2) scale in blocks of (2, 3)). Without
    block_shape, TensorRT infers a single blocking dimension from the sizes. The quantized values round half
    to even and saturate, as per-tensor ones do."""
    trt = backend.trt
    network = backend.create_builder().create_network(0)
    x = network.add_input("x", trt.float32, (5, 4))
    scale = np.asarray([[0.5, 2.0], [1.0, 0.25], [4.0, 0.125]], dtype=np.float32)
    blocks = network.add_constant(scale.shape, scale).get_output(0)
    quantize = network.add_quantize(x, blocks, trt.int8)
    quantize.block_shape = (2, 3)
    dequantize = network.add_dequantize(quantize.get_output(0), blocks, trt.float32)
    dequantize.block_shape = (2, 3)
    rows = np.asarray([[1.0, 2.0, 0.5, 0.25]], dtype=np.float32)  # (1, 4) on (5, 4): blocks of 5 rows, inferred
    inferred = network.add_quantize(x, network.add_constant(rows.shape, rows).get_output(0), trt.int8)
    for layer in (quantize, dequantize, inferred):
        network.mark_output(layer.get_output(0))
    record = read_network(network, trt)
    assert [layer["params"]["block_shape"] for layer in record.layers if "QUANTIZE" in layer["type"]] == [
        [2, 3],
        [2, 3],
        None,
    ]
    values = torch.linspace(-40, 300, 20).reshape(5, 4)
    quantized, restored, by_rows = NetworkExecutor(record)({"x": values}).values()
    per_element = torch.from_numpy(scale).repeat_interleave(2, 0)[:5].repeat_interleave(3, 1)[:, :4]
    expected = torch.clamp(torch.round(values / per_element), -128, 127)
    assert per_element[4].tolist() == [4.0, 4.0, 4.0, 0.125] and quantized.tolist() == expected.tolist()
    assert bool((expected == 127).any()) and bool((expected != 127).any())  # some saturate, some do not
    assert restored.tolist() == (expected * per_element).tolist()
    assert by_rows.tolist() == torch.clamp(torch.round(values / torch.from_numpy(rows)), -128, 127).tolist()


# --------------------------------------------------------------------------- completeness


def evaluation_source(function) -> str:
    """The source of `function` and of every netexec function and NetworkExecutor method it names, transitively."""
    sources, seen, stack = [], set(), [function]
    while stack:
        function = stack.pop()
        if function in seen:
            continue
        seen.add(function)
        sources.append(inspect.getsource(function))
        codes, names = [function.__code__], set()
        while codes:
            code = codes.pop()
            names |= set(code.co_names)
            codes += [const for const in code.co_consts if inspect.iscode(const)]
        for name in names:
            for found in (vars(netexec).get(name), vars(netexec.NetworkExecutor).get(name)):
                found = getattr(found, "__func__", found)  # a static method's function
                if inspect.isfunction(found):
                    stack.append(found)
    return "\n".join(sources)


def test_an_attribute_the_tensorrt_version_lacks_is_recorded_as_its_default():
    """ISliceLayer.axes came with TensorRT 10.3 and IQuantizeLayer.block_shape with 10.15 (the bindings matrix): an
    older TensorRT's layer has no such attribute, and holds its default, recorded as None (the executor's reading
    of an unset one)."""

    class OlderSliceLayer:  # a layer class of a version before the attribute, as the matrix finds them
        start = (0,)

    assert parameter(OlderSliceLayer(), "axes") is None
    assert parameter(OlderSliceLayer(), "start") == [0]


def test_every_attribute_of_the_executors_layer_classes_is_accounted_for():
    """The guard, on TensorRT-RTX (every full TensorRT version: tests/test_trt_bindings_matrix.py). Each attribute
    of ILayer and of each class of a layer type the executor implements (network_record.interface_attributes
    gives the rule: every public name, property or method) is recorded (LAYER_ATTRIBUTES), declared irrelevant
    with a reason (IRRELEVANT_ATTRIBUTES) or refused off its default (DEFAULT_ONLY). A TensorRT that adds an
    attribute fails here until the record says which."""
    assert set(LAYER_ATTRIBUTES) == set(netexec.LAYERS) | set(LOOP_BOUNDARIES)
    interfaces = {interface for interface, _, _ in LAYER_ATTRIBUTES.values()}
    attributes = interface_attributes(rtx)
    assert set(attributes) == {"ILayer"} | interfaces and len(interfaces) == 29
    assert {"axes", "start", "shape", "stride", "mode"} == set(attributes["ISliceLayer"])
    assert (
        {"axis", "block_shape", "to_type"} == set(attributes["IQuantizeLayer"]) == set(attributes["IDequantizeLayer"])
    )
    assert "type" in attributes["IActivationLayer"] and "set_input" not in attributes["ISliceLayer"]
    assert unaccounted_attributes(attributes) == []
    assert set(IRRELEVANT_ATTRIBUTES) | set(DEFAULT_ONLY) <= {"ILayer"} | interfaces
    assert all(reason for reasons in IRRELEVANT_ATTRIBUTES.values() for reason in reasons.values())


def test_recorded_parameters_are_read_by_the_executor():
    """Recorded and read: each parameter and weight LAYER_ATTRIBUTES records, unless declared irrelevant, is named
    by the code that evaluates its layer type (the LAYERS function, or NetworkExecutor.run_loop for loop
    boundaries, with the netexec functions and executor methods they call)."""
    unread = []
    for kind, (interface, params, weights) in LAYER_ATTRIBUTES.items():
        evaluation = netexec.NetworkExecutor.run_loop if kind in LOOP_BOUNDARIES else netexec.LAYERS[kind]
        source = evaluation_source(evaluation)
        irrelevant = IRRELEVANT_ATTRIBUTES.get(interface, {})
        unread += [
            f"{kind}.{name}" for name in params + weights if name not in irrelevant and f'"{name}"' not in source
        ]
    assert unread == []


OFF_DEFAULT = [("precision_is_set", True), ("output_type_is_set", [0]), ("num_ranks", 2)]


@pytest.mark.parametrize(("attribute", "value"), OFF_DEFAULT, ids=[name for name, _ in OFF_DEFAULT])
def test_an_attribute_off_its_default_is_refused_by_name(backend, attribute, value):
    """DEFAULT_ONLY: a layer whose precision or output type is constrained (NvInfer.h ILayer::setPrecision /
    setOutputType: in a weakly typed network the builder then computes in that type; strongly typed networks
    reject both) or that spans several ranks (Python API ILayer.num_ranks) is refused, naming the layer, the
    attribute, its value and the fix. TensorRT-RTX has no precision constraints, so the record is edited here."""
    assert {(interface, name) for interface, names in DEFAULT_ONLY.items() for name in names} == {
        ("ILayer", name) for name, _ in OFF_DEFAULT
    }
    trt = backend.trt
    network = backend.create_builder().create_network(0)
    layer = network.add_activation(network.add_input("x", trt.float32, (2,)), trt.ActivationType.RELU)
    layer.name, layer.get_output(0).name = "relu", "y"
    network.mark_output(layer.get_output(0))
    record = read_network(network, trt)
    assert record.layers[0]["params"]["num_ranks"] == 1 and "precision_is_set" not in record.layers[0]["params"]
    assert NetworkExecutor(record)({"x": torch.tensor([-1.0, 2.0])})["y"].tolist() == [0.0, 2.0]
    record.layers[0]["params"][attribute] = value
    default = DEFAULT_ONLY["ILayer"][attribute][0]
    with pytest.raises(NetworkExecutionError) as refused:
        NetworkExecutor(record)
    assert str(refused.value).startswith(
        f"layer 0 'relu' (ACTIVATION): {attribute} is {value!r} (TensorRT's default: {default!r}), which the "
        "network-definition executor does not evaluate; "
    )
    assert str(refused.value).endswith(DEFAULT_ONLY["ILayer"][attribute][1])
