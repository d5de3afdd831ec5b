"""A TensorRT network definition as a file: every layer's type, parameters and weights, read from the
`INetworkDefinition` object itself, in the order TensorRT holds the layers.

The engine stage records the exact network it hands to `build_serialized_network` (next to the plan:
``engine_<precision>.network.safetensors``); `trtflow.run.netexec` evaluates it where the plan cannot run.
This module only reads: which attribute means what is TensorRT's business, documented in its API
(`ILayer` subclasses); the evaluation is `trtflow.run.netexec`'s.

What the record knowingly leaves out is listed beside what it holds: attributes that do not change the values
(`IRRELEVANT_ATTRIBUTES`, each with its reason) and attributes the executor refuses off their default
(`DEFAULT_ONLY`); tests hold these lists complete for TensorRT-RTX and every full TensorRT version.

File: safetensors; each layer's weights are tensors named ``<layer index>.<attribute>``, the layer list
is JSON under the metadata key ``trtflow.network``. Weights of a `STORED_AS_BYTES` type (FP8) are stored as their
bytes (uint8): the bindings' `Weights.numpy()` gives no array of them, and safetensors' numpy reader reads none.
"""

from __future__ import annotations

import ctypes
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from trtflow.artifacts import write_bytes

FORMAT = "trtflow-network-record/2"  # 2: slice axes, Q/DQ block_shape, ILayer attributes refused off default
METADATA_KEY = "trtflow.network"
# DataType names whose weights are recorded as their bytes, one byte per element (trtflow.run.netexec views them)
STORED_AS_BYTES = ("FP8",)

# LayerType name -> (the ILayer subclass that holds its parameters, parameter attributes, weight attributes).
# Loop boundary layers also carry `loop` (the ILoop's name).
LAYER_ATTRIBUTES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "ACTIVATION": ("IActivationLayer", ("type", "alpha", "beta"), ()),
    "CAST": ("ICastLayer", ("to_type",), ()),
    "CONCATENATION": ("IConcatenationLayer", ("axis",), ()),
    "CONSTANT": ("IConstantLayer", ("shape",), ("weights",)),
    "CONVOLUTION": (
        "IConvolutionLayer",
        (
            "num_output_maps",
            "kernel_size_nd",
            "stride_nd",
            "pre_padding",
            "post_padding",
            "padding_mode",
            "num_groups",
            "dilation_nd",
        ),
        ("kernel", "bias"),
    ),
    "CUMULATIVE": ("ICumulativeLayer", ("op", "exclusive", "reverse"), ()),
    "DEQUANTIZE": ("IDequantizeLayer", ("axis", "to_type", "block_shape"), ()),
    "ELEMENTWISE": ("IElementWiseLayer", ("op",), ()),
    "GATHER": ("IGatherLayer", ("axis", "num_elementwise_dims", "mode"), ()),
    "IDENTITY": ("IIdentityLayer", (), ()),
    "ITERATOR": ("IIteratorLayer", ("axis", "reverse"), ()),
    "LOOP_OUTPUT": ("ILoopOutputLayer", ("kind", "axis"), ()),
    "MATRIX_MULTIPLY": ("IMatrixMultiplyLayer", ("op0", "op1"), ()),
    "NMS": ("INMSLayer", ("bounding_box_format", "topk_box_limit"), ()),
    "PARAMETRIC_RELU": ("IParametricReLULayer", (), ()),
    "POOLING": (
        "IPoolingLayer",
        (
            "type",
            "window_size_nd",
            "stride_nd",
            "pre_padding",
            "post_padding",
            "padding_mode",
            "blend_factor",
            "average_count_excludes_padding",
        ),
        (),
    ),
    "QUANTIZE": ("IQuantizeLayer", ("axis", "to_type", "block_shape"), ()),
    "RECURRENCE": ("IRecurrenceLayer", (), ()),
    "REDUCE": ("IReduceLayer", ("op", "axes", "keep_dims"), ()),
    "RESIZE": (
        "IResizeLayer",
        (
            "shape",
            "scales",
            "resize_mode",
            "coordinate_transformation",
            "selector_for_single_pixel",
            "nearest_rounding",
            "cubic_coeff",
            "exclude_outside",
        ),
        (),
    ),
    "SCATTER": ("IScatterLayer", ("mode", "axis"), ()),
    "SELECT": ("ISelectLayer", (), ()),
    "SHAPE": ("IShapeLayer", (), ()),
    "SHUFFLE": ("IShuffleLayer", ("first_transpose", "reshape_dims", "second_transpose", "zero_is_placeholder"), ()),
    "SLICE": ("ISliceLayer", ("start", "shape", "stride", "mode", "axes"), ()),
    "SOFTMAX": ("ISoftMaxLayer", ("axes",), ()),
    "TOPK": ("ITopKLayer", ("op", "k", "axes"), ()),
    "TRIP_LIMIT": ("ITripLimitLayer", ("kind",), ()),
    "UNARY": ("IUnaryLayer", ("op",), ()),
}
LOOP_BOUNDARIES = ("RECURRENCE", "TRIP_LIMIT", "ITERATOR", "LOOP_OUTPUT")
# Parameters a layer input replaces: TensorRT then reads the input, and the getter has no value (it logs an error).
SUPERSEDED_BY_INPUT: dict[str, dict[int, tuple[str, ...]]] = {
    "RESIZE": {1: ("shape", "scales")},
    "SLICE": {1: ("start",), 2: ("shape",), 3: ("stride",), 5: ("axes",)},
}

