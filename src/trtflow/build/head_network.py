"""The Faster R-CNN head built with the TensorRT network API: `trtflow.common.head`, layer for layer.

`add_head` appends the deployment-form head to a network that already holds the features network's
outputs and returns the head output contract (``num_detections``, ``boxes``, ``scores``,
``classes``). Every function below mirrors the function of the same name in `trtflow.common.head`; read
that module for the semantics (torchvision's RPN / MultiScaleRoIAlign / RoIHeads in eval mode).

The same code serves TensorRT 10.x, 11.x and TensorRT-RTX (`trt` is whichever module imported):
only layers that build on all of them are used by default — TopK, Gather, Loop (WHILE), MatrixMultiply,
ElementWise, Unary, Reduce, Select, Cast, Shuffle, Concatenation, Slice (FILL), SoftMax, Activation,
Convolution, Constant. Every dtype change is an explicit Cast, as strongly typed networks require
(the weakly typed TensorRT-10 implicit-INT8 network takes the same layers; not built here). The batch
axis may be dynamic: no layer depends on its value (reshapes copy it with 0, constants broadcast
over it, batched gathers use one element-wise dimension, padding takes its size from a Shape layer).

Options for full TensorRT only: ``roi_align="plugin"`` (our MultiLevelRoIAlign plugin, see
trtflow.backend.roi_align_plugin) and ``nms="builtin_layer"`` (INMSLayer). TensorRT-RTX has no Python
plugin path (``roi_align="plugin"`` raises `HeadBuildError` there); its network API defines an INMSLayer
that its builder cannot build, so the engine stage refuses ``nms: builtin_layer`` on it before any network
is defined (trtflow.build.engine.EngineSettings.check_backend), while the definition itself can still be
evaluated (trtflow.run.netexec).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType

import numpy as np

from trtflow.backend import load_backend
from trtflow.backend.dtypes import HEAD_DTYPES, NUMPY_DTYPES
from trtflow.backend.roi_align_plugin import add_multilevel_roi_align, unsupported_reason
from trtflow.common.head import LN2, NO_SCORE, by_level, level_anchors
from trtflow.common.model import DELTAS_PREFIX, OBJECTNESS_PREFIX
from trtflow.common.plugins import RoIAlignSpec

MAX_TOP_K = 3840  # ITopKLayer: k <= 3840
# what add_head implements; config.yaml's schema lists the same (a test holds them equal)
HEAD_OPTIONS = {"roi_align": ("builtin", "plugin"), "nms": ("static", "builtin_layer")}
NMS_LAYER_TOP_K_LIMIT = 5000  # INMSLayer: topk_box_limit <= 5000 (2000 on SM 5.3 / 6.2)


class HeadBuildError(ValueError):
    """The head cannot be built as asked on this TensorRT."""


def check_head_options(key_prefix: str = "", **options: str) -> None:
    """Refuse a head option add_head does not implement; `key_prefix` names where the value came from
    (``engine.`` for config.yaml)."""
    for key, value in options.items():
        if value not in HEAD_OPTIONS[key]:
            raise HeadBuildError(f"{key_prefix}{key} = {value!r}: use one of {', '.join(HEAD_OPTIONS[key])}")


class Graph:
    """A network plus the few conveniences the head needs: constants shaped and typed like the
    tensor they meet, negative axes, named layers."""

    def __init__(self, network, trt: ModuleType, prefix: str = "head"):
        self.network, self.trt, self.prefix = network, trt, prefix
        self.scope = ""
        self.count = 0

    # -- bookkeeping ---------------------------------------------------------------------

    def out(self, layer, index: int = 0):
        self.count += 1
        layer.name = f"{self.prefix}/{self.scope}/{layer.type.name.lower()}_{self.count}"
        return layer.get_output(index)

    def numpy_dtype(self, tensor):
        return NUMPY_DTYPES[tensor.dtype.name]

    def const(self, array: np.ndarray):
        array = np.array(array, order="C")  # a copy the network keeps alive; keeps 0-D arrays 0-D
        return self.out(self.network.add_constant(array.shape, array))

    def like(self, value, tensor):
        """`value` as a tensor: itself, or a constant of `tensor`'s dtype and rank (leading 1s)."""
        if isinstance(value, self.trt.ITensor):
            return value
        array = np.asarray(value, dtype=self.numpy_dtype(tensor))
        rank = len(tensor.shape)
        return self.const(array.reshape((1,) * (rank - array.ndim) + array.shape))

    @staticmethod
    def axis(tensor, axis: int) -> int:
        return axis % len(tensor.shape)

    # -- element-wise, unary, select, cast -------------------------------------------------

    def ew(self, op: str, a, b):
        ref = a if isinstance(a, self.trt.ITensor) else b
        a, b = self.like(a, ref), self.like(b, ref)
        return self.out(self.network.add_elementwise(a, b, getattr(self.trt.ElementWiseOperation, op)))

    def add(self, a, b):
        return self.ew("SUM", a, b)

    def sub(self, a, b):
        return self.ew("SUB", a, b)

    def mul(self, a, b):
        return self.ew("PROD", a, b)

    def div(self, a, b):
        return self.ew("DIV", a, b)

    def floor_div(self, a, b):
        return self.ew("FLOOR_DIV", a, b)

    def maximum(self, a, b):
        return self.ew("MAX", a, b)

    def minimum(self, a, b):
        return self.ew("MIN", a, b)

    def less(self, a, b):
        return self.ew("LESS", a, b)

    def greater(self, a, b):
        return self.ew("GREATER", a, b)

    def equal(self, a, b):
        return self.ew("EQUAL", a, b)

    def and_(self, a, b):
        return self.ew("AND", a, b)

    def or_(self, a, b):
        return self.ew("OR", a, b)

    def unary(self, op: str, x):
        return self.out(self.network.add_unary(x, getattr(self.trt.UnaryOperation, op)))

    def not_(self, x):
        return self.unary("NOT", x)

    def activation(self, x, kind: str):
        return self.out(self.network.add_activation(x, getattr(self.trt.ActivationType, kind)))

    def where(self, condition, then, otherwise):
        ref = then if isinstance(then, self.trt.ITensor) else otherwise
        return self.out(self.network.add_select(condition, self.like(then, ref), self.like(otherwise, ref)))

    def cast(self, x, dtype):
        return x if x.dtype == dtype else self.out(self.network.add_cast(x, dtype))

    # -- shapes -----------------------------------------------------------------------------

    def reshape(self, x, dims: Sequence[int]):
        """0 copies the input's dimension (the batch), -1 is inferred."""
        layer = self.network.add_shuffle(x)
        layer.reshape_dims = tuple(dims)
        return self.out(layer)

    def transpose(self, x, perm: Sequence[int]):
        layer = self.network.add_shuffle(x)
        layer.first_transpose = tuple(perm)
        return self.out(layer)

    def concat(self, tensors: Sequence, axis: int):
        layer = self.network.add_concatenation(list(tensors))
        layer.axis = self.axis(tensors[0], axis)
        return self.out(layer)

    def take(self, x, axis: int, indices: Sequence[int]):
        """A static slice along one axis: Gather with constant indices (needs no batch size)."""
        index = self.const(np.asarray(indices, dtype=np.int32))
        return self.out(self.network.add_gather(x, index, self.axis(x, axis)))

    def pad(self, x, axis: int, size: int):
        """Zero-pad (False for masks) `axis` up to `size`: Slice in FILL mode, its shape from the
        input's shape so that a dynamic batch passes."""
        axis = self.axis(x, axis)
        if x.shape[axis] >= size:
            return x
        shape = self.out(self.network.add_shape(x))
        parts = []
        if axis > 0:
            parts.append(self.out(self.network.add_slice(shape, (0,), (axis,), (1,))))
        parts.append(self.const(np.asarray([size], dtype=self.numpy_dtype(shape))))
        if axis + 1 < len(x.shape):
            rest = len(x.shape) - axis - 1
            parts.append(self.out(self.network.add_slice(shape, (axis + 1,), (rest,), (1,))))
        layer = self.network.add_slice(x, (0,) * len(x.shape), (1,) * len(x.shape), (1,) * len(x.shape))
        layer.mode = self.trt.SampleMode.FILL
        layer.set_input(2, self.concat(parts, 0) if len(parts) > 1 else parts[0])
        return self.out(layer)

    # -- gathers, reductions, top-k, matmul ------------------------------------------------------

    def gather_rows(self, x, index):
        """x (B, N, ...), index (B, K) → (B, K, ...)."""
        layer = self.network.add_gather(x, index, 1)
        layer.num_elementwise_dims = 1
        return self.out(layer)

    def lookup(self, table: np.ndarray, index):
        """Rows of a constant table (N, ...) at an index tensor of any shape."""
        return self.out(self.network.add_gather(self.const(table), index, 0))

    def reduce(self, x, op: str, axes: Sequence[int], keep_dims: bool = False):
        mask = sum(1 << self.axis(x, a) for a in axes)
        return self.out(self.network.add_reduce(x, getattr(self.trt.ReduceOperation, op), mask, keep_dims))

    def top_k(self, x, k: int):
        if k > MAX_TOP_K:
            raise HeadBuildError(
                f"a top-{k} exceeds TensorRT's TopK limit of {MAX_TOP_K}; lower the budget "
                "(model.rpn.pre_nms_top_n / post_nms_top_n, weights.box_candidates)"
            )
        layer = self.network.add_topk(x, self.trt.TopKOperation.MAX, k, 1 << self.axis(x, -1))
        self.out(layer)
        return layer.get_output(0), layer.get_output(1)

    def matmul(self, a, b, transpose_b: bool = False):
        op = self.trt.MatrixOperation
        return self.out(self.network.add_matrix_multiply(a, op.NONE, b, op.TRANSPOSE if transpose_b else op.NONE))


