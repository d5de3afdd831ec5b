"""Explicit quantization: QuantizeLinear/DequantizeLinear pairs placed where TensorRT fuses them.

TensorRT (and TensorRT-RTX, and TensorRT 11, which only takes explicit quantization) reads a Q/DQ graph
as "run this op in INT8 (or FP8) with these scales". Its placement rules, followed here:

- weighted ops (Conv, ConvTranspose, Gemm, MatMul) get Q/DQ on their activation input (per-tensor scale
  from calibration) and a DequantizeLinear on their weights (quantized weights, per-output-channel symmetric
  scales computed from the weights themselves);
- a residual Add that follows a weighted op gets Q/DQ on its *other* input (the shortcut), so that
  TensorRT fuses conv + add into one INT8 kernel;
- the inputs of a Concat share one scale, so that the concat is a no-op in INT8;
- outputs of weighted ops, biases and graph outputs stay float (biases as float initializers: the
  TensorRT-RTX parser rejects onnxruntime's int32-bias DequantizeLinear).

`quantization_plan` decides the placement once; calibration collects exactly the tensors it names and
`insert_qdq` writes the graph from it, in the quantized dtype of a precision's row (trtflow.precisions): int8 at
opset >= 13, FLOAT8E4M3FN (E4M3, scale = amax / 448) at opset >= 19, the first opset whose Q/DQ take FP8.
"""

from __future__ import annotations