# Attributes of these classes (ILayer's once, for all) that the evaluation does not read, each with the reason: held
# elsewhere in the record, or without effect on the values (a few are recorded all the same). Which attributes
# TensorRT-RTX and each full TensorRT version have: tests/test_network_record.py, tests/test_trt_bindings_matrix.py.
INPUTS = "recorded as the layer's inputs"
OUTPUTS = "recorded as the layer's outputs (name, type, shape)"
OUTPUT_TYPE = "the type of the output, recorded with the outputs; the executor converts to it"
LOOP = "recorded as the layer's `loop`, the name of its ILoop"
PADDING_ND = "pre_padding's value (the pre-padding where asymmetric); pre_padding and post_padding are recorded"
CUBIC_ONLY = (
    "used by CUBIC interpolation only, which the executor refuses (LINEAR's two taps clamped to the edge equal "
    "excluding outside samples)"
)
IRRELEVANT_ATTRIBUTES: dict[str, dict[str, str]] = {
    "ILayer": {
        "name": "a label: recorded as the layer's name, for messages",
        "metadata": "free text for tools and profilers (e.g. the ONNX node it came from); TensorRT computes nothing from it",
        "type": "recorded as the layer's type",
        "num_inputs": INPUTS,
        "get_input": INPUTS,
        "set_input": INPUTS,
        "num_outputs": OUTPUTS,
        "get_output": OUTPUTS,
        "get_output_type": OUTPUT_TYPE,
        "set_output_type": "sets the output type constraint that output_type_is_set reports",
        "reset_output_type": "clears the output type constraint that output_type_is_set reports",
        "precision": "the computation precision constraint, in effect only where precision_is_set",
        "reset_precision": "clears precision_is_set",
    },
    "ICastLayer": {"to_type": OUTPUT_TYPE},
    "IQuantizeLayer": {"to_type": OUTPUT_TYPE},
    "IDequantizeLayer": {"to_type": OUTPUT_TYPE},
    "IConvolutionLayer": {"padding_nd": PADDING_ND},
    "IPoolingLayer": {"padding_nd": PADDING_ND},
    "IIteratorLayer": {"loop": LOOP},
    "IRecurrenceLayer": {"loop": LOOP},
    "ITripLimitLayer": {"loop": LOOP},
    "ILoopOutputLayer": {
        "loop": LOOP,
        "axis": "used by CONCATENATE and REVERSE outputs only, which the executor refuses",
    },
    "INMSLayer": {"indices_type": OUTPUT_TYPE},
    "ITopKLayer": {"indices_type": OUTPUT_TYPE},
    "IResizeLayer": {"cubic_coeff": CUBIC_ONLY, "exclude_outside": CUBIC_ONLY},
}

# Attributes the executor does not implement: (the value it assumes, TensorRT's default; what to do instead).
# Recorded where the TensorRT has them (a method of the output index as the outputs where it holds); the
# executor refuses a layer where one differs. precision_is_set / output_type_is_set: the constraint tells a weakly
# typed network's builder to compute in or produce another type (NvInfer.h ILayer::setPrecision / setOutputType,
# TensorRT 10); strongly typed networks reject both, and TensorRT 11 and TensorRT-RTX have neither. num_ranks:
# ranks of multi-device execution, more than 1 only on IDistCollectiveLayer (Python API ILayer.num_ranks, 10.16+).
CASTS = "in a strongly typed network a Cast sets the type a layer computes in and produces"
DEFAULT_ONLY: dict[str, dict[str, tuple[object, str]]] = {
    "ILayer": {
        "precision_is_set": (False, f"leave the layer's precision unset ({CASTS})"),
        "output_type_is_set": ([], f"leave the layer's output types unset ({CASTS})"),
        "num_ranks": (1, "the executor evaluates a network on one device"),
    },
}