# --------------------------------------------------------------------------- small pieces (trtflow.common.head)


def flatten_rpn_level(g: Graph, objectness, deltas):
    _, a, h, w = objectness.shape
    scores = g.reshape(g.transpose(g.reshape(objectness, (0, a, 1, h, w)), (0, 3, 4, 1, 2)), (0, h * w * a))
    codes = g.reshape(g.transpose(g.reshape(deltas, (0, a, 4, h, w)), (0, 3, 4, 1, 2)), (0, h * w * a, 4))
    return scores, codes


def decode_boxes(g: Graph, codes, reference, weights: Sequence[float], clip: float):
    xy, x2y2 = g.take(reference, -1, [0, 1]), g.take(reference, -1, [2, 3])
    size = g.sub(x2y2, xy)
    center = g.add(xy, g.mul(0.5, size))
    d_center = g.div(g.take(codes, -1, [0, 1]), np.asarray(weights[:2]))
    d_size = g.minimum(g.div(g.take(codes, -1, [2, 3]), np.asarray(weights[2:])), clip)
    pred_center = g.add(g.mul(d_center, size), center)
    half = g.mul(0.5, g.mul(g.unary("EXP", d_size), size))
    return g.concat([g.sub(pred_center, half), g.add(pred_center, half)], -1)


