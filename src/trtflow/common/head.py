"""The deployment-form Faster R-CNN head in PyTorch: exactly what the TensorRT engine builds.

Fed by the features network's outputs (FPN maps, RPN objectness and box deltas per level), it
reproduces torchvision's ``RegionProposalNetwork`` → ``MultiScaleRoIAlign`` → ``RoIHeads`` in eval
mode with STATIC shapes: fixed budgets and validity masks instead of compaction, an exact greedy NMS
from a matrix fixed-point loop, RoIAlign from bilinear gathers. Its twin ``trtflow.build.head_network`` builds the
same pieces, under the same names, with the TensorRT network API; each piece here names the TensorRT layers it
maps to.

Dtypes: box geometry (anchors, decode, clip, IoU, levels, sampling positions, scores) is float32
always — fp16 cannot hold box areas above 65504 px²; feature sampling and the box head run in the
head dtype (float32 or float16).

Batch: every tensor carries the batch first; nothing depends on its value (the network writes static
slices as gathers on constant indices, which need no batch size, so its batch axis may be dynamic).

Outputs (the head contract, `HEAD_OUTPUTS`): ``num_detections`` (B,) int32, ``boxes`` (B, K, 4) float32
x1,y1,x2,y2 in input pixels, ``scores`` (B, K) float32, ``classes`` (B, K) int32 (1..C-1),
K = detections_per_img; entries at and beyond ``num_detections`` are zero.

Where the static form can differ from torchvision (besides float rounding and score ties): the box
stage keeps the ``box.candidates`` best (score, class) candidates before per-class NMS, so it is
exact whenever those hold ``detections_per_img`` survivors or all candidates above the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator

from trtflow.common.model import DELTAS_PREFIX, OBJECTNESS_PREFIX
from trtflow.formats.head_weights import load_head, required_tensors
from trtflow.precisions import PRECISIONS

NO_SCORE = -1.0  # score of a slot holding no candidate; every real score is a probability >= 0
LN2 = math.log(2.0)

# The head's contract with whoever runs a plan: its outputs, and its dtype in the plan of each precision
# (trtflow.precisions).
HEAD_OUTPUTS = ("num_detections", "boxes", "scores", "classes")


def head_dtype(precision: str) -> str:
    """The head's dtype in the plan of `precision` (its row's head_dtype: float32 for fp32, float16 for the others)."""
    return PRECISIONS[precision].head_dtype


class Proposals(NamedTuple):
    boxes: Tensor  # (B, P, 4) float32
    scores: Tensor  # (B, P) float32 objectness probability
    valid: Tensor  # (B, P) bool; invalid slots hold zero boxes and scores


# --------------------------------------------------------------------------- anchors


def level_anchors(manifest: Mapping) -> list[Tensor]:
    """Anchors per feature level, (h*w*A, 4) float32 in torchvision's order (position-major, then
    size x ratio). Constants of the static input size. [TensorRT: Constant]"""
    rpn = manifest["rpn"]
    generator = AnchorGenerator(
        tuple(tuple(s) for s in rpn["anchor_sizes"]), tuple(tuple(r) for r in rpn["aspect_ratios"])
    )
    grid_sizes = [level["size"] for level in manifest["features"]]
    strides = [[torch.tensor(s) for s in level["anchor_stride"]] for level in manifest["features"]]
    return generator.grid_anchors(grid_sizes, strides)


def flatten_rpn_level(objectness: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """(B, A, h, w), (B, 4A, h, w) → (B, h*w*A), (B, h*w*A, 4), as torchvision's permute_and_flatten.
    [Shuffle: reshape + transpose]"""
    b, a, h, w = objectness.shape
    scores = objectness.reshape(b, a, 1, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a)
    codes = deltas.reshape(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, 4)
    return scores, codes


# --------------------------------------------------------------------------- small pieces


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, N, ...), index (B, K) → (B, K, ...). [Gather DEFAULT, axis 1, 1 element-wise dim]"""
    batch = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[batch, index]


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Largest k along the last axis, sorted descending. [TopK MAX]"""
    return scores.topk(k, dim=-1, largest=True, sorted=True)


def decode_boxes(codes: Tensor, reference: Tensor, weights: Sequence[float], clip: float) -> Tensor:
    """torchvision BoxCoder.decode_single on (..., 4) pairs; same arithmetic, x and y together.
    [Gather on constant indices (a static slice), ElementWise SUB/SUM/PROD/DIV/MIN, Unary EXP,
    Concatenation]"""
    xy, x2y2 = reference[..., :2], reference[..., 2:]
    size = x2y2 - xy
    center = xy + 0.5 * size
    d_center = codes[..., :2] / codes.new_tensor(weights[:2])
    d_size = torch.clamp(codes[..., 2:] / codes.new_tensor(weights[2:]), max=clip)
    pred_center = d_center * size + center
    half = 0.5 * (torch.exp(d_size) * size)
    return torch.cat([pred_center - half, pred_center + half], dim=-1)


def clip_boxes(boxes: Tensor, input_hw: Sequence[int]) -> Tensor:
    """clip_boxes_to_image: x into [0, W], y into [0, H]. [ElementWise MAX, MIN with constants]"""
    height, width = input_hw
    upper = boxes.new_tensor([width, height, width, height])
    return torch.minimum(torch.clamp(boxes, min=0.0), upper)


def sides_at_least(boxes: Tensor, min_size: float) -> Tensor:
    """remove_small_boxes' test: width >= min_size and height >= min_size.
    [Gather on constant indices, ElementWise SUB, Reduce MIN, ElementWise LESS + Unary NOT]"""
    sides = boxes[..., 2:] - boxes[..., :2]
    return ~(sides.amin(dim=-1) < min_size)


def pairwise_iou(boxes: Tensor) -> Tensor:
    """(..., N, 4) → (..., N, N) IoU, torchvision's NMS kernel formula inter / (a_i + a_j - inter).
    [Shuffle (unsqueeze), ElementWise MAX/MIN/SUB/PROD/SUM/DIV]"""
    sides = boxes[..., 2:] - boxes[..., :2]
    area = sides[..., 0] * sides[..., 1]
    lo = torch.maximum(boxes[..., :, None, :2], boxes[..., None, :, :2])
    hi = torch.minimum(boxes[..., :, None, 2:], boxes[..., None, :, 2:])
    overlap = torch.clamp(hi - lo, min=0.0)
    inter = overlap[..., 0] * overlap[..., 1]
    return inter / (area[..., :, None] + area[..., None, :] - inter)


def greedy_nms(boxes: Tensor, valid: Tensor, iou_thresh: float, groups: Tensor | None = None) -> Tensor:
    """Exact greedy NMS on boxes sorted by descending score: the keep mask (..., N).

    A box is kept iff it is valid and no earlier kept box of its group overlaps it by IoU > thresh.
    Iterating keep ← valid ∧ ¬(keep · S > 0), S[j, i] = "j earlier than i, same group, IoU > thresh",
    from keep = valid fixes one more leading box per pass and its fixed point is unique, so the loop
    ends on exactly the greedy result (in at most N + 1 passes, usually a few).
    [IoU pieces; ElementWise GREATER/EQUAL/AND; Constant (strict upper triangle); Cast;
     Loop (TripLimit WHILE on a "changed" recurrence) around MatrixMultiply, GREATER, NOT, AND,
     XOR + Reduce MAX]"""
    n = boxes.shape[-2]
    suppresses = pairwise_iou(boxes) > iou_thresh
    if groups is not None:
        suppresses = suppresses & (groups[..., :, None] == groups[..., None, :])
    earlier = torch.ones(n, n, dtype=torch.bool, device=boxes.device).triu(diagonal=1)
    suppresses = (suppresses & earlier).to(torch.float32)
    keep = valid
    while True:
        hit = (keep.to(torch.float32).unsqueeze(-2) @ suppresses).squeeze(-2) > 0
        new_keep = valid & ~hit
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep


def pad_last(x: Tensor, size: int, axis: int) -> Tensor:
    """Zero-pad `axis` to `size` (False for masks). [Slice in FILL mode, its size from Shape]"""
    missing = size - x.shape[axis]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[axis] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=axis)


# --------------------------------------------------------------------------- RPN


def rpn_proposals(
    objectness: Sequence[Tensor],
    deltas: Sequence[Tensor],
    anchors: Sequence[Tensor],
    rpn: Mapping,
    input_hw: Sequence[int],
) -> Proposals:
    """RegionProposalNetwork.filter_proposals with a fixed budget.

    Per level: top pre_nms_top_n logits [TopK], gather their deltas and anchors [Gather], decode
    (1,1,1,1) [decode_boxes], clip [clip_boxes], sigmoid [Activation SIGMOID], valid = side >= min_size
    and prob >= score_thresh, NMS at nms_thresh within the level [greedy_nms]. Then the best
    post_nms_top_n survivors over all levels [Concatenation, Select, TopK, Gather]; slots without
    a survivor are zeroed [Select], and zero-padded when fewer candidates exist than the budget.
    """
    level_boxes, level_scores = [], []
    for scores_map, deltas_map, level_anchor in zip(objectness, deltas, anchors):
        logits, codes = flatten_rpn_level(scores_map.float(), deltas_map.float())
        logits, index = top_k(logits, min(rpn["pre_nms_top_n"], logits.shape[1]))
        boxes = decode_boxes(
            gather_rows(codes, index),
            level_anchor.to(codes.device)[index],
            rpn["box_coder_weights"],
            rpn["bbox_xform_clip"],
        )
        boxes = clip_boxes(boxes, input_hw)
        prob = torch.sigmoid(logits)
        valid = sides_at_least(boxes, rpn["min_size"]) & (prob >= rpn["score_thresh"])
        keep = greedy_nms(boxes, valid, rpn["nms_thresh"])
        level_boxes.append(boxes)
        level_scores.append(torch.where(keep, prob, NO_SCORE))
    boxes, scores = torch.cat(level_boxes, dim=1), torch.cat(level_scores, dim=1)
    scores, index = top_k(scores, min(rpn["post_nms_top_n"], scores.shape[1]))
    valid = scores > NO_SCORE
    boxes = torch.where(valid[..., None], gather_rows(boxes, index), 0.0)
    scores = torch.where(valid, scores, 0.0)
    budget = rpn["post_nms_top_n"]
    return Proposals(pad_last(boxes, budget, 1), pad_last(scores, budget, 1), pad_last(valid, budget, 1))


# --------------------------------------------------------------------------- RoIAlign


def fpn_levels(boxes: Tensor, roi_pool: Mapping) -> Tensor:
    """torchvision LevelMapper: floor(k0 + log2(sqrt(area) / s0) + eps) clamped to [k_min, k_max],
    minus k_min; log2 as ln / ln 2 (TensorRT has no LOG2). (B, P) int64 index into the pooled maps.
    [ElementWise SUB/PROD/DIV/SUM/MAX/MIN, Unary SQRT/LOG/FLOOR, Cast]"""
    sides = boxes[..., 2:] - boxes[..., :2]
    scale = torch.sqrt(sides[..., 0] * sides[..., 1])
    level = torch.floor(
        roi_pool["canonical_level"] + torch.log(scale / roi_pool["canonical_scale"]) / LN2 + roi_pool["eps"]
    )
    level = torch.clamp(level, min=roi_pool["k_min"], max=roi_pool["k_max"]) - roi_pool["k_min"]
    return level.long()


def bilinear_taps(position: Tensor, limit: Tensor) -> tuple[Tensor, Tensor]:
    """RoIAlign's 1-D bilinear rule on sample positions (..., S) along an axis of length `limit` (...):
    a position < -1 or > limit contributes 0; else it is clamped into [0, limit - 1] and split between
    floor and floor + 1 (also clamped). Returns indices (..., S, 2) as float and weights (..., S, 2).
    [ElementWise LESS/GREATER/OR/MAX/MIN/SUB/SUM/PROD, Unary NOT/FLOOR, Cast, Concatenation]"""
    limit = limit[..., None]
    inside = ~((position < -1.0) | (position > limit))
    clamped = torch.minimum(torch.clamp(position, min=0.0), limit - 1.0)
    low = torch.floor(clamped)
    high = torch.minimum(low + 1.0, limit - 1.0)
    frac = clamped - low
    gate = inside.to(position.dtype)
    return torch.stack([low, high], dim=-1), torch.stack([(1.0 - frac) * gate, frac * gate], dim=-1)


def sample_positions(start: Tensor, extent: Tensor, bins: int, sampling_ratio: int) -> Tensor:
    """RoIAlign sample coordinates along one axis, (..., bins * sampling_ratio), torchvision's order of
    operations: start + bin * bin_size + ((i + 0.5) * bin_size) / ratio. [ElementWise with Constants]"""
    bin_size = extent / bins
    bin_index = torch.arange(bins, device=start.device, dtype=start.dtype).repeat_interleave(sampling_ratio)
    sub_index = (torch.arange(sampling_ratio, device=start.device, dtype=start.dtype) + 0.5).repeat(bins)
    return (start[..., None] + bin_index * bin_size[..., None]) + (sub_index * bin_size[..., None]) / sampling_ratio


def multilevel_roi_align(features: Sequence[Tensor], boxes: Tensor, roi_pool: Mapping) -> Tensor:
    """MultiScaleRoIAlign (aligned=False, fixed sampling_ratio) over (B, P, 4) boxes → (B, P, C, oh, ow).

    The pooled maps are laid end to end as one (B, Σ h·w, C) table; each RoI picks its level's
    scale/height/width/offset [Gather on Constants by fpn_levels], computes its sample grid, and one
    row gather reads all 4 bilinear corners of all samples [Gather DEFAULT, 1 element-wise dim];
    weights × values summed over corners and samples, / sampling_ratio² [ElementWise, Reduce SUM].
    Computed in the features' dtype; positions and weights in float32, weights cast.
    """
    (out_h, out_w), ratio = roi_pool["output_size"], roi_pool["sampling_ratio"]
    dtype = features[0].dtype
    batch, channels = features[0].shape[:2]
    sizes = torch.tensor([f.shape[-2:] for f in features], dtype=torch.float32, device=boxes.device)
    offsets = torch.cumsum(sizes[:, 0] * sizes[:, 1], 0) - sizes[:, 0] * sizes[:, 1]
    table = torch.cat([f.flatten(2) for f in features], dim=2).transpose(1, 2)  # (B, Σhw, C)
    scales = torch.tensor(roi_pool["scales"], dtype=torch.float32, device=boxes.device)

    level = fpn_levels(boxes, roi_pool)
    scale, height, width, offset = scales[level], sizes[level, 0], sizes[level, 1], offsets[level]
    start = boxes[..., :2] * scale[..., None]
    extent = torch.clamp(boxes[..., 2:] * scale[..., None] - start, min=1.0)
    ys, wy = bilinear_taps(sample_positions(start[..., 1], extent[..., 1], out_h, ratio), height)
    xs, wx = bilinear_taps(sample_positions(start[..., 0], extent[..., 0], out_w, ratio), width)
    rows = (
        offset[..., None, None, None, None]
        + ys[..., :, :, None, None] * width[..., None, None, None, None]
        + xs[..., None, None, :, :]
    )  # (B, P, Sy, 2, Sx, 2)
    weight = (wy[..., :, :, None, None] * wx[..., None, None, :, :]).to(dtype)
    values = gather_rows(table, rows.long().flatten(1)).reshape(*rows.shape, channels)
    samples = (values * weight[..., None]).reshape(batch, -1, out_h, ratio * 2, out_w, ratio * 2, channels)
    pooled = samples.sum(dim=(3, 5)) / (ratio * ratio)
    return pooled.permute(0, 1, 4, 2, 3)


# --------------------------------------------------------------------------- box head


def box_head(x: Tensor, layers: Sequence[Mapping], tensors: Mapping[str, Tensor]) -> Tensor:
    """(B, P, C, h, w) → (B, P, F): convs on (B·P, C, h, w) [Shuffle, Convolution, Activation RELU],
    flatten in torchvision's (C, h, w) order [Shuffle], FCs [MatrixMultiply + ElementWise SUM, RELU]."""
    batch, proposals = x.shape[:2]
    x = x.reshape(batch * proposals, *x.shape[2:])
    for layer in layers:
        if layer["kind"] == "conv2d":
            x = F.conv2d(
                x,
                tensors[f"{layer['name']}.weight"],
                tensors[f"{layer['name']}.bias"],
                layer["stride"],
                layer["padding"],
                layer["dilation"],
                layer["groups"],
            )
        elif layer["kind"] == "flatten":
            x = x.reshape(batch, proposals, -1)
        else:
            x = linear(x, layer, tensors)
        if layer.get("relu"):
            x = torch.relu(x)
    return x


