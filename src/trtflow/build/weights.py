"""Head weights: the tensors and metadata the API-built Faster R-CNN head needs.

`export_head` takes a torchvision `FasterRCNN` and writes, into one folder,

- ``head.safetensors``: the box head (``TwoMLPHead`` FCs, or ``FastRCNNConvFCHead`` convs with their
  batch norm folded into weight and bias, then FCs) and the box predictor, float32;
- ``head.wts`` (optional): the same tensors in the tensorrtx text format for C++ builders;
- ``manifest.json``: everything else the head is made of — feature levels, anchors, RPN and box
  thresholds and budgets, box coders, the RoI pooler, the box-head layer structure — and per tensor
  its name, shape, dtype and sha256, plus the source checkpoint's sha256.

`trtflow.formats.head_weights.load_head` reads it back (and refuses a folder whose tensors are not exactly those the
manifest's layers need, or whose bytes differ from the recorded sha256s).

Feature levels are named as the features network names its outputs (``trtflow.common.model.level_names``:
``p{log2(stride)}``, ``pool`` for torchvision's LastLevelMaxPool map, suffixed with the backbone key
where two maps share a stride, as in the MobileNetV3 FPNs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from trtflow.artifacts import atomic_write, software_versions, write_json
from trtflow.common.model import backbone_maps, level_names
from trtflow.formats.head_weights import (
    FORMATS,
    MANIFEST,
    MANIFEST_VERSION,
    SAFETENSORS,
    WTS,
    HeadWeightsError,
    read_wts,
    required_tensors,
    tensor_sha256,
    write_wts,
)

# torchvision constants that are not attributes of the modules.
BOX_MIN_SIZE = 1e-2  # RoIHeads.postprocess_detections: remove_small_boxes(min_size=1e-2)
LEVEL_MAPPER_EPS = 1e-6  # poolers.LevelMapper default


def feature_levels(model: nn.Module, input_hw: tuple[int, int]) -> list[dict]:
    """Name, torchvision key, channels, size and anchor stride of each backbone output, from a dry run
    at the input size. Names come from the features network's own rule (`trtflow.common.model.level_names`).

    ``anchor_stride`` is torchvision's ``AnchorGenerator`` stride (integer division of the input
    size by the map size), which is what places the anchors.
    """
    height, width = input_hw
    maps = backbone_maps(model, input_hw)
    return [
        {
            "name": name,
            "key": key,
            "channels": fmap.shape[1],
            "size": list(fmap.shape[-2:]),
            "anchor_stride": [height // fmap.shape[-2], width // fmap.shape[-1]],
        }
        for name, (key, fmap) in zip(level_names(model, input_hw, maps), maps.items())
    ]


# --------------------------------------------------------------------------- RPN and RoI pooler


def rpn_metadata(rpn: nn.Module, levels: list[dict]) -> dict:
    """Anchors, box coder and the test-time proposal budgets/thresholds of a RegionProposalNetwork."""
    generator = rpn.anchor_generator
    if not isinstance(generator, AnchorGenerator):
        raise HeadWeightsError(
            f"rpn.anchor_generator is {type(generator).__name__}; the head builds "
            "torchvision AnchorGenerator anchors only"
        )
    if len(generator.sizes) != len(levels):
        raise HeadWeightsError(
            f"the anchor generator has {len(generator.sizes)} levels of sizes but the "
            f"backbone gives {len(levels)} feature maps; make them agree"
        )
    coder = rpn.box_coder
    return {
        "anchor_sizes": [list(map(float, s)) for s in generator.sizes],
        "aspect_ratios": [list(map(float, r)) for r in generator.aspect_ratios],
        "box_coder_weights": list(map(float, coder.weights)),
        "bbox_xform_clip": float(coder.bbox_xform_clip),
        "pre_nms_top_n": int(rpn._pre_nms_top_n["testing"]),
        "post_nms_top_n": int(rpn._post_nms_top_n["testing"]),
        "nms_thresh": float(rpn.nms_thresh),
        "score_thresh": float(rpn.score_thresh),
        "min_size": float(rpn.min_size),
    }


def pooler_metadata(pooler: nn.Module, levels: list[dict], input_hw: tuple[int, int]) -> dict:
    """MultiScaleRoIAlign as torchvision sets it up for images of the input size.

    Scales follow ``poolers._infer_scale`` (from the map height), the level range ``LevelMapper``'s
    k_min/k_max; only the first ``k_max - k_min + 1`` pooled maps can ever be chosen, so only those
    are listed.
    """
    if not isinstance(pooler, MultiScaleRoIAlign):
        raise HeadWeightsError(
            f"roi_heads.box_roi_pool is {type(pooler).__name__}; the head builds torchvision MultiScaleRoIAlign only"
        )
    if pooler.sampling_ratio <= 0:
        raise HeadWeightsError(
            f"box_roi_pool.sampling_ratio is {pooler.sampling_ratio}: an adaptive "
            "sampling grid has no static shape; set a positive sampling_ratio (2)"
        )
    pooled = [i for i, level in enumerate(levels) if level["key"] in pooler.featmap_names]
    if not pooled:
        raise HeadWeightsError(
            f"box_roi_pool.featmap_names {pooler.featmap_names} match none of the "
            f"backbone outputs {[lvl['key'] for lvl in levels]}"
        )
    height = input_hw[0]
    scales = [2.0 ** round(math.log2(levels[i]["size"][0] / height)) for i in pooled]
    k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
    reachable = pooled[: k_max - k_min + 1]
    return {
        "features": [levels[i]["name"] for i in reachable],
        "scales": scales[: len(reachable)],
        "k_min": k_min,
        "k_max": k_max,
        "canonical_scale": float(pooler.canonical_scale),
        "canonical_level": float(pooler.canonical_level),
        "eps": LEVEL_MAPPER_EPS,
        "output_size": list(pooler.output_size),
        "sampling_ratio": int(pooler.sampling_ratio),
        "aligned": False,
    }


# --------------------------------------------------------------------------- box head layers


def _linear(name: str, layer: nn.Linear, relu: bool) -> tuple[dict, dict]:
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
    spec = {
        "kind": "linear",
        "name": name,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "relu": relu,
    }
    return spec, {f"{name}.weight": layer.weight, f"{name}.bias": bias}


def _conv(name: str, conv: nn.Conv2d, norm: nn.Module | None) -> tuple[dict, dict]:
    """A conv with its eval-mode batch norm folded in (computed in float64, stored float32)."""
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels).double()
    if norm is not None:
        scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
        weight = weight * scale[:, None, None, None]
        bias = (bias - norm.running_mean.double()) * scale + norm.bias.double()
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise HeadWeightsError(
            f"{name}: only numeric zero padding is supported, got {conv.padding!r}/{conv.padding_mode!r}"
        )
    spec = {
        "kind": "conv2d",
        "name": name,
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": list(conv.padding),
        "dilation": list(conv.dilation),
        "groups": conv.groups,
        "folded_batch_norm": norm is not None,
        "relu": False,
    }
    return spec, {f"{name}.weight": weight.float(), f"{name}.bias": bias.float()}


def _sequential_layers(prefix: str, head: nn.Sequential) -> tuple[list[dict], dict]:
    """Conv(+BN)(+ReLU) blocks, Flatten, Linear(+ReLU), as in FastRCNNConvFCHead."""
    leaves = [(f"{prefix}.{n}", m) for n, m in head.named_modules() if not list(m.children())]
    layers, tensors = [], {}
    flat = False
    i = 0
    while i < len(leaves):
        name, module = leaves[i]
        if isinstance(module, nn.Conv2d) and not flat:
            norm = None
            if i + 1 < len(leaves) and isinstance(leaves[i + 1][1], (nn.BatchNorm2d, FrozenBatchNorm2d)):
                norm = leaves[i + 1][1]
                i += 1
            spec, params = _conv(name, module, norm)
        elif isinstance(module, nn.Linear) and flat:
            spec, params = _linear(name, module, relu=False)
        elif isinstance(module, nn.Flatten) and not flat and (module.start_dim, module.end_dim) == (1, -1):
            spec, params, flat = {"kind": "flatten"}, {}, True
        elif isinstance(module, nn.ReLU) and layers and "relu" in layers[-1] and not layers[-1]["relu"]:
            layers[-1]["relu"] = True
            i += 1
            continue
        else:
            raise HeadWeightsError(
                f"box head layer {name} ({type(module).__name__}) has no API-built "
                "equivalent here; supported: Conv2d(+BatchNorm2d)(+ReLU) blocks, one "
                "Flatten(start_dim=1), then Linear(+ReLU) layers"
            )
        layers.append(spec)
        tensors.update(params)
        i += 1
    if not flat:
        raise HeadWeightsError(f"{prefix} has no Flatten(start_dim=1): the box predictor needs flat features")
    return layers, tensors


def box_head_layers(box_head: nn.Module) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The box head as a list of layer specs (input: pooled RoI features (C, h, w)) and its tensors."""
    if isinstance(box_head, TwoMLPHead):
        fc6, params6 = _linear("box_head.fc6", box_head.fc6, relu=True)
        fc7, params7 = _linear("box_head.fc7", box_head.fc7, relu=True)
        return [{"kind": "flatten"}, fc6, fc7], {**params6, **params7}
    if isinstance(box_head, nn.Sequential):
        return _sequential_layers("box_head", box_head)
    raise HeadWeightsError(
        f"roi_heads.box_head is {type(box_head).__name__}; supported: TwoMLPHead, "
        "FastRCNNConvFCHead or an nn.Sequential of Conv2d/BatchNorm2d/ReLU/Flatten/Linear"
    )