def clip_boxes(g: Graph, boxes, input_hw: Sequence[int]):
    height, width = input_hw
    return g.minimum(g.maximum(boxes, 0.0), np.asarray([width, height, width, height]))


def sides_at_least(g: Graph, boxes, min_size: float):
    sides = g.sub(g.take(boxes, -1, [2, 3]), g.take(boxes, -1, [0, 1]))
    return g.not_(g.less(g.reduce(sides, "MIN", [-1]), min_size))


def box_areas(g: Graph, boxes):
    """(B, N, 4) → (B, N, 1)."""
    sides = g.sub(g.take(boxes, -1, [2, 3]), g.take(boxes, -1, [0, 1]))
    return g.mul(g.take(sides, -1, [0]), g.take(sides, -1, [1]))


def pairwise_iou(g: Graph, boxes):
    """(B, N, 4) → (B, N, N)."""
    n = boxes.shape[1]
    area = box_areas(g, boxes)
    rows, cols = g.reshape(boxes, (0, n, 1, 4)), g.reshape(boxes, (0, 1, n, 4))
    lo = g.maximum(g.take(rows, -1, [0, 1]), g.take(cols, -1, [0, 1]))
    hi = g.minimum(g.take(rows, -1, [2, 3]), g.take(cols, -1, [2, 3]))
    overlap = g.maximum(g.sub(hi, lo), 0.0)
    inter = g.reshape(g.mul(g.take(overlap, -1, [0]), g.take(overlap, -1, [1])), (0, n, n))
    union = g.sub(g.add(area, g.reshape(area, (0, 1, n))), inter)
    return g.div(inter, union)