def linear(x: Tensor, layer: Mapping, tensors: Mapping[str, Tensor]) -> Tensor:
    """x @ Wᵀ + b. [MatrixMultiply (weight TRANSPOSE) + ElementWise SUM]"""
    return x @ tensors[f"{layer['name']}.weight"].T + tensors[f"{layer['name']}.bias"]


# --------------------------------------------------------------------------- detections


def box_detections(
    class_logits: Tensor, box_codes: Tensor, proposals: Proposals, box: Mapping, input_hw: Sequence[int]
) -> dict[str, Tensor]:
    """RoIHeads.postprocess_detections with fixed budgets.

    softmax [SoftMax]; class-specific decode (10,10,5,5) and clip [decode_boxes, clip_boxes];
    drop background [Gather on constant indices]; valid = proposal valid, score > score_thresh, sides >= min_size;
    the best `candidates` (proposal, class) pairs [Select, TopK, Gather]; per-class NMS
    [greedy_nms with class groups; class = index mod (C-1) + 1: ElementWise FLOOR_DIV/PROD/SUB];
    the best detections_per_img survivors [Select, TopK, Gather], zeroed past num_detections
    [Cast, Reduce SUM, Select].
    """
    batch, num_props, num_classes = class_logits.shape
    probs = torch.softmax(class_logits.float(), dim=-1)[..., 1:]
    codes = box_codes.float().reshape(batch, num_props, num_classes, 4)
    boxes = decode_boxes(codes, proposals.boxes[:, :, None, :], box["box_coder_weights"], box["bbox_xform_clip"])
    boxes = clip_boxes(boxes, input_hw)[:, :, 1:]
    valid = proposals.valid[..., None] & (probs > box["score_thresh"]) & sides_at_least(boxes, box["min_size"])
    scores = torch.where(valid, probs, NO_SCORE).reshape(batch, -1)
    boxes = boxes.reshape(batch, -1, 4)

    scores, index = top_k(scores, min(box["candidates"], scores.shape[1]))
    boxes = gather_rows(boxes, index)
    labels = index % (num_classes - 1) + 1
    keep = greedy_nms(boxes, scores > NO_SCORE, box["nms_thresh"], groups=labels)

    scores, index = top_k(torch.where(keep, scores, NO_SCORE), min(box["detections_per_img"], scores.shape[1]))
    found = scores > NO_SCORE
    k = box["detections_per_img"]
    return {
        "num_detections": found.sum(dim=1, dtype=torch.int32),
        "boxes": pad_last(torch.where(found[..., None], gather_rows(boxes, index), 0.0), k, 1),
        "scores": pad_last(torch.where(found, scores, 0.0), k, 1),
        "classes": pad_last(torch.where(found, gather_rows(labels, index), 0).to(torch.int32), k, 1),
    }


