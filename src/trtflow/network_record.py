"""A TensorRT network definition as a file: every layer's type, parameters and weights, read from the
`INetworkDefinition` object itself, in the order TensorRT holds the layers.

The engine stage records the exact network it hands to `build_serialized_network` (next to the plan:
``engine_<precision>.network.safetensors``); `trtflow.netexec` evaluates it where the plan cannot run.
This module only reads: which attribute means what is TensorRT's business, documented in its API
(`ILayer` subclasses); the evaluation is `trtflow.netexec`'s.

File: safetensors; each layer's weights are tensors named ``<layer index>.<attribute>``, the layer list
is JSON under the metadata key ``trtflow.network``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from trtflow.artifacts import write_bytes

FORMAT = "trtflow-network-record/2"  # 2: slice axes, Q/DQ block_shape
METADATA_KEY = "trtflow.network"

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
    """`layer.attribute` as JSON; None where TensorRT has no value (the getter of an unset block_shape raises
    "Could not get block_shape.", where an unset slice `axes` reads as None)."""
    try:
        return plain(getattr(layer, attribute))
    except RuntimeError as error:
        if str(error) == f"Could not get {attribute}.":
            return None
        raise


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
        array = np.asarray(getattr(layer, attribute))
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