def greedy_nms(g: Graph, boxes, valid, iou_thresh: float, groups=None):
    """The fixed-point greedy NMS loop of trtflow.common.head.greedy_nms: boxes (B, N, 4) sorted by score,
    valid (B, N) bool → keep (B, N) bool."""
    trt, n = g.trt, boxes.shape[1]
    suppresses = g.greater(pairwise_iou(g, boxes), iou_thresh)
    if groups is not None:
        suppresses = g.and_(suppresses, g.equal(g.reshape(groups, (0, n, 1)), g.reshape(groups, (0, 1, n))))
    earlier = np.triu(np.ones((1, n, n), dtype=np.bool_), k=1)
    suppresses = g.cast(g.and_(suppresses, g.const(earlier)), trt.float32)
    valid_f = g.cast(valid, trt.float32)

    loop = g.network.add_loop()
    keep = loop.add_recurrence(valid_f)
    running = loop.add_recurrence(g.const(np.asarray(True)))
    loop.add_trip_limit(running.get_output(0), trt.TripLimit.WHILE)
    current = keep.get_output(0)
    hits = g.reshape(g.matmul(g.reshape(current, (0, 1, n)), suppresses), (0, n))
    new_keep = g.cast(g.and_(valid, g.not_(g.greater(hits, 0.0))), trt.float32)
    changed = g.greater(g.reduce(g.unary("ABS", g.sub(new_keep, current)), "MAX", [0, 1]), 0.0)
    keep.set_input(1, new_keep)
    running.set_input(1, changed)
    final = g.out(loop.add_loop_output(current, trt.LoopOutput.LAST_VALUE))
    return g.greater(final, 0.5)


def nms_layer(g: Graph, boxes, scores, valid, iou_thresh: float, groups=None, num_groups: int = 1):
    """Full TensorRT only: the same keep mask from INMSLayer. Its selected (batch, class, box) triples
    are scattered into a (B, N) mask; invalid boxes get a score below the layer's score threshold."""
    trt, n = g.trt, boxes.shape[1]
    if n > NMS_LAYER_TOP_K_LIMIT:
        raise HeadBuildError(f"nms: builtin_layer takes at most {NMS_LAYER_TOP_K_LIMIT} boxes, got {n}")
    scores = g.where(valid, scores, NO_SCORE)
    if groups is None:
        class_scores = g.reshape(scores, (0, n, 1))
    else:
        one_hot = g.equal(g.reshape(groups, (0, n, 1)), np.arange(1, num_groups + 1, dtype=np.int32))
        class_scores = g.where(one_hot, g.reshape(scores, (0, n, 1)), NO_SCORE)
    layer = g.network.add_nms(boxes, class_scores, g.const(np.asarray(n, dtype=np.int32)))
    layer.bounding_box_format = trt.BoundingBoxFormat.CORNER_PAIRS
    layer.topk_box_limit = n
    layer.set_input(3, g.const(np.asarray(iou_thresh, dtype=np.float32)))
    layer.set_input(4, g.const(np.asarray(NO_SCORE / 2, dtype=np.float32)))
    selected = g.out(layer)
    batch_and_box = g.take(selected, 1, [0, 2])
    ones = g.add(g.mul(g.cast(g.take(selected, 1, [0]), trt.float32), 0.0), 1.0)
    zeros = g.mul(g.cast(valid, trt.float32), 0.0)
    scatter = g.network.add_scatter(zeros, batch_and_box, g.reshape(ones, (-1,)), trt.ScatterMode.ND)
    return g.and_(valid, g.greater(g.out(scatter), 0.5))