def box_predictor_layers(predictor: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """cls_score and bbox_pred of a FastRCNNPredictor (class-specific box regression)."""
    if not isinstance(predictor, FastRCNNPredictor):
        raise HeadWeightsError(f"roi_heads.box_predictor is {type(predictor).__name__}; supported: FastRCNNPredictor")
    num_classes = predictor.cls_score.out_features
    if predictor.bbox_pred.out_features != 4 * num_classes:
        raise HeadWeightsError(
            f"box_predictor.bbox_pred has {predictor.bbox_pred.out_features} outputs, "
            f"expected 4 x num_classes = {4 * num_classes} (class-specific boxes)"
        )
    cls_spec, cls_params = _linear("box_predictor.cls_score", predictor.cls_score, relu=False)
    box_spec, box_params = _linear("box_predictor.bbox_pred", predictor.bbox_pred, relu=False)
    return {"cls_score": cls_spec, "bbox_pred": box_spec}, {**cls_params, **box_params}


# --------------------------------------------------------------------------- manifest


def head_metadata(model: nn.Module, input_hw: tuple[int, int], *, box_candidates: int = 1000) -> dict:
    """All head metadata of a torchvision FasterRCNN at a static input size (no tensors).
    Puts the model in eval mode: the head is its inference form."""
    for part in ("backbone", "rpn", "roi_heads"):
        if not hasattr(model, part):
            raise HeadWeightsError(f"{type(model).__name__} has no `{part}`: expected a torchvision FasterRCNN")
    if box_candidates < 1:
        raise HeadWeightsError(f"box_candidates is {box_candidates}; it must be a positive budget")
    model.eval()
    levels = feature_levels(model, input_hw)
    roi_heads = model.roi_heads
    predictor, _ = box_predictor_layers(roi_heads.box_predictor)
    layers, _ = box_head_layers(roi_heads.box_head)
    return {
        "version": MANIFEST_VERSION,
        "input": {"height": int(input_hw[0]), "width": int(input_hw[1])},
        "num_classes": predictor["cls_score"]["out_features"],
        "features": levels,
        "rpn": rpn_metadata(model.rpn, levels),
        "roi_pool": pooler_metadata(roi_heads.box_roi_pool, levels, input_hw),
        "box_head": {"type": type(roi_heads.box_head).__name__, "layers": layers},
        "box_predictor": predictor,
        "box": {
            "box_coder_weights": list(map(float, roi_heads.box_coder.weights)),
            "bbox_xform_clip": float(roi_heads.box_coder.bbox_xform_clip),
            "score_thresh": float(roi_heads.score_thresh),
            "nms_thresh": float(roi_heads.nms_thresh),
            "detections_per_img": int(roi_heads.detections_per_img),
            "min_size": BOX_MIN_SIZE,
            "candidates": int(box_candidates),
        },
    }


def head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The box head and predictor tensors, float32, contiguous, on the CPU."""
    _, head = box_head_layers(model.roi_heads.box_head)
    _, predictor = box_predictor_layers(model.roi_heads.box_predictor)
    return {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in {**head, **predictor}.items()}


# --------------------------------------------------------------------------- tensorrtx .wts


# --------------------------------------------------------------------------- export / load


def _same_bits(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> bool:
    a = np.asarray(a, dtype="<f4").ravel()
    b = np.asarray(b, dtype="<f4").ravel()
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def export_head(
    model: nn.Module,
    input_hw: tuple[int, int],
    out_dir: str | os.PathLike,
    *,
    checkpoint_sha256: str,
    formats: Iterable[str] = ("safetensors",),
    box_candidates: int = 1000,
) -> dict:
    """Write head.safetensors (+ head.wts) and manifest.json for `model` at the static `input_hw`.

    Every file written is read back and compared bit for bit before it replaces the old one;
    the manifest, written last, records the result. Returns the manifest.
    """
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise HeadWeightsError(f"unknown weights format(s) {unknown}; choose from {list(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = head_metadata(model, input_hw, box_candidates=box_candidates)
    tensors = head_tensors(model)
    expected = required_tensors(manifest)
    assert set(tensors) == set(expected), (sorted(tensors), sorted(expected))

    def write_safetensors(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        back = load_file(str(tmp))
        if set(back) != set(tensors) or not all(_same_bits(back[k], tensors[k]) for k in tensors):
            raise HeadWeightsError(f"{out / SAFETENSORS}: read-back differs from the written tensors")

    def write_wts_checked(tmp: Path) -> None:
        write_wts(tmp, tensors)
        back = read_wts(tmp)
        if list(back) != list(tensors) or not all(_same_bits(back[k], tensors[k]) for k in tensors):
            raise HeadWeightsError(f"{out / WTS}: read-back differs from the written tensors")

    atomic_write(out / SAFETENSORS, write_safetensors)
    files = {"safetensors": SAFETENSORS}
    if "wts" in formats:
        atomic_write(out / WTS, write_wts_checked)
        files["wts"] = WTS
    manifest.update(
        {
            "source_checkpoint_sha256": checkpoint_sha256,
            "software": software_versions(),
            "files": files,
            "roundtrip": {fmt: "bit-exact" for fmt in files},
            "tensors": [
                {"name": name, "shape": list(t.shape), "dtype": "float32", "sha256": tensor_sha256(t)}
                for name, t in tensors.items()
            ],
        }
    )
    write_json(out / MANIFEST, manifest, indent=1, sort_keys=False)
    return manifest
