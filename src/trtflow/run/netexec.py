"""Evaluate a TensorRT network definition on the CPU (or any torch device), layer by layer.

Input: a `trtflow.formats.network_record.NetworkRecord`, read from the very `INetworkDefinition` the engine
stage hands to the builder (ONNX-parsed features + the API-built head, outputs marked). Every layer is
evaluated with the semantics of TensorRT's documentation of that layer type, written here without
looking at `trtflow.common.head` or `trtflow.build.head_network`, so that it can disagree with them. What this proves:
the network we hand TensorRT computes the detections we claim. What it does not: TensorRT's own
compilation of it (fusions, kernel choice, reduced-precision kernels).

Choices where TensorRT's documentation leaves room, each the reading closest to it:
- Floating-point layers compute in float32 and round their outputs to the declared type (float16
  tensors of a strongly typed network, as TensorRT's fp16 kernels accumulate in float32).
- TopK breaks ties by the lower index. Gather refuses negative and out-of-range indices: what TensorRT gives
  for them depends on the version (newer headers document zeros out of range, wrapping of negative indices on
  build-time axes), and none of our networks asks for them.
- INMSLayer orders (box, class) candidates of equal score by box, then class (TensorRT: unspecified), both
  for its TopK limit and for its output.
- Resize by static scales where length x scale is not the output length: refused (TensorRT's documented
  ratio of lengths and ONNX's 1 / scale disagree there; see resize_positions).
- Integer DIV truncates toward zero; FLOOR_DIV floors. Cast from float to integer truncates.
- Quantize: round half to even of x / scale, plus the zero point, saturated to the type's range (FP8: the
  nearest E4M3 value, ties to even, within +-448; its zero point is zero, as TensorRT requires);
  Dequantize: (x - zero point) * scale. Per-tensor (scalar scale), per-axis (1-D scale on `axis`) or blocked
  (a scale of the input's rank, one value per block of `block_shape`).
- Loops: a WHILE trip limit is evaluated before each iteration from the current recurrence values;
  LAST_VALUE outputs are the value of the last iteration that ran.
Every layer's outputs are checked against the types and shapes TensorRT declared for them, and a dimension
declared -1 (unknown when the network was defined: a dynamic batch) against the layer's documented
output-shape rule applied to the shapes that flow in (SHAPE_RULES: every implemented type except Shuffle,
Slice, Resize, Constant, INMSLayer and the loop boundaries, whose shapes are parameters or data).
A layer type or mode not implemented here is refused, naming the layer, its index and its type, and so is
a layer with an attribute off the default the executor assumes (`network_record.DEFAULT_ONLY`).
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trtflow.backend.dtypes import TORCH_DTYPES
from trtflow.formats.network_record import (
    DEFAULT_ONLY,
    LAYER_ATTRIBUTES,
    LOOP_BOUNDARIES,
    STORED_AS_BYTES,
    NetworkRecord,
)

# IQuantizeLayer's clamping range per output type (NvInfer.h)
QUANTIZED_RANGE = {"INT8": (-128, 127), "UINT8": (0, 255), "FP8": (-448, 448)}
NMS_TOP_K_LIMIT = 5000  # INMSLayer::setTopKBoxLimit: at most 5000 (2000 on SM 5.3 / 6.2 devices)


class NetworkExecutionError(RuntimeError):
    """A layer cannot be evaluated as TensorRT defines it (unknown type or mode, bad input)."""


CONVERTING = ("CAST", "IDENTITY", "QUANTIZE")  # layers whose output type differs from what they compute in


def value_kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "integer"


def layer_label(layer: Mapping) -> str:
    return f"layer {layer['index']} '{layer['name']}' ({layer['type']})"


def axes_of(mask: int, rank: int) -> list[int]:
    return [axis for axis in range(rank) if mask >> axis & 1]


def floating(tensor: torch.Tensor) -> torch.Tensor:
    """Float tensors as float32 for computing; others unchanged."""
    return tensor.float() if tensor.is_floating_point() else tensor


# --------------------------------------------------------------------------- layer semantics
# Each takes (layer record, its input tensors, the executor) and returns its output tensors; the
# executor casts float results to the declared type and checks dtypes and shapes.

ELEMENTWISE = {
    "SUM": torch.add,
    "SUB": torch.sub,
    "PROD": torch.mul,
    "MAX": torch.maximum,
    "MIN": torch.minimum,
    "POW": torch.pow,
    "FLOOR_DIV": lambda a, b: torch.div(a, b, rounding_mode="floor"),
    "AND": torch.logical_and,
    "OR": torch.logical_or,
    "XOR": torch.logical_xor,
    "EQUAL": torch.eq,
    "GREATER": torch.gt,
    "LESS": torch.lt,
}


def elementwise(layer, inputs, _):
    a, b = (floating(t) for t in inputs)
    op = layer["params"]["op"]
    if op == "DIV":
        return [a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc")]
    if op not in ELEMENTWISE:
        raise NotImplementedError(f"ElementWiseOperation.{op}")
    return [ELEMENTWISE[op](a, b)]


UNARY = {
    "EXP": torch.exp,
    "LOG": torch.log,
    "SQRT": torch.sqrt,
    "RECIP": torch.reciprocal,
    "ABS": torch.abs,
    "NEG": torch.neg,
    "SIN": torch.sin,
    "COS": torch.cos,
    "TAN": torch.tan,
    "SINH": torch.sinh,
    "COSH": torch.cosh,
    "ASIN": torch.asin,
    "ACOS": torch.acos,
    "ATAN": torch.atan,
    "ASINH": torch.asinh,
    "ACOSH": torch.acosh,
    "ATANH": torch.atanh,
    "CEIL": torch.ceil,
    "FLOOR": torch.floor,
    "ERF": torch.erf,
    "NOT": torch.logical_not,
    "SIGN": torch.sign,
    "ROUND": torch.round,
    "ISINF": torch.isinf,
    "ISNAN": torch.isnan,
}


def unary(layer, inputs, _):
    op = layer["params"]["op"]
    if op not in UNARY:
        raise NotImplementedError(f"UnaryOperation.{op}")
    return [UNARY[op](floating(inputs[0]))]


def activation(layer, inputs, _):
    x, kind = inputs[0].float(), layer["params"]["type"]
    alpha, beta = layer["params"]["alpha"], layer["params"]["beta"]
    formulas = {
        "RELU": lambda: torch.clamp_min(x, 0.0),
        "SIGMOID": lambda: torch.sigmoid(x),
        "TANH": lambda: torch.tanh(x),
        "LEAKY_RELU": lambda: torch.where(x >= 0, x, alpha * x),
        "ELU": lambda: torch.where(x >= 0, x, alpha * (torch.exp(x) - 1)),
        "SELU": lambda: beta * torch.where(x > 0, x, alpha * (torch.exp(x) - 1)),
        "SOFTSIGN": lambda: x / (1 + x.abs()),
        "SOFTPLUS": lambda: alpha * torch.log(torch.exp(beta * x) + 1),
        "CLIP": lambda: torch.clamp(x, alpha, beta),
        "HARD_SIGMOID": lambda: torch.clamp(alpha * x + beta, 0.0, 1.0),
        "SCALED_TANH": lambda: alpha * torch.tanh(beta * x),
        "THRESHOLDED_RELU": lambda: torch.where(x > alpha, x, 0.0),
        "GELU_ERF": lambda: 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0))),
        "GELU_TANH": lambda: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (0.044715 * x**3 + x))),
    }
    if kind not in formulas:
        raise NotImplementedError(f"ActivationType.{kind}")
    return [formulas[kind]()]


def explicit_padding(layer) -> list[int]:
    """pre/post padding as F.pad's (last axis first) list; only explicit padding modes."""
    params = layer["params"]
    if params["padding_mode"] != "EXPLICIT_ROUND_DOWN":
        raise NotImplementedError(f"PaddingMode.{params['padding_mode']}")
    pad = []
    for before, after in zip(reversed(params["pre_padding"]), reversed(params["post_padding"])):
        pad += [before, after]
    return pad