# --------------------------------------------------------------------------- the head


def by_level(manifest: Mapping, tensors: Mapping[str, Tensor] | Sequence[Tensor], prefix: str = "") -> list[Tensor]:
    """Per-level inputs in manifest order, from a sequence in that order or a mapping by
    (prefixed) level name, e.g. {"objectness_p2": ...}."""
    names = [f"{prefix}{level['name']}" for level in manifest["features"]]
    if isinstance(tensors, Mapping):
        missing = [n for n in names if n not in tensors]
        if missing:
            raise KeyError(f"head inputs {missing} are missing; got {sorted(tensors)}")
        return [tensors[n] for n in names]
    if len(tensors) != len(names):
        raise ValueError(f"expected {len(names)} tensors ({names}), got {len(tensors)}")
    return list(tensors)


class StaticHead(nn.Module):
    """The deployment-form head from an export's (manifest, tensors), see the module docstring.

    ``forward(features, objectness, deltas)`` takes torch tensors (wrap ONNX Runtime outputs with
    ``torch.from_numpy``), each as a sequence in the manifest's feature order, or as a mapping keyed
    like the features network's outputs (``p2``…, ``objectness_p2``…, ``deltas_p2``…) — one dict of
    all outputs can serve as all three — and returns the head output contract.
    """

    @classmethod
    def from_export(cls, directory, dtype: torch.dtype = torch.float32) -> StaticHead:
        """The head of a `weights` rule folder (results/weights), its tensors checked by load_head."""
        return cls(*load_head(directory), dtype=dtype)

    def __init__(self, manifest: Mapping, tensors: Mapping[str, Tensor], dtype: torch.dtype = torch.float32):
        super().__init__()
        self.manifest = manifest
        self.dtype = dtype
        self.input_hw = (manifest["input"]["height"], manifest["input"]["width"])
        for i, anchors in enumerate(level_anchors(manifest)):
            self.register_buffer(f"anchors_{i}", anchors, persistent=False)
        self.weight_names = sorted(required_tensors(manifest))
        for i, name in enumerate(self.weight_names):
            self.register_buffer(f"weight_{i}", tensors[name].to(dtype), persistent=False)
        names = [level["name"] for level in manifest["features"]]
        self.pooled_levels = [names.index(n) for n in manifest["roi_pool"]["features"]]

    @property
    def anchors(self) -> list[Tensor]:
        return [getattr(self, f"anchors_{i}") for i in range(len(self.manifest["features"]))]

    @property
    def weights(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"weight_{i}") for i, name in enumerate(self.weight_names)}

    def propose(self, objectness, deltas) -> Proposals:
        return rpn_proposals(
            by_level(self.manifest, objectness, OBJECTNESS_PREFIX),
            by_level(self.manifest, deltas, DELTAS_PREFIX),
            self.anchors,
            self.manifest["rpn"],
            self.input_hw,
        )

    def pool(self, features, boxes: Tensor) -> Tensor:
        maps = by_level(self.manifest, features)
        return multilevel_roi_align(
            [maps[i].to(self.dtype) for i in self.pooled_levels], boxes, self.manifest["roi_pool"]
        )

    def classify(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        weights = self.weights
        x = box_head(pooled, self.manifest["box_head"]["layers"], weights)
        predictor = self.manifest["box_predictor"]
        return (linear(x, predictor["cls_score"], weights).float(), linear(x, predictor["bbox_pred"], weights).float())

    def forward(self, features, objectness, deltas) -> dict[str, Tensor]:
        proposals = self.propose(objectness, deltas)
        class_logits, box_codes = self.classify(self.pool(features, proposals.boxes))
        return box_detections(class_logits, box_codes, proposals, self.manifest["box"], self.input_hw)