class Suppressor:
    """greedy_nms or, with nms="builtin_layer", nms_layer — one call shape for both."""

    def __init__(self, g: Graph, mode: str):
        self.g, self.mode = g, mode

    def __call__(self, boxes, scores, valid, iou_thresh, groups=None, num_groups=1):
        if self.mode == "builtin_layer":
            return nms_layer(self.g, boxes, scores, valid, iou_thresh, groups, num_groups)
        return greedy_nms(self.g, boxes, valid, iou_thresh, groups)


# --------------------------------------------------------------------------- RPN


def rpn_proposals(g: Graph, objectness, deltas, anchors, rpn: Mapping, input_hw, nms: Suppressor):
    """Returns proposals (B, P, 4), scores (B, P), valid (B, P) bool."""
    f32 = g.trt.float32
    level_boxes, level_scores = [], []
    for level, (scores_map, deltas_map, level_anchor) in enumerate(zip(objectness, deltas, anchors)):
        g.scope = f"rpn/level{level}"
        logits, codes = flatten_rpn_level(g, g.cast(scores_map, f32), g.cast(deltas_map, f32))
        logits, index = g.top_k(logits, min(rpn["pre_nms_top_n"], logits.shape[1]))
        boxes = decode_boxes(
            g,
            g.gather_rows(codes, index),
            g.lookup(level_anchor.numpy(), index),
            rpn["box_coder_weights"],
            rpn["bbox_xform_clip"],
        )
        boxes = clip_boxes(g, boxes, input_hw)
        prob = g.activation(logits, "SIGMOID")
        valid = g.and_(sides_at_least(g, boxes, rpn["min_size"]), g.not_(g.less(prob, rpn["score_thresh"])))
        keep = nms(boxes, prob, valid, rpn["nms_thresh"])
        level_boxes.append(boxes)
        level_scores.append(g.where(keep, prob, NO_SCORE))
    g.scope = "rpn/select"
    boxes, scores = g.concat(level_boxes, 1), g.concat(level_scores, 1)
    scores, index = g.top_k(scores, min(rpn["post_nms_top_n"], scores.shape[1]))
    valid = g.greater(scores, NO_SCORE)
    count = scores.shape[1]
    boxes = g.where(g.reshape(valid, (0, count, 1)), g.gather_rows(boxes, index), 0.0)
    scores = g.where(valid, scores, 0.0)
    budget = rpn["post_nms_top_n"]
    return g.pad(boxes, 1, budget), g.pad(scores, 1, budget), g.pad(valid, 1, budget)


# --------------------------------------------------------------------------- RoIAlign


def fpn_levels(g: Graph, boxes, roi_pool: Mapping):
    """(B, P, 4) → (B, P) int32."""
    count = boxes.shape[1]
    scale = g.unary("SQRT", g.reshape(box_areas(g, boxes), (0, count)))
    level = g.add(
        g.add(roi_pool["canonical_level"], g.div(g.unary("LOG", g.div(scale, roi_pool["canonical_scale"])), LN2)),
        roi_pool["eps"],
    )
    level = g.minimum(g.maximum(g.unary("FLOOR", level), float(roi_pool["k_min"])), float(roi_pool["k_max"]))
    return g.cast(g.sub(level, float(roi_pool["k_min"])), g.trt.int32)


def bilinear_taps(g: Graph, position, limit):
    """position (B, P, S), limit (B, P, 1) → indices, weights (B, P, S, 2) float32."""
    b, p, s = position.shape
    inside = g.not_(g.or_(g.less(position, -1.0), g.greater(position, limit)))
    last = g.sub(limit, 1.0)
    clamped = g.minimum(g.maximum(position, 0.0), last)
    low = g.unary("FLOOR", clamped)
    high = g.minimum(g.add(low, 1.0), last)
    frac = g.sub(clamped, low)
    gate = g.cast(inside, g.trt.float32)
    pair = lambda a, c: g.concat([g.reshape(a, (0, p, s, 1)), g.reshape(c, (0, p, s, 1))], -1)
    return pair(low, high), pair(g.mul(g.sub(1.0, frac), gate), g.mul(frac, gate))