def convolution(layer, inputs, executor):
    params = layer["params"]
    x, pad = inputs[0].float(), explicit_padding(layer)
    symmetric = params["pre_padding"] == params["post_padding"]
    if not symmetric:
        x = F.pad(x, pad)
    spatial = len(params["kernel_size_nd"])
    if len(inputs) > 1 and inputs[1] is not None:
        kernel = inputs[1].float()
    else:
        shape = (params["num_output_maps"], x.shape[1] // params["num_groups"], *params["kernel_size_nd"])
        kernel = executor.weight(layer, "kernel").float().reshape(shape)
    if len(inputs) > 2 and inputs[2] is not None:
        bias = inputs[2].float().reshape(-1)
    else:
        bias = executor.weight(layer, "bias")
        bias = None if bias is None else bias.float()
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return [
        conv(
            x,
            kernel,
            bias,
            stride=params["stride_nd"],
            padding=params["pre_padding"] if symmetric else 0,
            dilation=params["dilation_nd"],
            groups=params["num_groups"],
        )
    ]


def parametric_relu(layer, inputs, _):
    """x where x >= 0, else slope * x, the slope tensor (input 1) broadcast to x's shape."""
    x, slope = inputs[0].float(), inputs[1].float()
    return [torch.where(x >= 0, x, slope * x)]


def pooling(layer, inputs, _):
    params = layer["params"]
    window, stride = params["window_size_nd"], params["stride_nd"]
    pad = explicit_padding(layer)
    x = inputs[0].float()
    maximum = lambda: {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(window)](  # noqa: E731
        F.pad(x, pad, value=-math.inf), window, stride
    )

    def average():
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(window)]
        total = pool(F.pad(x, pad), window, stride) * math.prod(window)
        if not params["average_count_excludes_padding"]:
            return total / math.prod(window)
        count = pool(F.pad(torch.ones_like(x[:1, :1]), pad), window, stride) * math.prod(window)
        return total / count

    kind = params["type"]
    if kind == "MAX":
        return [maximum()]
    if kind == "AVERAGE":
        return [average()]
    if kind == "MAX_AVERAGE_BLEND":  # NvInfer.h PoolingType: (1 - blendFactor) * maxPool + blendFactor * avgPool
        blend = params["blend_factor"]
        return [(1 - blend) * maximum() + blend * average()]
    raise NotImplementedError(f"PoolingType.{kind}")


def resize_positions(layer, axis: int, size_in: int, size_out: int, scale: float | None) -> torch.Tensor:
    """Input coordinates of each output position along one axis: ResizeCoordinateTransformation's formulas
    (NvInfer.h), which map by the ratio of lengths, length_origin / length_resize."""
    params = layer["params"]
    out = torch.arange(size_out, dtype=torch.float64)
    mode = params["coordinate_transformation"]
    if size_out == 1 and params["selector_for_single_pixel"] == "UPPER":
        return torch.zeros(1, dtype=torch.float64)
    if mode == "ALIGN_CORNERS":
        return out * ((size_in - 1) / (size_out - 1)) if size_out > 1 else torch.zeros(1, dtype=torch.float64)
    if mode not in ("ASYMMETRIC", "HALF_PIXEL"):
        raise NotImplementedError(f"ResizeCoordinateTransformation.{mode}")
    # NvInfer.h documents the ratio of lengths; ONNX's Resize maps by 1 / scale, and TensorRT's ONNX parser hands
    # ONNX scales to setScales. Where the output length (floor(length * scale)) is not length * scale the two
    # differ, and which one TensorRT applies is not documented: refused rather than guessed.
    if scale is not None and not math.isclose(size_in * scale, size_out, rel_tol=1e-6):  # scales are float32
        raise NotImplementedError(
            f"Resize by scale {scale} on axis {axis} maps length {size_in} -> {size_out}, not {size_in} x {scale}, "
            "where TensorRT's documented coordinate transform (ratio of lengths) and ONNX's (1 / scale) disagree; "
            "set the output dimensions (ONNX Resize: sizes) instead, or a scale that maps lengths exactly"
        )
    if mode == "ASYMMETRIC":
        return out * size_in / size_out
    return (out + 0.5) * size_in / size_out - 0.5