class NetworkRecordError(ValueError):
    """A network that cannot be recorded, or a file that is no network record."""


@dataclass
class NetworkRecord:
    """What a network definition holds: inputs, layers (in TensorRT's order), marked outputs, weights."""

    inputs: list[dict]  # {"name", "dtype", "shape"}; -1 = dynamic
    outputs: list[str]  # marked output tensors, in order
    layers: list[dict]  # {"index", "name", "type", "inputs": [name | None], "outputs": [{"name", "dtype", "shape"}],
    #                      "params": {...}, "weights": {attribute: array key}, "loop": name (loop boundaries)}
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # which TensorRT made it

    def save(self, path: str | Path) -> None:
        header = {
            "format": FORMAT,
            "source": self.source,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "layers": self.layers,
        }
        arrays = {key: np.ascontiguousarray(value) for key, value in self.arrays.items()}
        write_bytes(path, save(arrays, metadata={METADATA_KEY: json.dumps(header)}))

    @classmethod
    def load(cls, path: str | Path) -> NetworkRecord:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"network record {path} does not exist; build it with its engine "
                f"(snakemake {path.with_name(path.name.split('.')[0] + '.plan')})"
            )
        try:
            arrays = load_file(str(path))
            with safe_open(str(path), "np") as file:
                header = json.loads((file.metadata() or {})[METADATA_KEY])
        except (SafetensorError, KeyError, ValueError, OSError) as error:
            raise NetworkRecordError(
                f"{path} is not a trtflow network record ({error}); rebuild its engine "
                "(snakemake -f <the .plan beside it>)"
            ) from error
        if header.get("format") != FORMAT:
            raise NetworkRecordError(
                f"{path} has format {header.get('format')!r}, this trtflow reads {FORMAT}; rebuild its engine"
            )
        return cls(header["inputs"], header["outputs"], header["layers"], arrays, header["source"])


def plain(value):
    """A TensorRT attribute value as JSON: enums by name, Dims / Permutation as lists."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "name") and hasattr(value, "value"):
        return value.name
    return [plain(item) for item in value]


def parameter(layer, attribute: str):
    """`layer.attribute` as JSON; None where TensorRT has no value: a version without the attribute (ISliceLayer.axes
    before 10.3, IQuantizeLayer.block_shape before 10.15) holds its default, the getter of an unset block_shape
    raises "Could not get block_shape.", an unset slice `axes` reads as None."""
    if not hasattr(type(layer), attribute):
        return None
    try:
        return plain(getattr(layer, attribute))
    except RuntimeError as error:
        if str(error) == f"Could not get {attribute}.":
            return None
        raise


def default_only_value(layer, attribute: str):
    """A DEFAULT_ONLY attribute as recorded: its value, or for a method of the output index the outputs where it holds."""
    value = getattr(layer, attribute)
    return [i for i in range(layer.num_outputs) if value(i)] if callable(value) else plain(value)


def weight_bytes(weights) -> np.ndarray:
    """The values of a `Weights` of one byte per element as uint8, read from the nvinfer1::Weights the Python object
    wraps (pybind11 keeps a pointer to it after the object header; it holds DataType type, const void* values,
    int64 count), checked against the object's own dtype and size."""
    native = ctypes.c_void_p.from_address(id(weights) + object.__basicsize__).value
    dtype, values, count = (
        ctypes.c_int32.from_address(native).value,
        ctypes.c_void_p.from_address(native + 8).value,
        ctypes.c_int64.from_address(native + 16).value,
    )
    if dtype != int(weights.dtype) or count != weights.size or weights.nbytes != count:
        raise NetworkRecordError(
            f"cannot read {weights.dtype.name} weights of {weights.size} elements from these TensorRT bindings "
            f"(found type {dtype}, {count} elements): record the network with a TensorRT whose Weights layout is known"
        )
    return np.frombuffer(ctypes.string_at(values, count), dtype=np.uint8).copy()


def tensor_entry(tensor) -> dict:
    return {"name": tensor.name, "dtype": tensor.dtype.name, "shape": list(tensor.shape)}