def sample_positions(g: Graph, start, extent, bins: int, sampling_ratio: int):
    """start, extent (B, P, 1) → (B, P, bins * sampling_ratio)."""
    bin_size = g.div(extent, float(bins))
    bin_index = np.repeat(np.arange(bins, dtype=np.float32), sampling_ratio)
    sub_index = np.tile(np.arange(sampling_ratio, dtype=np.float32) + 0.5, bins)
    return g.add(g.add(start, g.mul(bin_index, bin_size)), g.div(g.mul(sub_index, bin_size), float(sampling_ratio)))


def multilevel_roi_align(g: Graph, maps, boxes, roi_pool: Mapping):
    """maps: the pooled levels (B, C, h, w) in the head dtype; boxes (B, P, 4) → (B, P, C, oh, ow)."""
    (out_h, out_w), ratio = roi_pool["output_size"], roi_pool["sampling_ratio"]
    channels, count = maps[0].shape[1], boxes.shape[1]
    sizes = np.asarray([m.shape[2:] for m in maps], dtype=np.float32)
    offsets = np.cumsum(sizes[:, 0] * sizes[:, 1]) - sizes[:, 0] * sizes[:, 1]
    flat = [g.reshape(m, (0, channels, m.shape[2] * m.shape[3])) for m in maps]
    table = g.transpose(g.concat(flat, 2) if len(flat) > 1 else flat[0], (0, 2, 1))  # (B, Σhw, C)

    level = fpn_levels(g, boxes, roi_pool)
    per_roi = lambda values: g.reshape(g.lookup(np.asarray(values, dtype=np.float32), level), (0, count, 1))
    scale, height, width, offset = (
        per_roi(roi_pool["scales"]),
        per_roi(sizes[:, 0]),
        per_roi(sizes[:, 1]),
        per_roi(offsets),
    )
    start = g.mul(g.take(boxes, -1, [0, 1]), scale)
    extent = g.maximum(g.sub(g.mul(g.take(boxes, -1, [2, 3]), scale), start), 1.0)
    ys, wy = bilinear_taps(
        g, sample_positions(g, g.take(start, -1, [1]), g.take(extent, -1, [1]), out_h, ratio), height
    )
    xs, wx = bilinear_taps(g, sample_positions(g, g.take(start, -1, [0]), g.take(extent, -1, [0]), out_w, ratio), width)
    sy, sx = out_h * ratio, out_w * ratio
    col = lambda t, n: g.reshape(t, (0, count, n, 2, 1, 1))
    row = lambda t, n: g.reshape(t, (0, count, 1, 1, n, 2))
    unit = lambda t: g.reshape(t, (0, count, 1, 1, 1, 1))
    rows = g.add(g.add(unit(offset), g.mul(col(ys, sy), unit(width))), row(xs, sx))
    weight = g.cast(g.mul(col(wy, sy), row(wx, sx)), maps[0].dtype)
    values = g.gather_rows(table, g.cast(g.reshape(rows, (0, -1)), g.trt.int32))
    values = g.reshape(values, (0, count, sy, 2, sx, 2, channels))
    samples = g.mul(values, g.reshape(weight, (0, count, sy, 2, sx, 2, 1)))
    samples = g.reshape(samples, (0, count, out_h, 2 * ratio, out_w, 2 * ratio, channels))
    pooled = g.div(g.reduce(samples, "SUM", [3, 5]), float(ratio * ratio))
    return g.transpose(pooled, (0, 1, 4, 2, 3))