def resize(layer, inputs, _):
    params = layer["params"]
    x = inputs[0]
    target = list(layer["outputs"][0]["shape"])
    if len(inputs) > 1 and inputs[1] is not None:
        target = inputs[1].tolist()
    scales = params.get("scales") or [None] * x.dim()
    if any(d < 0 for d in target):
        target = [math.floor(n * s) for n, s in zip(x.shape, scales)]
    mode = params["resize_mode"]
    rounding = {
        "FLOOR": torch.floor,
        "CEIL": torch.ceil,
        "HALF_UP": lambda v: torch.floor(v + 0.5),
        "HALF_DOWN": lambda v: torch.ceil(v - 0.5),
    }
    y = x.float() if mode == "LINEAR" else x
    for axis, (size_in, size_out) in enumerate(zip(x.shape, target)):
        if size_in == size_out and scales[axis] in (None, 1.0):
            continue
        position = resize_positions(layer, axis, size_in, size_out, scales[axis])
        if mode == "NEAREST":
            if params["nearest_rounding"] not in rounding:
                raise NotImplementedError(f"ResizeRoundMode.{params['nearest_rounding']}")
            index = rounding[params["nearest_rounding"]](position).clamp(0, size_in - 1).long().to(y.device)
            y = y.index_select(axis, index)
        elif mode == "LINEAR":
            position = position.clamp(0, size_in - 1)
            low = position.floor().long()
            high = (low + 1).clamp(max=size_in - 1)
            shape = [1] * y.dim()
            shape[axis] = size_out
            frac = (position - low).float().reshape(shape).to(y.device)
            y = y.index_select(axis, low.to(y.device)) * (1 - frac) + y.index_select(axis, high.to(y.device)) * frac
        else:
            raise NotImplementedError(f"InterpolationMode.{mode}")
    return [y]


def shuffle(layer, inputs, _):
    params = layer["params"]
    x = inputs[0]
    x = x.permute(params["first_transpose"][: x.dim()])
    dims = inputs[1].tolist() if len(inputs) > 1 and inputs[1] is not None else params["reshape_dims"]
    if dims is not None:
        if params["zero_is_placeholder"]:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        x = x.reshape(dims)
    return [x.permute(params["second_transpose"][: x.dim()])]