import fnmatch
import json
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtflow.artifacts import write_bytes
from trtflow.precisions import INT8, QuantizedType

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops between a weighted op and a residual Add that TensorRT folds into the weighted op (BatchNorm,
# FrozenBatchNorm's x * scale + bias), so the Add still follows "a conv".
FOLDABLE_AFFINE_OPS = ("BatchNormalization", "Mul", "Add", "Sub", "Div")
INT8_MAX = INT8.max_magnitude  # the int8 scale rule of trtflow.precisions: scale = amax / 127
MIN_QDQ_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


@dataclass(frozen=True)
class OnnxQuantizedType:
    """How ONNX writes a quantized dtype: its element type, numpy dtype, and the least opset whose Q/DQ take it."""

    element_type: int
    numpy_dtype: type
    min_opset: int


# trtflow.precisions' quantized dtype names -> their ONNX spelling
ONNX_QUANTIZED_TYPES = {
    "int8": OnnxQuantizedType(TensorProto.INT8, np.int8, MIN_QDQ_OPSET),
    "float8_e4m3fn": OnnxQuantizedType(TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn, 19),
}


@dataclass(frozen=True)
class KeepFloat:
    """Layers left in float: node-name glob patterns (fnmatch) and ONNX op types."""

    nodes: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> KeepFloat:
        cfg = cfg or {}
        return cls(tuple(cfg.get("nodes", ())), tuple(cfg.get("op_types", ())))

    def matches(self, node: onnx.NodeProto) -> bool:
        return node.op_type in self.op_types or any(fnmatch.fnmatchcase(node.name, p) for p in self.nodes)


@dataclass(frozen=True)
class QuantizationPlan:
    """Where Q/DQ goes. Edges are (node index in graph.node, input index) pairs that read the dequantized tensor.

    activations: tensor -> its quantized consumer edges, in graph order (each tensor gets one Q/DQ pair).
    weights: initializer -> (per-channel axis, consumer edges).
    scale_groups: activation tensors that must share one scale (joined through Concat).
    """

    activations: dict[str, tuple[tuple[int, int], ...]]
    weights: dict[str, tuple[int, tuple[tuple[int, int], ...]]]
    scale_groups: tuple[tuple[str, ...], ...] = field(default=())
    # The quantized layers: the weighted ops (node indices, in graph order) whose inputs and weights the plan
    # quantizes, and the residual Add edges each fuses with (add edge -> weighted op). A layer is the unit a float
    # set is made of (calibration.keep_float.auto): TensorRT fuses a convolution with its residual Add.
    layers: tuple[int, ...] = field(default=())
    fused_adds: Mapping[tuple[int, int], int] = field(default_factory=dict)

    @property
    def activation_names(self) -> list[str]:
        return list(self.activations)

    def layer_of(self, edge: tuple[int, int]) -> int | None:
        """The quantized layer an edge belongs to: its weighted op, or the one its residual Add fuses with; None for
        a Concat's edges, which belong to no layer."""
        node = self.fused_adds.get(edge, edge[0])
        return node if node in self.layers else None

    def without_layers(self, layers: Collection[int]) -> QuantizationPlan:
        """This plan with `layers` (weighted-op node indices) left in float: their input and weight Q/DQ, and the
        shortcut Q/DQ of the residual Adds they fuse with, removed; every other scale stays as calibrated."""
        return self._keeping(lambda layer: layer not in layers)

    def only_layers(self, layers: Collection[int]) -> QuantizationPlan:
        """Only `layers` quantized (their Q/DQ as in this plan); every other layer and Concat in float."""
        return self._keeping(lambda layer: layer in layers)

    def _keeping(self, keeps) -> QuantizationPlan:
        """The plan with the edges of the layers `keeps` holds (a Concat's edges: `keeps(None)`)."""
        layers = tuple(layer for layer in self.layers if keeps(layer))

        def keep(edge: tuple[int, int]) -> bool:
            return keeps(self.layer_of(edge))

        activations = {name: tuple(e for e in edges if keep(e)) for name, edges in self.activations.items()}
        activations = {name: edges for name, edges in activations.items() if edges}
        weights = {name: (axis, tuple(e for e in edges if keep(e))) for name, (axis, edges) in self.weights.items()}
        weights = {name: entry for name, entry in weights.items() if entry[1]}
        groups = (tuple(name for name in group if name in activations) for group in self.scale_groups)
        return QuantizationPlan(
            activations,
            weights,
            tuple(group for group in groups if len(group) > 1),
            layers,
            {edge: node for edge, node in self.fused_adds.items() if node in layers},
        )


@dataclass
class _Graph:
    """Lookups over one ONNX graph."""

    model: onnx.ModelProto
    producer: dict[str, int]
    consumers: dict[str, list[tuple[int, int]]]
    constants: set[str]
    initializers: dict[str, onnx.TensorProto]
    float_tensors: set[str]
    depth: dict[str, int]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Graph:
        graph = model.graph
        producer, consumers = {}, defaultdict(list)
        for index, node in enumerate(graph.node):
            for name in node.output:
                producer[name] = index
            for slot, name in enumerate(node.input):
                if name:
                    consumers[name].append((index, slot))
        initializers = {t.name: t for t in graph.initializer}
        constants = set(initializers) | {n.output[0] for n in graph.node if n.op_type == "Constant"}
        typed = onnx.shape_inference.infer_shapes(model).graph
        float_tensors = {
            v.name
            for v in (*typed.input, *typed.value_info, *typed.output)
            if v.type.tensor_type.elem_type == TensorProto.FLOAT
        }
        # Longest path (in nodes) from the graph inputs: the shortcut of a residual Add is the shallower input.
        depth = {v.name: 0 for v in graph.input}
        for node in graph.node:
            level = 1 + max((depth.get(name, 0) for name in node.input if name), default=0)
            for name in node.output:
                depth[name] = level
        return cls(model, producer, dict(consumers), constants, initializers, float_tensors, depth)

    def node(self, index: int) -> onnx.NodeProto:
        return self.model.graph.node[index]

    def is_activation(self, name: str) -> bool:
        return bool(name) and name not in self.constants and name in self.float_tensors


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def weight_axis(node: onnx.NodeProto, weight: onnx.TensorProto) -> int:
    """The output-channel axis of a weighted op's weight tensor (the axis of its per-channel scales)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":  # (C_in, C_out / group, k...)
        return 1
    if node.op_type == "Gemm":
        return 0 if _attribute(node, "transB", 0) else 1
    return len(weight.dims) - 1  # MatMul: (..., K, N)


def _weighted_op_inputs(graph: _Graph, node: onnx.NodeProto) -> tuple[list[int], int | None] | None:
    """(activation input slots, weight input slot) of a weighted op that can run in INT8, else None."""

    def float_weight(name: str) -> bool:
        return name in graph.initializers and graph.initializers[name].data_type == TensorProto.FLOAT

    if node.op_type in ("Conv", "ConvTranspose"):
        return ([0], 1) if graph.is_activation(node.input[0]) and float_weight(node.input[1]) else None
    # Gemm / MatMul: a constant operand is a weight, two activations are both quantized per tensor.
    a, b = node.input[0], node.input[1]
    if graph.is_activation(a) and float_weight(b) and len(graph.initializers[b].dims) == 2:
        return [0], 1
    if graph.is_activation(a) and graph.is_activation(b):
        return [0, 1], None
    return None


def _fused_weighted_producer(graph: _Graph, name: str, int8_nodes: set[int]) -> int | None:
    """The INT8 weighted op whose output `name` is, looking through foldable affine ops; None if none."""
    while name in graph.producer:
        index = graph.producer[name]
        node = graph.node(index)
        if node.op_type in WEIGHTED_OPS:
            return index if index in int8_nodes else None
        if node.op_type not in FOLDABLE_AFFINE_OPS:
            return None
        variable = [i for i in node.input if i and i not in graph.constants]
        if len(variable) != 1:
            return None
        name = variable[0]
    return None


def _residual_input(graph: _Graph, node: onnx.NodeProto, int8_nodes: set[int]) -> tuple[int, int] | None:
    """(the input slot of an Add that carries the shortcut, the INT8 weighted op the Add fuses with), when the other
    input comes from an INT8 weighted op."""
    if len(node.input) != 2 or not all(graph.is_activation(name) for name in node.input):
        return None
    fused = [_fused_weighted_producer(graph, name, int8_nodes) for name in node.input]
    if fused[0] is not None and fused[1] is not None:  # both branches are convolutions (projected shortcut)
        # the shallower one is the shortcut
        shortcut = 0 if graph.depth.get(node.input[0], 0) < graph.depth.get(node.input[1], 0) else 1
        return shortcut, fused[1 - shortcut]
    if fused[0] is not None:
        return 1, fused[0]
    if fused[1] is not None:
        return 0, fused[1]
    return None


def quantization_plan(model: onnx.ModelProto, keep_float: KeepFloat = KeepFloat()) -> QuantizationPlan:
    """Decide every Q/DQ of `model` following TensorRT's placement rules (see the module docstring)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_QDQ_OPSET:
        raise ValueError(
            f"the ONNX graph has opset {opset}; per-channel Q/DQ needs opset >= {MIN_QDQ_OPSET}: "
            "re-export it with a newer opset (config onnx.opset)"
        )
    graph = _Graph.of(model)
    outputs = {o.name for o in model.graph.output}
    activation_edges: dict[str, list[tuple[int, int]]] = defaultdict(list)
    weight_edges: dict[str, list[tuple[int, int]]] = defaultdict(list)
    weight_axes: dict[str, int] = {}

    int8_nodes: set[int] = set()
    for index, node in enumerate(model.graph.node):
        if node.op_type not in WEIGHTED_OPS or keep_float.matches(node):
            continue
        slots = _weighted_op_inputs(graph, node)
        if slots is None:
            continue
        int8_nodes.add(index)
        data_slots, weight_slot = slots
        for slot in data_slots:
            activation_edges[node.input[slot]].append((index, slot))
        if weight_slot is not None:
            weight = node.input[weight_slot]
            axis = weight_axis(node, graph.initializers[weight])
            if weight_axes.setdefault(weight, axis) != axis:
                raise ValueError(
                    f"initializer {weight!r} is used as a weight along two different axes; "
                    f"keep one of its consumers in float (calibration.keep_float.nodes)"
                )
            weight_edges[weight].append((index, weight_slot))

    concats = []
    fused_adds = {}
    for index, node in enumerate(model.graph.node):
        if keep_float.matches(node):
            continue
        if node.op_type == "Add":
            residual = _residual_input(graph, node, int8_nodes)
            if residual is not None:
                slot, fused_with = residual
                activation_edges[node.input[slot]].append((index, slot))
                fused_adds[index, slot] = fused_with
        elif node.op_type == "Concat" and node.output[0] not in outputs:
            inputs = [name for name in node.input if graph.is_activation(name)]
            for slot, name in enumerate(node.input):
                if name in inputs:
                    activation_edges[name].append((index, slot))
            concats.append([*inputs, node.output[0]])

    order = _graph_order(model)
    activations = {name: tuple(sorted(activation_edges[name])) for name in sorted(activation_edges, key=order)}
    weights = {name: (weight_axes[name], tuple(sorted(weight_edges[name]))) for name in sorted(weight_edges, key=order)}
    # A Concat's inputs, and its output where a later op quantizes it, share one scale.
    joins = _UnionFind()
    for members in concats:
        joins.join([name for name in members if name in activations])
    groups = tuple(tuple(group) for group in joins.groups(order) if len(group) > 1)
    return QuantizationPlan(activations, weights, groups, tuple(sorted(int8_nodes)), fused_adds)


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def join(self, names: Sequence[str]) -> None:
        for name in names[1:]:
            self.parent[self.find(name)] = self.find(names[0])

    def groups(self, order) -> list[list[str]]:
        members = defaultdict(list)
        for name in sorted(self.parent, key=order):
            members[self.find(name)].append(name)
        return list(members.values())


def _graph_order(model: onnx.ModelProto):
    """Sort key: graph inputs first, then tensors in the order their producers appear, then initializers."""
    position = {v.name: i for i, v in enumerate(model.graph.input)}
    for node in model.graph.node:
        for name in node.output:
            position.setdefault(name, len(position))
    for initializer in model.graph.initializer:
        position.setdefault(initializer.name, len(position))
    return lambda name: (position.get(name, len(position)), name)


def shared_amax(plan: QuantizationPlan, amax: Mapping[str, float]) -> dict[str, float]:
    """Per-tensor amax with every Concat group raised to its largest member (one shared scale)."""
    shared = {name: float(amax[name]) for name in plan.activations}
    for group in plan.scale_groups:
        group_amax = max(shared[name] for name in group if name in shared)
        for name in group:
            shared[name] = group_amax
    return shared


def symmetric_scale(amax, quantized: QuantizedType = INT8) -> np.ndarray:
    """float32 scale = amax / max_magnitude (127 for int8); an all-zero range gets scale 1 (any scale represents zero
    exactly)."""
    amax = np.asarray(amax, dtype=np.float32)
    return np.where(amax > 0, amax / np.float32(quantized.max_magnitude), np.float32(1.0)).astype(np.float32)


def quantize_weight(weight: np.ndarray, axis: int, quantized: QuantizedType = INT8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel weights along `axis`: (weights in the quantized dtype, float32 scales). Rounded half to
    even (int8: to integers; FP8: numpy's cast to E4M3 rounds so) and saturated to +-max_magnitude, as
    QuantizeLinear does."""
    reduce_axes = tuple(a for a in range(weight.ndim) if a != axis)
    scale = symmetric_scale(np.abs(weight).max(axis=reduce_axes), quantized)
    shape = [1] * weight.ndim
    shape[axis] = -1
    scaled = np.clip(weight / scale.reshape(shape), -quantized.max_magnitude, quantized.max_magnitude)
    onnx_type = ONNX_QUANTIZED_TYPES[quantized.name]
    on_grid = np.rint(scaled) if np.issubdtype(onnx_type.numpy_dtype, np.integer) else scaled
    return on_grid.astype(onnx_type.numpy_dtype), scale


def insert_qdq(
    model: onnx.ModelProto, plan: QuantizationPlan, amax: Mapping[str, float], quantized: QuantizedType = INT8
) -> onnx.ModelProto:
    """A copy of `model` with the plan's Q/DQ pairs (activation scales from `amax`) and weights in the `quantized`
    dtype; an opset below the dtype's least Q/DQ opset is raised to it.

    Deterministic: the same model, plan, amax and dtype give byte-identical serialized output.
    """
    missing = [name for name in plan.activations if name not in amax]
    if missing:
        raise KeyError(
            f"no calibrated amax for {len(missing)} quantized tensors, e.g. {missing[:3]}: "
            "calibrate with the same quantization plan"
        )
    onnx_type = ONNX_QUANTIZED_TYPES[quantized.name]
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for opset in result.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < onnx_type.min_opset:
            opset.version = onnx_type.min_opset
    graph = result.graph
    taken = {n for node in graph.node for n in (*node.input, *node.output, node.name)} | {
        v.name for v in (*graph.input, *graph.initializer)
    }

    def fresh(name: str) -> str:
        if name in taken:
            raise ValueError(f"cannot add {name!r} to the ONNX graph: the name is already used")
        taken.add(name)
        return name

    initializers = list(graph.initializer)
    weight_nodes = []
    rewired: dict[tuple[int, int], str] = {}
    float_weights = {t.name: t for t in initializers}
    for name, (axis, edges) in plan.weights.items():
        weight, scale = quantize_weight(numpy_helper.to_array(float_weights[name]), axis, quantized)
        names = [fresh(f"{name}_quantized"), fresh(f"{name}_scale"), fresh(f"{name}_zero_point")]
        initializers += [
            numpy_helper.from_array(weight, names[0]),
            numpy_helper.from_array(scale, names[1]),
            numpy_helper.from_array(np.zeros_like(scale, dtype=onnx_type.numpy_dtype), names[2]),
        ]
        output = fresh(f"{name}_dequantized")
        weight_nodes.append(
            helper.make_node("DequantizeLinear", names, [output], fresh(f"{name}_DequantizeLinear"), axis=axis)
        )
        rewired.update({edge: output for edge in edges})

    activation_nodes: dict[str, list[onnx.NodeProto]] = {}
    for name, scale_amax in shared_amax(plan, amax).items():
        scale, zero_point = fresh(f"{name}_scale"), fresh(f"{name}_zero_point")
        initializers += [
            numpy_helper.from_array(symmetric_scale(scale_amax, quantized), scale),
            numpy_helper.from_array(np.array(0, dtype=onnx_type.numpy_dtype), zero_point),
        ]
        on_grid, dequantized = fresh(f"{name}_quantized"), fresh(f"{name}_dequantized")
        activation_nodes[name] = [
            helper.make_node("QuantizeLinear", [name, scale, zero_point], [on_grid], fresh(f"{name}_QuantizeLinear")),
            helper.make_node(
                "DequantizeLinear", [on_grid, scale, zero_point], [dequantized], fresh(f"{name}_DequantizeLinear")
            ),
        ]
        rewired.update({edge: dequantized for edge in plan.activations[name]})

    still_used = {
        n for i, node in enumerate(model.graph.node) for s, n in enumerate(node.input) if (i, s) not in rewired
    }
    still_used |= {o.name for o in graph.output}
    initializers = [t for t in initializers if t.name not in plan.weights or t.name in still_used]

    nodes = list(weight_nodes)
    for value in graph.input:
        nodes += activation_nodes.get(value.name, [])
    for index, node in enumerate(model.graph.node):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for slot in range(len(copy.input)):
            if (index, slot) in rewired:
                copy.input[slot] = rewired[index, slot]
        nodes.append(copy)
        for name in node.output:
            nodes += activation_nodes.get(name, [])

    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    onnx.checker.check_model(result)
    return result


def save_onnx(model: onnx.ModelProto, path: str | Path) -> None:
    """Write an ONNX file atomically (temp file in the same folder, then rename)."""
    write_bytes(path, model.SerializeToString())


class CalibratedGraph:
    """A features graph, its Q/DQ plan (calibration.keep_float's patterns) and the amax rule calibrate measured
    (ranges.json, of trtflow's placement): its Q/DQ graph in the `quantized` dtype with any set of its layers left in
    float, named by node. Rule quantized_graph writes one; the sensitivity stage measures many."""

    def __init__(
        self,
        features_onnx: str | Path,
        ranges_json: str | Path,
        quantized: QuantizedType,
        keep_float: Mapping | None = None,
    ):
        ranges = json.loads(Path(ranges_json).read_text())
        if ranges["qdq_placement"] != "trtflow":
            raise ValueError(
                f"{ranges_json} was calibrated with calibration.qdq_placement: {ranges['qdq_placement']}; the Q/DQ "
                f"graphs of {features_onnx} written from it need trtflow's placement: set calibration.qdq_placement: "
                "trtflow"
            )
        self.amax = {name: tensor["amax"] for name, tensor in ranges["tensors"].items()}
        self.model = onnx.load(str(features_onnx))
        self.plan = quantization_plan(self.model, KeepFloat.from_config(keep_float))
        self.quantized = quantized
        self.names = [self.model.graph.node[i].name for i in self.plan.layers]
        if len(set(self.names)) != len(self.names) or not all(self.names):
            raise ValueError(
                f"{features_onnx}: its quantized layers need unique node names to be chosen by name; "
                "re-export it (rule onnx names every node)"
            )
        self.index = dict(zip(self.names, self.plan.layers))

    def layers(self, names: Sequence[str], source: str) -> set[int]:
        """The node indices of the quantized layers `names`; a name that is not one is refused, naming `source`."""
        unknown = [name for name in names if name not in self.index]
        if unknown:
            raise ValueError(
                f"{source} names {unknown[:3]}, not quantized layers of the features graph: it was chosen for another "
                "graph or keep_float; rerun the stage that wrote it (snakemake --forcerun float_layers)"
            )
        return {self.index[name] for name in names}

    def graph(self, plan: QuantizationPlan) -> onnx.ModelProto:
        return insert_qdq(self.model, plan, self.amax, self.quantized)

    def with_float(self, names: Sequence[str] = (), source: str = "the layer ranking") -> onnx.ModelProto:
        """The Q/DQ graph with the layers `names` (named by `source` in a refusal) left in float."""
        return self.graph(self.plan.without_layers(self.layers(names, source)))