def plugin_roi_align(g: Graph, maps, boxes, roi_pool: Mapping):
    """Full TensorRT only: our MultiLevelRoIAlign plugin (trtflow.backend.roi_align_plugin, registered
    beforehand by trtflow.backend.roi_align_plugin.register_plugins) on rois (B·P, 5) = batch index, x1, y1, x2, y2."""
    trt = g.trt
    backend = load_backend(trt.__name__)
    reason = unsupported_reason(backend)
    if reason:
        raise HeadBuildError(f"roi_align: plugin needs full TensorRT >= 10.8: {reason}")

    (out_h, out_w), count = roi_pool["output_size"], boxes.shape[1]
    spec = RoIAlignSpec.from_scales(
        roi_pool["scales"],
        output_size=(out_h, out_w),
        sampling_ratio=roi_pool["sampling_ratio"],
        aligned=roi_pool["aligned"],
        canonical_scale=int(roi_pool["canonical_scale"]),
        canonical_level=int(roi_pool["canonical_level"]),
    )
    # each RoI's image: a running count of ones down the batch axis, minus one
    ones = g.add(g.mul(g.take(boxes, -1, [0]), 0.0), 1.0)  # (B, P, 1)
    cumulative = g.network.add_cumulative(
        ones, g.const(np.asarray(0, dtype=np.int32)), trt.CumulativeOperation.SUM, False, False
    )
    rois = g.reshape(g.concat([g.sub(g.out(cumulative), 1.0), boxes], -1), (-1, 5))
    pooled = add_multilevel_roi_align(backend, g.network, maps, rois, spec)
    return g.reshape(pooled, (-1, count, maps[0].shape[1], out_h, out_w))


# --------------------------------------------------------------------------- box head


def linear(g: Graph, x, layer: Mapping, tensors: Mapping[str, np.ndarray]):
    weight, bias = tensors[f"{layer['name']}.weight"], tensors[f"{layer['name']}.bias"]
    rank = len(x.shape)
    product = g.matmul(x, g.const(weight.reshape((1,) * (rank - 2) + weight.shape)), transpose_b=True)
    return g.add(product, g.const(bias.reshape((1,) * (rank - 1) + bias.shape)))


def box_head(g: Graph, x, layers: Sequence[Mapping], tensors: Mapping[str, np.ndarray]):
    _, count, channels, height, width = x.shape
    x = g.reshape(x, (-1, channels, height, width))
    for layer in layers:
        if layer["kind"] == "conv2d":
            conv = g.network.add_convolution_nd(
                x,
                layer["out_channels"],
                tuple(layer["kernel_size"]),
                tensors[f"{layer['name']}.weight"],
                tensors[f"{layer['name']}.bias"],
            )
            conv.stride_nd, conv.padding_nd = tuple(layer["stride"]), tuple(layer["padding"])
            conv.dilation_nd, conv.num_groups = tuple(layer["dilation"]), layer["groups"]
            x = g.out(conv)
        elif layer["kind"] == "flatten":
            x = g.reshape(x, (-1, count, int(np.prod(x.shape[1:]))))
        else:
            x = linear(g, x, layer, tensors)
        if layer.get("relu"):
            x = g.activation(x, "RELU")
    return x


# --------------------------------------------------------------------------- detections


def box_detections(
    g: Graph, class_logits, box_codes, proposals, proposal_valid, box: Mapping, input_hw, nms: Suppressor
) -> dict:
    trt = g.trt
    _, count, num_classes = class_logits.shape
    foreground = list(range(1, num_classes))
    softmax = g.network.add_softmax(class_logits)
    softmax.axes = 1 << 2
    probs = g.take(g.out(softmax), 2, foreground)
    codes = g.reshape(box_codes, (0, count, num_classes, 4))
    boxes = decode_boxes(
        g, codes, g.reshape(proposals, (0, count, 1, 4)), box["box_coder_weights"], box["bbox_xform_clip"]
    )
    boxes = g.take(clip_boxes(g, boxes, input_hw), 2, foreground)
    valid = g.and_(
        g.and_(g.reshape(proposal_valid, (0, count, 1)), g.greater(probs, box["score_thresh"])),
        sides_at_least(g, boxes, box["min_size"]),
    )
    scores = g.reshape(g.where(valid, probs, NO_SCORE), (0, -1))
    boxes = g.reshape(boxes, (0, -1, 4))

    g.scope = "box/candidates"
    scores, index = g.top_k(scores, min(box["candidates"], scores.shape[1]))
    boxes = g.gather_rows(boxes, index)
    per_class = num_classes - 1
    labels = g.add(g.sub(index, g.mul(g.floor_div(index, per_class), per_class)), 1)
    scores.name, boxes.name = "head.candidate_scores", "head.candidate_boxes"
    g.scope = "box/nms"
    keep = nms(boxes, scores, g.greater(scores, NO_SCORE), box["nms_thresh"], groups=labels, num_groups=per_class)

    g.scope = "box/select"
    scores, index = g.top_k(g.where(keep, scores, NO_SCORE), min(box["detections_per_img"], scores.shape[1]))
    found = g.greater(scores, NO_SCORE)
    k, kept = box["detections_per_img"], scores.shape[1]
    return {
        "num_detections": g.reduce(g.cast(found, trt.int32), "SUM", [1]),
        "boxes": g.pad(g.where(g.reshape(found, (0, kept, 1)), g.gather_rows(boxes, index), 0.0), 1, k),
        "scores": g.pad(g.where(found, scores, 0.0), 1, k),
        "classes": g.pad(g.where(found, g.gather_rows(labels, index), 0), 1, k),
    }