def gather_axis(data: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    """Gather DEFAULT without element-wise dims: data.shape[:axis] + indices.shape + data.shape[axis+1:]."""
    picked = data.movedim(axis, 0)[indices.long()]  # indices.shape + rest (axis removed, others in order)
    return picked.movedim(tuple(range(indices.dim())), tuple(range(axis, axis + indices.dim())))


def gather(layer, inputs, _):
    params = layer["params"]
    data, indices = inputs[0], inputs[1]
    axis, batch_dims, mode = params["axis"], params["num_elementwise_dims"], params["mode"]
    size = data.shape[axis]
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ValueError(f"gather indices span [{int(indices.min())}, {int(indices.max())}] on an axis of size {size}")
    if mode == "ELEMENT":
        return [torch.gather(data, axis, indices.long())]
    if mode != "DEFAULT":
        raise NotImplementedError(f"GatherMode.{mode}")
    if batch_dims == 0:
        return [gather_axis(data, indices, axis)]
    if batch_dims == 1 and axis >= 1:  # the element-wise first dimension broadcasts (IGatherLayer, kDEFAULT)
        batch = torch.broadcast_shapes(data.shape[:1], indices.shape[:1])
        data, indices = data.expand(*batch, *data.shape[1:]), indices.expand(*batch, *indices.shape[1:])
        rows = torch.arange(batch[0], device=data.device).reshape(-1, *[1] * (indices.dim() - 1))
        picked = data.movedim(axis, 1)[rows, indices.long()]  # batch + indices.shape[1:] + the rest, in order
        return [picked.movedim(tuple(range(1, indices.dim())), tuple(range(axis, axis + indices.dim() - 1)))]
    raise NotImplementedError(f"Gather with num_elementwise_dims={batch_dims} on axis {axis}")


def top_k(layer, inputs, _):
    params = layer["params"]
    x = inputs[0]
    (axis,) = axes_of(params["axes"], x.dim())
    k = int(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else params["k"]
    if params["op"] not in ("MAX", "MIN"):
        raise NotImplementedError(f"TopKOperation.{params['op']}")
    values, order = torch.sort(floating(x), dim=axis, descending=params["op"] == "MAX", stable=True)
    return [values.narrow(axis, 0, k), order.narrow(axis, 0, k)]


REDUCE = {"SUM": torch.sum, "PROD": torch.prod, "AVG": torch.mean, "MAX": torch.amax, "MIN": torch.amin}


def reduce(layer, inputs, _):
    params = layer["params"]
    x = floating(inputs[0])
    axes = axes_of(params["axes"], x.dim())
    op = params["op"]
    if op not in REDUCE:
        raise NotImplementedError(f"ReduceOperation.{op}")
    if op == "PROD":
        for axis in sorted(axes, reverse=True):
            x = torch.prod(x, dim=axis, keepdim=params["keep_dims"])
        return [x]
    return [REDUCE[op](x, dim=axes, keepdim=params["keep_dims"])]


def matrix_multiply(layer, inputs, _):
    params = layer["params"]
    operands = []
    for tensor, op in zip(inputs, (params["op0"], params["op1"])):
        tensor = tensor.float()
        if op == "TRANSPOSE":
            tensor = tensor.transpose(-1, -2)
        elif op not in ("NONE", "VECTOR"):
            raise NotImplementedError(f"MatrixOperation.{op}")
        operands.append(tensor)
    a, b = operands
    if params["op0"] == "VECTOR":
        a = a.unsqueeze(-2)
    if params["op1"] == "VECTOR":
        b = b.unsqueeze(-1)
    product = torch.matmul(a, b)
    if params["op1"] == "VECTOR":
        product = product.squeeze(-1)
    if params["op0"] == "VECTOR":
        product = product.squeeze(-1 if params["op1"] == "VECTOR" else -2)
    return [product]


def softmax(layer, inputs, _):
    x = inputs[0].float()
    (axis,) = axes_of(layer["params"]["axes"], x.dim())
    return [torch.softmax(x, dim=axis)]


def quantization_grid(values: torch.Tensor, like: torch.Tensor, params: Mapping) -> torch.Tensor:
    """A scale or zero point broadcast against `like`: scalar (per tensor), 1-D along `axis` (per axis), or of
    `like`'s rank (blocked): one value per block, blocks of `block_shape` (-1: the whole extent; a last, partial
    block keeps its value) or, without it, of the one dimension whose size the values divide."""
    if values.dim() == 0 or values.numel() == 1:
        return values.reshape(())
    if values.dim() == 1:
        shape = [1] * like.dim()
        shape[params["axis"]] = -1
        return values.reshape(shape)
    sizes, counts, block_shape = list(like.shape), list(values.shape), params.get("block_shape")
    if block_shape is not None:
        blocks = [size if block == -1 else block for block, size in zip(block_shape, sizes)]
    elif sum(count != size for count, size in zip(counts, sizes)) <= 1 and all(
        size % count == 0 for count, size in zip(counts, sizes)
    ):
        blocks = [size // count for count, size in zip(counts, sizes)]
    else:
        raise ValueError(f"a scale of shape {counts} on an input of shape {sizes} needs a block_shape")
    if values.dim() != like.dim() or counts != [-(-size // block) for size, block in zip(sizes, blocks)]:
        raise ValueError(f"a scale of shape {counts} does not tile an input of shape {sizes} in blocks of {blocks}")
    for axis, (block, size) in enumerate(zip(blocks, sizes)):
        values = values.repeat_interleave(block, axis).narrow(axis, 0, size)
    return values


def quantize(layer, inputs, _):
    x, scale = inputs[0].float(), quantization_grid(inputs[1].float(), inputs[0], layer["params"])
    zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else torch.zeros((), dtype=torch.int32)
    zero = quantization_grid(zero.to(torch.int32), inputs[0], layer["params"])
    out_type = layer["outputs"][0]["dtype"]
    if out_type not in QUANTIZED_RANGE:
        raise NotImplementedError(f"Quantize to {out_type}")
    low, high = QUANTIZED_RANGE[out_type]
    if TORCH_DTYPES[out_type].is_floating_point:
        # saturated first: the cast to E4M3 rounds to nearest even but need not saturate; adding the (zero) zero
        # point would turn -0 into +0
        return [torch.clamp(x / scale, low, high).to(TORCH_DTYPES[out_type])]
    return [torch.clamp(torch.round(x / scale) + zero, low, high)]


def dequantize(layer, inputs, _):
    scale = quantization_grid(inputs[1].float(), inputs[0], layer["params"])
    zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else torch.zeros((), dtype=torch.int32)
    return [(inputs[0].float() - quantization_grid(zero.float(), inputs[0], layer["params"])) * scale]


def slice_layer(layer, inputs, _):
    """ISliceLayer: start, size and stride (inputs 1-3 where set, else the layer's) per axis of `axes` (input 5,
    else the layer's; every axis in order where neither is set; a negative one counts from the last); the
    axes not listed are taken whole."""
    params = layer["params"]
    x = inputs[0]

    def given(slot: int, name: str) -> list[int] | None:
        return inputs[slot].tolist() if len(inputs) > slot and inputs[slot] is not None else params.get(name)

    start, size, stride, axes = given(1, "start"), given(2, "shape"), given(3, "stride"), given(5, "axes")
    axes = list(range(x.dim())) if axes is None else [axis + x.dim() if axis < 0 else axis for axis in axes]
    if len(set(axes)) != len(axes) or not all(0 <= axis < x.dim() for axis in axes):
        raise ValueError(f"slice axes {given(5, 'axes')} on a tensor of rank {x.dim()}")
    if not len(start) == len(size) == len(stride) == len(axes):
        raise ValueError(f"slice start {start}, size {size}, stride {stride} do not give one entry per axis {axes}")
    mode = params["mode"]
    fill = inputs[4] if len(inputs) > 4 and inputs[4] is not None else torch.zeros((), dtype=x.dtype)
    y, inside = x, torch.ones((), dtype=torch.bool, device=x.device)
    for axis, begin, count, step in zip(axes, start, size, stride):  # the other axes whole
        n = x.shape[axis]
        index = begin + step * torch.arange(count, device=x.device)
        valid = (index >= 0) & (index < n)
        if mode in ("DEFAULT", "STRICT_BOUNDS") and not bool(valid.all()):
            raise ValueError(f"slice reads outside axis {axis} of size {n}")
        if mode == "WRAP":
            index = index % n
        elif mode == "REFLECT":
            period = 2 * n - 2 if n > 1 else 1
            index = index % period
            index = torch.where(index >= n, period - index, index)
        elif mode not in ("DEFAULT", "STRICT_BOUNDS", "CLAMP", "FILL"):
            raise NotImplementedError(f"SampleMode.{mode}")
        y = y.index_select(axis, index.clamp(0, n - 1))
        if mode == "FILL":
            shape = [1] * x.dim()
            shape[axis] = count
            inside = inside & valid.reshape(shape)
    if mode == "FILL":
        y = torch.where(inside, y, fill.to(y.dtype).reshape(()))
    return [y]


def select(layer, inputs, _):
    return [torch.where(inputs[0], floating(inputs[1]), floating(inputs[2]))]


def concatenation(layer, inputs, _):
    return [torch.cat([floating(t) for t in inputs], dim=layer["params"]["axis"])]


def constant(layer, _, executor):
    return [executor.constant(layer)]


def same(layer, inputs, _):
    """Cast and Identity: the input, converted to the declared output type by the executor."""
    return [inputs[0]]


def shape_of(layer, inputs, _):
    return [torch.tensor(list(inputs[0].shape), dtype=torch.int64, device=inputs[0].device)]


def cumulative(layer, inputs, _):
    """ICumulativeLayer SUM: y[j] = sum of x[0..j] (inclusive) or x[0..j-1] (exclusive), counted from the end
    when reversed."""
    params = layer["params"]
    if params["op"] != "SUM":
        raise NotImplementedError(f"CumulativeOperation.{params['op']}")
    x, axis = floating(inputs[0]), int(inputs[1])
    if params["reverse"]:
        x = x.flip(axis)
    if params["exclusive"] and x.shape[axis]:  # shifted, then summed: inclusive minus x loses small terms
        x = torch.cat([torch.zeros_like(x.narrow(axis, 0, 1)), x.narrow(axis, 0, x.shape[axis] - 1)], axis)
    total = torch.cumsum(x, dim=axis)
    return [total.flip(axis) if params["reverse"] else total]


def corner_pairs(boxes: torch.Tensor, box_format: str) -> torch.Tensor:
    """(..., 4) boxes as x1 <= x2, y1 <= y2 corners (INMSLayer accepts either corner order)."""
    if box_format == "CENTER_SIZES":
        center, size = boxes[..., :2], boxes[..., 2:]
        boxes = torch.cat([center - size / 2, center + size / 2], -1)
    elif box_format != "CORNER_PAIRS":
        raise NotImplementedError(f"BoundingBoxFormat.{box_format}")
    low, high = torch.minimum(boxes[..., :2], boxes[..., 2:]), torch.maximum(boxes[..., :2], boxes[..., 2:])
    return torch.cat([low, high], -1)


def greedy_selection(boxes: torch.Tensor, classes: torch.Tensor, iou_thresh: float, keep: int) -> list[int]:
    """Greedy NMS over candidates in descending score: each kept unless its IoU with a kept candidate of its
    class exceeds `iou_thresh`, at most `keep` per class; returns the kept positions, in candidate order."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept: dict[int, list[int]] = {}
    selected = []
    for i, cls in enumerate(classes.tolist()):
        same = kept.setdefault(cls, [])
        if len(same) == keep:
            continue
        if same:
            others = boxes[same]
            low, high = torch.maximum(others[:, :2], boxes[i, :2]), torch.minimum(others[:, 2:], boxes[i, 2:])
            inter = (high - low).clamp(min=0).prod(-1)
            iou = inter / (area[same] + area[i] - inter)
            if bool((iou > iou_thresh).any()):
                continue
        same.append(i)
        selected.append(i)
    return selected


def nms(layer, inputs, _):
    """INMSLayer: boxes (B, N, 4) or per class (B, N, C, 4), scores (B, N, C), max output boxes per class,
    IoU threshold (default 0), score threshold (default 0) -> selected (batch, class, box) indices and their
    count. Per batch item, the (box, class) scores above the score threshold sorted without regard to class,
    the best `topk_box_limit` of them considered; per class, greedy NMS; the selected ordered by batch, then by
    decreasing score (NvInfer.h, INMSLayer)."""
    params = layer["params"]
    limit = params["topk_box_limit"]
    if limit > NMS_TOP_K_LIMIT:
        raise ValueError(f"topk_box_limit {limit} exceeds TensorRT's limit of {NMS_TOP_K_LIMIT}; lower it")
    boxes, scores = corner_pairs(inputs[0].float(), params["bounding_box_format"]), inputs[1].float()
    scalar = lambda i: float(inputs[i]) if len(inputs) > i and inputs[i] is not None else 0.0  # noqa: E731
    keep, iou_thresh, score_thresh = int(inputs[2]), scalar(3), scalar(4)
    num_classes = scores.shape[2]
    selected = []
    for batch in range(scores.shape[0]):
        flat = scores[batch].flatten()  # (box, class) pairs, box-major: ties keep this order
        order = torch.sort(flat, descending=True, stable=True).indices
        order = order[flat[order] > score_thresh][:limit]
        box, cls = order // num_classes, order % num_classes
        candidates = boxes[batch, box, cls] if boxes.dim() == 4 else boxes[batch, box]
        for i in greedy_selection(candidates, cls, iou_thresh, keep):
            selected.append([batch, int(cls[i]), int(box[i])])
    found = torch.tensor(selected, dtype=torch.int32, device=scores.device).reshape(-1, 3)
    return [found, torch.tensor(len(selected), dtype=torch.int32, device=scores.device)]


def scatter(layer, inputs, _):
    data, indices, updates = inputs
    mode = layer["params"]["mode"]
    if mode == "ELEMENT":
        return [torch.scatter(data, layer["params"]["axis"], indices.long(), updates)]
    if mode != "ND":
        raise NotImplementedError(f"ScatterMode.{mode}")
    result = data.clone()
    depth = indices.shape[-1]
    result[tuple(indices.long().reshape(-1, depth).T)] = updates.reshape(-1, *data.shape[depth:]).to(data.dtype)
    return [result]


LAYERS: dict[str, Callable] = {
    "ACTIVATION": activation,
    "CAST": same,
    "CONCATENATION": concatenation,
    "CONSTANT": constant,
    "CONVOLUTION": convolution,
    "CUMULATIVE": cumulative,
    "DEQUANTIZE": dequantize,
    "ELEMENTWISE": elementwise,
    "GATHER": gather,
    "IDENTITY": same,
    "MATRIX_MULTIPLY": matrix_multiply,
    "NMS": nms,
    "PARAMETRIC_RELU": parametric_relu,
    "POOLING": pooling,
    "QUANTIZE": quantize,
    "REDUCE": reduce,
    "RESIZE": resize,
    "SCATTER": scatter,
    "SELECT": select,
    "SHAPE": shape_of,
    "SHUFFLE": shuffle,
    "SLICE": slice_layer,
    "SOFTMAX": softmax,
    "TOPK": top_k,
    "UNARY": unary,
}


# --------------------------------------------------------------------------- output-shape rules
# Each takes (layer record, its input tensors) and returns the shape TensorRT's documentation gives every
# output of the layer, from the shapes that flow in (None: no rule for this mode). The executor checks
# dimensions declared -1 (unknown when the network was defined) against it. Layers whose output shape is the
# value of a parameter or shape tensor (Shuffle, Slice, Resize, Constant) or depends on the data (NMS) have none.


def broadcast_shape(*shapes: Sequence[int]) -> list[int]:
    """IElementWiseLayer / ISelectLayer / the batch dimensions of IMatrixMultiplyLayer: equal ranks; per
    dimension the lengths match, or one is 1 and the output takes the other."""
    if len({len(shape) for shape in shapes}) != 1:
        raise ValueError(f"shapes {list(map(list, shapes))} differ in rank; TensorRT broadcasts equal ranks only")
    result = []
    for lengths in zip(*shapes):
        others = set(lengths) - {1}
        if len(others) > 1:
            raise ValueError(f"shapes {list(map(list, shapes))} do not broadcast")
        result.append(others.pop() if others else 1)
    return result


def first_input_shape(layer, inputs) -> list[int]:
    return list(inputs[0].shape)


def concatenation_shape(layer, inputs) -> list[int]:
    axis = layer["params"]["axis"]
    shape = list(inputs[0].shape)
    shape[axis] = sum(t.shape[axis] for t in inputs)
    return shape


def gather_shape(layer, inputs) -> list[int] | None:
    """kDEFAULT: the broadcast of the element-wise dimensions, then data's with the axis replaced by the
    indices' remaining ones; kELEMENT: the indices'."""
    params = layer["params"]
    data, indices = list(inputs[0].shape), list(inputs[1].shape)
    if params["mode"] == "ELEMENT":
        return indices
    if params["mode"] != "DEFAULT":
        return None
    front, axis = params["num_elementwise_dims"], params["axis"]
    return broadcast_shape(data[:front], indices[:front]) + data[front:axis] + indices[front:] + data[axis + 1 :]


def matrix_multiply_shape(layer, inputs) -> list[int]:
    """The broadcast batch dimensions, then A's rows unless A is a vector, B's columns unless B is a vector."""
    a, b = (list(t.shape) for t in inputs)
    op0, op1 = layer["params"]["op0"], layer["params"]["op1"]
    a_batch, rows = (a[:-1], []) if op0 == "VECTOR" else (a[:-2], [a[-1] if op0 == "TRANSPOSE" else a[-2]])
    b_batch, columns = (b[:-1], []) if op1 == "VECTOR" else (b[:-2], [b[-2] if op1 == "TRANSPOSE" else b[-1]])
    return broadcast_shape(a_batch, b_batch) + rows + columns


def reduce_shape(layer, inputs) -> list[int]:
    shape = list(inputs[0].shape)
    axes = axes_of(layer["params"]["axes"], len(shape))
    if layer["params"]["keep_dims"]:
        return [1 if axis in axes else n for axis, n in enumerate(shape)]
    return [n for axis, n in enumerate(shape) if axis not in axes]


def top_k_shape(layer, inputs) -> list[int]:
    shape = list(inputs[0].shape)
    (axis,) = axes_of(layer["params"]["axes"], len(shape))
    shape[axis] = int(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else layer["params"]["k"]
    return shape


def window_shape(layer, inputs) -> list[int]:
    """Convolution and pooling with explicit padding rounded down: per spatial axis
    floor((length + pre + post - dilation * (kernel - 1) - 1) / stride) + 1; convolution sets the channels."""
    params = layer["params"]
    kernel = params.get("kernel_size_nd") or params["window_size_nd"]
    dilation = params.get("dilation_nd") or [1] * len(kernel)
    shape = list(inputs[0].shape)
    spatial = [
        (n + before + after - d * (k - 1) - 1) // s + 1
        for n, before, after, d, k, s in zip(
            shape[-len(kernel) :], params["pre_padding"], params["post_padding"], dilation, kernel, params["stride_nd"]
        )
    ]
    channels = [params["num_output_maps"]] if layer["type"] == "CONVOLUTION" else shape[-len(kernel) - 1 : -len(kernel)]
    return shape[: -len(kernel) - 1] + channels + spatial


SHAPE_RULES: dict[str, Callable] = {
    "ACTIVATION": first_input_shape,
    "CAST": first_input_shape,
    "CONCATENATION": concatenation_shape,
    "CONVOLUTION": window_shape,
    "CUMULATIVE": first_input_shape,
    "DEQUANTIZE": first_input_shape,
    "ELEMENTWISE": lambda layer, inputs: broadcast_shape(*(t.shape for t in inputs)),
    "GATHER": gather_shape,
    "IDENTITY": first_input_shape,
    "MATRIX_MULTIPLY": matrix_multiply_shape,
    "PARAMETRIC_RELU": first_input_shape,
    "POOLING": window_shape,
    "QUANTIZE": first_input_shape,
    "REDUCE": reduce_shape,
    "SCATTER": first_input_shape,
    "SELECT": lambda layer, inputs: broadcast_shape(*(t.shape for t in inputs)),
    "SHAPE": lambda layer, inputs: [inputs[0].dim()],
    "SOFTMAX": first_input_shape,
    "TOPK": top_k_shape,
    "UNARY": first_input_shape,
}


# --------------------------------------------------------------------------- loops


@dataclass
class Loop:
    """One ILoop: its boundary layers and body (layers that depend on a recurrence or iterator output)."""

    name: str
    recurrences: list[dict]
    iterators: list[dict]
    trip_limit: dict
    outputs: list[dict]
    condition: list[dict]  # body layers the trip limit's input needs, evaluated first in each iteration
    rest: list[dict]  # the other body layers
    index: int  # the lowest layer index of the loop: its place in the schedule

    @property
    def inputs(self) -> set[str]:
        """Tensors from outside the loop that it reads."""
        inside = {
            o["name"]
            for layer in self.recurrences + self.iterators + self.condition + self.rest
            for o in layer["outputs"]
        }
        read = [layer["inputs"][0] for layer in self.recurrences + self.iterators]
        read += [name for layer in self.condition + self.rest for name in layer["inputs"]]
        read += self.trip_limit["inputs"] + [name for layer in self.outputs for name in layer["inputs"][1:]]
        read += [layer["inputs"][0] for layer in self.outputs]
        return {name for name in read if name is not None and name not in inside}

    @property
    def produces(self) -> list[str]:
        return [layer["outputs"][0]["name"] for layer in self.outputs]


def upstream(layers: list[dict], targets: set[str]) -> list[dict]:
    """The layers among `layers` that `targets` depend on, in their order."""
    producer = {o["name"]: layer for layer in layers for o in layer["outputs"]}
    needed, stack = set(), list(targets)
    while stack:
        layer = producer.get(stack.pop())
        if layer is not None and layer["index"] not in needed:
            needed.add(layer["index"])
            stack.extend(name for name in layer["inputs"] if name is not None)
    return [layer for layer in layers if layer["index"] in needed]


def find_loops(layers: list[dict]) -> tuple[list[Loop], set[int]]:
    """Group loop layers by ILoop; returns the loops and the indices of every layer they own."""
    boundaries: dict[str, list[dict]] = {}
    for layer in layers:
        if layer["type"] in LOOP_BOUNDARIES:
            boundaries.setdefault(layer["loop"], []).append(layer)
    consumers: dict[str, list[dict]] = {}
    for layer in layers:
        for name in layer["inputs"]:
            if name is not None:
                consumers.setdefault(name, []).append(layer)
    loops, owned = [], set()
    for name, members in boundaries.items():
        kinds = {kind: [m for m in members if m["type"] == kind] for kind in LOOP_BOUNDARIES}
        if len(kinds["TRIP_LIMIT"]) != 1:
            raise NetworkExecutionError(f"loop '{name}' has {len(kinds['TRIP_LIMIT'])} trip limits; TensorRT needs one")
        body: dict[int, dict] = {}
        stack = [o["name"] for m in kinds["RECURRENCE"] + kinds["ITERATOR"] for o in m["outputs"]]
        while stack:
            for consumer in consumers.get(stack.pop(), []):
                if consumer["type"] not in LOOP_BOUNDARIES and consumer["index"] not in body:
                    body[consumer["index"]] = consumer
                    stack.extend(o["name"] for o in consumer["outputs"])
        body_layers = sorted(body.values(), key=lambda layer: layer["index"])
        condition = upstream(body_layers, {n for n in kinds["TRIP_LIMIT"][0]["inputs"] if n is not None})
        rest = [layer for layer in body_layers if layer not in condition]
        indices = {m["index"] for m in members} | set(body)
        loops.append(
            Loop(
                name,
                kinds["RECURRENCE"],
                kinds["ITERATOR"],
                kinds["TRIP_LIMIT"][0],
                kinds["LOOP_OUTPUT"],
                condition,
                rest,
                min(indices),
            )
        )
        owned |= indices
    return loops, owned


# --------------------------------------------------------------------------- the executor


@contextmanager
def full_float32_matmul():
    """CUDA matrix multiplies in full float32 (no TF32) for the duration."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class NetworkExecutor:
    """`executor({input name: tensor}) -> {output name: tensor}`: the recorded network, evaluated."""

    def __init__(self, record: NetworkRecord, device: str | torch.device = "cpu"):
        self.record = record
        self.device = torch.device(device)
        self.check_known_layers()
        self.loops, owned = find_loops(record.layers)
        steps = [layer for layer in record.layers if layer["index"] not in owned] + self.loops
        self.constants = {
            layer["outputs"][0]["name"]: self.evaluate(layer, [])[0]
            for layer in record.layers
            if layer["type"] == "CONSTANT"
        }
        self.schedule = self.order([s for s in steps if not (isinstance(s, dict) and s["type"] == "CONSTANT")])

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        return {entry["name"]: entry["shape"] for entry in self.record.inputs}

    def check_known_layers(self) -> None:
        known = set(LAYERS) | set(LOOP_BOUNDARIES)
        for layer in self.record.layers:
            if layer["type"] not in known:
                raise NetworkExecutionError(
                    f"{layer_label(layer)}: the network-definition executor does not implement {layer['type']} "
                    f"layers (it implements {', '.join(sorted(known))})"
                )
            interface = LAYER_ATTRIBUTES[layer["type"]][0]
            for attribute, (default, fix) in {**DEFAULT_ONLY["ILayer"], **DEFAULT_ONLY.get(interface, {})}.items():
                if (value := layer["params"].get(attribute, default)) != default:
                    raise NetworkExecutionError(
                        f"{layer_label(layer)}: {attribute} is {value!r} (TensorRT's default: {default!r}), which "
                        f"the network-definition executor does not evaluate; {fix}"
                    )

    def order(self, steps: list) -> list:
        """Steps in dependency order, ties broken by TensorRT's layer order."""

        def reads(step):
            if isinstance(step, Loop):
                return step.inputs
            return {name for name in step["inputs"] if name is not None}

        def writes(step):
            return step.produces if isinstance(step, Loop) else [o["name"] for o in step["outputs"]]

        def index(step):
            return step.index if isinstance(step, Loop) else step["index"]

        producer = {name: i for i, step in enumerate(steps) for name in writes(step)}
        waiting = {i: {producer[n] for n in reads(step) if n in producer} for i, step in enumerate(steps)}
        dependents: dict[int, list[int]] = {}
        for i, needs in waiting.items():
            for j in needs:
                dependents.setdefault(j, []).append(i)
        ready = [(index(steps[i]), i) for i, needs in waiting.items() if not needs]
        heapq.heapify(ready)
        ordered = []
        while ready:
            _, i = heapq.heappop(ready)
            ordered.append(steps[i])
            for j in dependents.get(i, []):
                waiting[j].discard(i)
                if not waiting[j]:
                    heapq.heappush(ready, (index(steps[j]), j))
        if len(ordered) != len(steps):
            raise NetworkExecutionError("the network has a cycle outside its loops")
        return ordered

    # -- values ---------------------------------------------------------------------------

    def weight(self, layer: Mapping, attribute: str) -> torch.Tensor | None:
        key = layer["weights"].get(attribute)
        return None if key is None else torch.from_numpy(self.record.arrays[key]).to(self.device)

    def constant(self, layer: Mapping) -> torch.Tensor:
        values = torch.from_numpy(np.asarray(self.record.arrays[layer["weights"]["weights"]]))
        declared = layer["outputs"][0]["dtype"]
        if declared in STORED_AS_BYTES:
            values = values.view(TORCH_DTYPES[declared])
        return values.reshape(layer["params"]["shape"]).to(self.device)

    def evaluate(self, layer: Mapping, inputs: list) -> list[torch.Tensor]:
        try:
            results = LAYERS[layer["type"]](layer, inputs, self)
        except (NotImplementedError, ValueError, RuntimeError, IndexError, TypeError) as error:
            raise NetworkExecutionError(f"{layer_label(layer)}: {error}") from error
        return [self.declared(layer, slot, value, inputs) for slot, value in enumerate(results)]

    @staticmethod
    def declared(layer: Mapping, slot: int, value: torch.Tensor, inputs: list | None = None) -> torch.Tensor:
        """`value` converted to the output's declared type; its kind (float / integer / bool) and shape
        checked against what TensorRT declared, so a semantics error here cannot hide behind a cast. A
        dimension declared -1 is checked against the layer's output-shape rule (SHAPE_RULES) applied to
        `inputs`, where the layer type has one."""
        spec = layer["outputs"][slot]
        dtype = TORCH_DTYPES.get(spec["dtype"])
        if dtype is None:
            raise NetworkExecutionError(f"{layer_label(layer)}: output type {spec['dtype']} is not implemented")
        if layer["type"] not in CONVERTING and value_kind(value.dtype) != value_kind(dtype):
            raise NetworkExecutionError(
                f"{layer_label(layer)}: computed {value.dtype}, TensorRT declared {spec['dtype']}"
            )
        shape = list(value.shape)
        if len(shape) != len(spec["shape"]) or any(d >= 0 and d != s for d, s in zip(spec["shape"], shape)):
            raise NetworkExecutionError(
                f"{layer_label(layer)}: computed shape {shape}, TensorRT declared {spec['shape']}"
            )
        if -1 in spec["shape"] and inputs is not None and layer["type"] in SHAPE_RULES:
            try:
                ruled = SHAPE_RULES[layer["type"]](layer, inputs)
            except ValueError as error:
                raise NetworkExecutionError(f"{layer_label(layer)}: {error}") from error
            if ruled is not None and list(ruled) != shape:
                flowing = [None if t is None else list(t.shape) for t in inputs]
                raise NetworkExecutionError(
                    f"{layer_label(layer)}: computed shape {shape}, TensorRT declared {spec['shape']}, which its "
                    f"output-shape rule makes {list(ruled)} for inputs of shapes {flowing}"
                )
        return value.to(dtype)

    def run_step(self, step, values: dict, forced: Mapping[str, torch.Tensor] | None = None) -> None:
        if isinstance(step, Loop):
            self.run_loop(step, values)
            return
        inputs = [None if name is None else values[name] for name in step["inputs"]]
        for slot, (output, value) in enumerate(zip(step["outputs"], self.evaluate(step, inputs))):
            if forced and output["name"] in forced:
                value = self.declared(step, slot, forced[output["name"]].to(self.device), inputs)
            values[output["name"]] = value

    @staticmethod
    def iterate(iterator: Mapping, values: dict, trips: int | None, iteration: int) -> torch.Tensor:
        """IIteratorLayer: the slice `iteration` of its input along its axis, or with reverse=true the slice
        M-1-iteration, M the loop's COUNT trip limit (IIteratorLayer::setReverse)."""
        source, axis = values[iterator["inputs"][0]], iterator["params"]["axis"]
        if iterator["params"]["reverse"] and trips is None:
            raise NetworkExecutionError(
                f"{layer_label(iterator)}: a reverse iterator counts back from the trip count, so it needs a COUNT "
                "trip limit; its loop has a WHILE one only"
            )
        position = trips - 1 - iteration if iterator["params"]["reverse"] else iteration
        if not 0 <= position < source.shape[axis]:
            raise NetworkExecutionError(
                f"{layer_label(iterator)}: iteration {iteration} reads slice {position} of axis {axis}, whose length "
                f"is {source.shape[axis]}; the trip limit must not exceed the iterated length"
            )
        return source.select(axis, position)

    def run_loop(self, loop: Loop, values: dict) -> None:
        limit = loop.trip_limit
        state = {layer["outputs"][0]["name"]: values[layer["inputs"][0]] for layer in loop.recurrences}
        trips = None if limit["params"]["kind"] == "WHILE" else int(values[limit["inputs"][0]])
        last, iteration = {}, 0
        while trips is None or iteration < trips:
            scope = {**values, **state}
            for iterator in loop.iterators:
                scope[iterator["outputs"][0]["name"]] = self.iterate(iterator, values, trips, iteration)
            for layer in loop.condition:
                self.run_step(layer, scope)
            if trips is None and not bool(scope[limit["inputs"][0]]):
                break
            for layer in loop.rest:
                self.run_step(layer, scope)
            for output in loop.outputs:
                if output["params"]["kind"] != "LAST_VALUE":
                    raise NetworkExecutionError(
                        f"{layer_label(output)}: LoopOutput.{output['params']['kind']} is not implemented"
                    )
                last[output["outputs"][0]["name"]] = scope[output["inputs"][0]]
            state = {layer["outputs"][0]["name"]: scope[layer["inputs"][1]] for layer in loop.recurrences}
            iteration += 1
        if not last:
            raise NetworkExecutionError(f"loop '{loop.name}' ran no iteration, so its LAST_VALUE outputs are undefined")
        for output in loop.outputs:
            values[output["outputs"][0]["name"]] = self.declared(output, 0, last[output["outputs"][0]["name"]])

    # -- running ---------------------------------------------------------------------------

    @functools.cached_property
    def last_readers(self) -> dict[int, list[str]]:
        """Schedule position -> the tensors (not constants) that no later step reads: free once that step ran."""
        last = {}
        for index, step in enumerate(self.schedule):
            for name in step.inputs if isinstance(step, Loop) else step["inputs"]:
                if name is not None and name not in self.constants:
                    last[name] = index
        by_step = {}
        for name, index in last.items():
            by_step.setdefault(index, []).append(name)
        return by_step

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        for name, shape in self.input_shapes.items():
            if name not in inputs:
                raise ValueError(f"the network needs input '{name}' of shape {shape}")
            given = list(inputs[name].shape)
            if len(given) != len(shape) or any(d >= 0 and d != g for d, g in zip(shape, given)):
                raise ValueError(f"input '{name}' has shape {given}; the network declares {shape}")

    def check_forced(self, forced: Mapping[str, torch.Tensor]) -> None:
        computed = {output["name"] for step in self.schedule if isinstance(step, dict) for output in step["outputs"]}
        if unknown := set(forced) - computed:
            raise ValueError(f"forced tensors {sorted(unknown)} are not computed outside loops in this network")

    @torch.no_grad()
    def __call__(
        self,
        inputs: Mapping[str, torch.Tensor],
        forced: Mapping[str, torch.Tensor] | None = None,
        names: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The network's outputs, or the tensors `names` (intermediate ones too, outside loops).
        `forced`: tensors (outside loops) taken as given once their layer has run, in place of what it
        computed: a layer-by-layer comparison with another runtime starts each layer from that runtime's values."""
        self.check_inputs(inputs)
        if forced:
            self.check_forced(forced)
        dtypes = {entry["name"]: TORCH_DTYPES[entry["dtype"]] for entry in self.record.inputs}
        values = {**self.constants, **{n: t.to(self.device, dtypes[n]) for n, t in inputs.items()}}
        names = self.record.outputs if names is None else names
        kept = set(names)
        # float32 means float32: cuDNN would otherwise run float32 convolutions in TF32 on Ampere and later
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), full_float32_matmul():
            for index, step in enumerate(self.schedule):
                self.run_step(step, values, forced)
                # a tensor no later step reads is dropped: the peak is the live activations, not all of them
                # (a ResNet-50 at 800x1344 holds about 3 GB of activations in all)
                for name in self.last_readers.get(index, ()):
                    if name not in kept:
                        values.pop(name, None)
        if unknown := [name for name in names if name not in values]:
            raise ValueError(f"tensors {unknown} are not computed outside loops in this network")
        return {name: values[name] for name in names}