def read_layer(trt: ModuleType, network, index: int) -> tuple[dict, dict[str, np.ndarray]]:
    layer = network.get_layer(index)
    kind = layer.type.name
    entry = {
        "index": index,
        "name": layer.name,
        "type": kind,
        "inputs": [None if layer.get_input(i) is None else layer.get_input(i).name for i in range(layer.num_inputs)],
        "outputs": [tensor_entry(layer.get_output(i)) for i in range(layer.num_outputs)],
        "params": {},
        "weights": {},
    }
    arrays = {}
    for attribute in DEFAULT_ONLY["ILayer"]:
        if hasattr(layer, attribute):  # a TensorRT without it holds its default
            entry["params"][attribute] = default_only_value(layer, attribute)
    if kind not in LAYER_ATTRIBUTES:  # recorded as it is; the executor refuses it by index, name and type
        return entry, arrays
    interface, params, weights = LAYER_ATTRIBUTES[kind]
    layer.__class__ = getattr(trt, interface)
    for slot, superseded in SUPERSEDED_BY_INPUT.get(kind, {}).items():
        if layer.num_inputs > slot and layer.get_input(slot) is not None:
            params = tuple(p for p in params if p not in superseded)
    for attribute in params:
        entry["params"][attribute] = parameter(layer, attribute)
    for attribute in weights:
        value = getattr(layer, attribute)
        array = weight_bytes(value) if value.dtype.name in STORED_AS_BYTES else np.asarray(value)
        if array.size:  # an unset weight (a convolution whose kernel comes from input 1) reads as empty
            key = f"{index}.{attribute}"
            entry["weights"][attribute], arrays[key] = key, array.copy()
    if kind in LOOP_BOUNDARIES:
        entry["loop"] = layer.loop.name
    return entry, arrays


def read_network(network, trt: ModuleType) -> NetworkRecord:
    """Record `network` (an INetworkDefinition of `trt`, TensorRT or TensorRT-RTX) as it is now."""
    inputs = [tensor_entry(network.get_input(i)) for i in range(network.num_inputs)]
    layers, arrays, produced = [], {}, {entry["name"] for entry in inputs}
    for index in range(network.num_layers):
        entry, layer_arrays = read_layer(trt, network, index)
        for output in entry["outputs"]:
            if output["name"] in produced:
                raise NetworkRecordError(
                    f"layer {index} '{entry['name']}' ({entry['type']}) writes tensor "
                    f"'{output['name']}', a name another tensor has: name tensors uniquely"
                )
            produced.add(output["name"])
        layers.append(entry)
        arrays.update(layer_arrays)
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    source = {"module": trt.__name__, "version": trt.__version__}
    return NetworkRecord(inputs, outputs, layers, arrays, source)


# --------------------------------------------------------------------------- completeness


def interface_attributes(trt: ModuleType) -> dict[str, list[str]]:
    """The attributes of ILayer and of each LAYER_ATTRIBUTES class that `trt` has, by name.

    Every public name counts, data attribute (pybind property) or method: get_X / set_X pairs and other accessors
    hold layer state as properties do. A subclass's names are those ILayer lacks, and the properties it redefines
    (IActivationLayer.type is the activation type); a method it redefines (set_input) keeps ILayer's meaning.
    """
    base = trt.ILayer
    attributes = {"ILayer": sorted(name for name in dir(base) if not name.startswith("_"))}
    for interface in sorted({interface for interface, _, _ in LAYER_ATTRIBUTES.values()}):
        cls = getattr(trt, interface, None)
        if cls is None:
            continue
        own = []
        for name in dir(cls):
            found = inspect.getattr_static(cls, name)
            if not name.startswith("_") and (
                not hasattr(base, name)
                or (isinstance(found, property) and found is not inspect.getattr_static(base, name))
            ):
                own.append(name)
        attributes[interface] = sorted(own)
    return attributes


def unaccounted_attributes(attributes: dict[str, list[str]]) -> list[str]:
    """`Class.attribute` for each of `attributes` (as interface_attributes gives them) that the record neither
    holds (LAYER_ATTRIBUTES), nor declares irrelevant (IRRELEVANT_ATTRIBUTES), nor refuses off its default
    (DEFAULT_ONLY)."""
    recorded = {interface: set(params + weights) for interface, params, weights in LAYER_ATTRIBUTES.values()}
    return [
        f"{interface}.{name}"
        for interface, names in attributes.items()
        for name in names
        if name not in recorded.get(interface, set())
        and name not in IRRELEVANT_ATTRIBUTES.get(interface, {})
        and name not in DEFAULT_ONLY.get(interface, {})
    ]