# --------------------------------------------------------------------------- the head


def add_head(
    network,
    trt: ModuleType,
    manifest: Mapping,
    tensors: Mapping,
    features,
    objectness,
    deltas,
    *,
    dtype="float32",
    roi_align: str = "builtin",
    nms: str = "static",
) -> dict:
    """Append the head to `network` and return its outputs by name (not marked as network outputs).

    features / objectness / deltas: the features network's ITensors, as mappings keyed by their
    output names (``p2``…, ``objectness_p2``…, ``deltas_p2``…) or sequences in the manifest's level
    order. dtype ("float32"/"float16" or a trt.DataType): the feature-sampling and box-head precision;
    box geometry stays float32. tensors: load_head's tensors (torch or numpy).
    Intermediates carry names for debug outputs: head.proposals, head.proposal_scores,
    head.proposal_valid, head.roi_features, head.class_logits, head.box_deltas,
    head.candidate_scores, head.candidate_boxes.
    """
    check_head_options(roi_align=roi_align, nms=nms)
    if isinstance(dtype, str):
        if dtype not in HEAD_DTYPES:
            raise HeadBuildError(f"dtype={dtype!r}: use float32 or float16")
        dtype = getattr(trt.DataType, HEAD_DTYPES[dtype])
    g = Graph(network, trt)
    suppress = Suppressor(g, nms)
    input_hw = (manifest["input"]["height"], manifest["input"]["width"])
    numpy_dtype = NUMPY_DTYPES[dtype.name]
    weights = {
        name: np.ascontiguousarray(np.asarray(t, dtype=np.float32).astype(numpy_dtype)) for name, t in tensors.items()
    }

    boxes, scores, valid = rpn_proposals(
        g,
        by_level(manifest, objectness, OBJECTNESS_PREFIX),
        by_level(manifest, deltas, DELTAS_PREFIX),
        level_anchors(manifest),
        manifest["rpn"],
        input_hw,
        suppress,
    )
    boxes.name, scores.name, valid.name = "head.proposals", "head.proposal_scores", "head.proposal_valid"

    g.scope = "roi_align"
    maps = by_level(manifest, features)
    names = [level["name"] for level in manifest["features"]]
    pooled_maps = [g.cast(maps[names.index(n)], dtype) for n in manifest["roi_pool"]["features"]]
    align = plugin_roi_align if roi_align == "plugin" else multilevel_roi_align
    pooled = align(g, pooled_maps, boxes, manifest["roi_pool"])
    pooled.name = "head.roi_features"

    g.scope = "box_head"
    x = box_head(g, pooled, manifest["box_head"]["layers"], weights)
    predictor = manifest["box_predictor"]
    class_logits = g.cast(linear(g, x, predictor["cls_score"], weights), trt.float32)
    box_codes = g.cast(linear(g, x, predictor["bbox_pred"], weights), trt.float32)
    class_logits.name, box_codes.name = "head.class_logits", "head.box_deltas"

    g.scope = "box/decode"
    outputs = box_detections(g, class_logits, box_codes, boxes, valid, manifest["box"], input_hw, suppress)
    for name, tensor in outputs.items():
        tensor.name = name
    return outputs
