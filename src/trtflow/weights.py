"""Head weights: the tensors and metadata the API-built Faster R-CNN head needs.

`export_head` takes a torchvision `FasterRCNN` and writes, into one folder,

- ``head.safetensors``: the box head (``TwoMLPHead`` FCs, or ``FastRCNNConvFCHead`` convs with their
  batch norm folded into weight and bias, then FCs) and the box predictor, float32;
- ``head.wts`` (optional): the same tensors in the tensorrtx text format for C++ builders;
- ``manifest.json``: everything else the head is made of — feature levels, anchors, RPN and box
  thresholds and budgets, box coders, the RoI pooler, the box-head layer structure — and per tensor
  its name, shape, dtype and sha256, plus the source checkpoint's sha256.

`load_head` reads it back and refuses a folder whose tensors are not exactly those the manifest's
layers need, or whose bytes differ from the recorded sha256s.

Feature levels are named as the features network names its outputs (``trtflow.export.level_names``:
``p{log2(stride)}``, ``pool`` for torchvision's LastLevelMaxPool map, suffixed with the backbone key
where two maps share a stride, as in the MobileNetV3 FPNs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from trtflow.artifacts import atomic_write, software_versions

MANIFEST = "manifest.json"
SAFETENSORS = "head.safetensors"
WTS = "head.wts"
FORMATS = ("safetensors", "wts")
MANIFEST_VERSION = 1

# torchvision constants that are not attributes of the modules.
BOX_MIN_SIZE = 1e-2  # RoIHeads.postprocess_detections: remove_small_boxes(min_size=1e-2)
LEVEL_MAPPER_EPS = 1e-6  # poolers.LevelMapper default


class HeadWeightsError(ValueError):
    """The head weights folder, or the model they come from, cannot make the API-built head."""


# --------------------------------------------------------------------------- feature levels


def feature_levels(model: nn.Module, input_hw: tuple[int, int]) -> list[dict]:
    """Name, torchvision key, channels, size and anchor stride of each backbone output, from a dry run
    at the input size. Names come from the features network's own rule (`trtflow.export.level_names`).

    ``anchor_stride`` is torchvision's ``AnchorGenerator`` stride (integer division of the input
    size by the map size), which is what places the anchors.
    """
    from trtflow.export import backbone_maps, level_names

    height, width = input_hw
    maps = backbone_maps(model, input_hw)
    return [{"name": name, "key": key, "channels": fmap.shape[1], "size": list(fmap.shape[-2:]),
             "anchor_stride": [height // fmap.shape[-2], width // fmap.shape[-1]]}
            for name, (key, fmap) in zip(level_names(model, input_hw, maps), maps.items())]


# --------------------------------------------------------------------------- RPN and RoI pooler


def rpn_metadata(rpn: nn.Module, levels: list[dict]) -> dict:
    """Anchors, box coder and the test-time proposal budgets/thresholds of a RegionProposalNetwork."""
    generator = rpn.anchor_generator
    if not isinstance(generator, AnchorGenerator):
        raise HeadWeightsError(f"rpn.anchor_generator is {type(generator).__name__}; the head builds "
                               "torchvision AnchorGenerator anchors only")
    if len(generator.sizes) != len(levels):
        raise HeadWeightsError(f"the anchor generator has {len(generator.sizes)} levels of sizes but the "
                               f"backbone gives {len(levels)} feature maps; make them agree")
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
        raise HeadWeightsError(f"roi_heads.box_roi_pool is {type(pooler).__name__}; the head builds "
                               "torchvision MultiScaleRoIAlign only")
    if pooler.sampling_ratio <= 0:
        raise HeadWeightsError(f"box_roi_pool.sampling_ratio is {pooler.sampling_ratio}: an adaptive "
                               "sampling grid has no static shape; set a positive sampling_ratio (2)")
    pooled = [i for i, level in enumerate(levels) if level["key"] in pooler.featmap_names]
    if not pooled:
        raise HeadWeightsError(f"box_roi_pool.featmap_names {pooler.featmap_names} match none of the "
                               f"backbone outputs {[lvl['key'] for lvl in levels]}")
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
    spec = {"kind": "linear", "name": name, "in_features": layer.in_features,
            "out_features": layer.out_features, "relu": relu}
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
        raise HeadWeightsError(f"{name}: only numeric zero padding is supported, got {conv.padding!r}/"
                               f"{conv.padding_mode!r}")
    spec = {"kind": "conv2d", "name": name, "in_channels": conv.in_channels,
            "out_channels": conv.out_channels, "kernel_size": list(conv.kernel_size),
            "stride": list(conv.stride), "padding": list(conv.padding), "dilation": list(conv.dilation),
            "groups": conv.groups, "folded_batch_norm": norm is not None, "relu": False}
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
            raise HeadWeightsError(f"box head layer {name} ({type(module).__name__}) has no API-built "
                                   "equivalent here; supported: Conv2d(+BatchNorm2d)(+ReLU) blocks, one "
                                   "Flatten(start_dim=1), then Linear(+ReLU) layers")
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
    raise HeadWeightsError(f"roi_heads.box_head is {type(box_head).__name__}; supported: TwoMLPHead, "
                           "FastRCNNConvFCHead or an nn.Sequential of Conv2d/BatchNorm2d/ReLU/Flatten/Linear")


def box_predictor_layers(predictor: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """cls_score and bbox_pred of a FastRCNNPredictor (class-specific box regression)."""
    if not isinstance(predictor, FastRCNNPredictor):
        raise HeadWeightsError(f"roi_heads.box_predictor is {type(predictor).__name__}; supported: "
                               "FastRCNNPredictor")
    num_classes = predictor.cls_score.out_features
    if predictor.bbox_pred.out_features != 4 * num_classes:
        raise HeadWeightsError(f"box_predictor.bbox_pred has {predictor.bbox_pred.out_features} outputs, "
                               f"expected 4 x num_classes = {4 * num_classes} (class-specific boxes)")
    cls_spec, cls_params = _linear("box_predictor.cls_score", predictor.cls_score, relu=False)
    box_spec, box_params = _linear("box_predictor.bbox_pred", predictor.bbox_pred, relu=False)
    return {"cls_score": cls_spec, "bbox_pred": box_spec}, {**cls_params, **box_params}


def layer_tensor_shapes(layer: dict) -> dict[str, tuple[int, ...]]:
    """The tensors a layer spec reads, with their shapes."""
    if layer["kind"] == "linear":
        return {f"{layer['name']}.weight": (layer["out_features"], layer["in_features"]),
                f"{layer['name']}.bias": (layer["out_features"],)}
    if layer["kind"] == "conv2d":
        return {f"{layer['name']}.weight": (layer["out_channels"], layer["in_channels"] // layer["groups"],
                                            *layer["kernel_size"]),
                f"{layer['name']}.bias": (layer["out_channels"],)}
    return {}


def required_tensors(manifest: Mapping) -> dict[str, tuple[int, ...]]:
    """Every tensor the head builders read, by name, with its shape: exactly the box head + predictor."""
    shapes = {}
    for layer in [*manifest["box_head"]["layers"], *manifest["box_predictor"].values()]:
        shapes.update(layer_tensor_shapes(layer))
    return shapes


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


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's little-endian bytes in C order."""
    array = tensor.detach().cpu().contiguous().numpy()
    return hashlib.sha256(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()


# --------------------------------------------------------------------------- tensorrtx .wts


def write_wts(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """tensorrtx text format: a count line, then per tensor ``name len hex hex …`` (big-endian float32)."""
    with open(path, "wb") as f:
        f.write(f"{len(tensors)}\n".encode())
        for name, tensor in tensors.items():
            if any(c.isspace() for c in name):
                raise HeadWeightsError(f"tensor name {name!r} contains whitespace; .wts cannot hold it")
            words = np.ascontiguousarray(tensor.detach().cpu().float().numpy().ravel(), dtype=">f4")
            hex_digits = np.frombuffer(words.tobytes().hex().encode(), dtype=np.uint8).reshape(-1, 8)
            spaced = np.concatenate([np.full((len(hex_digits), 1), ord(" "), np.uint8), hex_digits], axis=1)
            f.write(f"{name} {words.size}".encode() + spaced.tobytes() + b"\n")


def read_wts(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat float32 arrays by name from a tensorrtx .wts file (shapes live in the manifest)."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    try:
        count = int(lines[0])
    except (IndexError, ValueError):
        raise HeadWeightsError(f"{path}: first line must be the tensor count") from None
    body = [line for line in lines[1:] if line.strip()]
    if len(body) != count:
        raise HeadWeightsError(f"{path}: header says {count} tensors, file has {len(body)}; re-export it")
    tensors = {}
    for line in body:
        name, size, digits = (line.split(maxsplit=2) + [b""])[:3]
        try:
            data = bytes.fromhex(digits.decode())
        except ValueError:
            raise HeadWeightsError(f"{path}: tensor {name.decode()} has non-hex data") from None
        if len(data) != 4 * int(size):
            raise HeadWeightsError(f"{path}: tensor {name.decode()} declares {int(size)} values, holds "
                                   f"{len(data) / 4:g}; re-export it")
        tensors[name.decode()] = np.frombuffer(data, dtype=">f4").astype("<f4")
    return tensors


# --------------------------------------------------------------------------- export / load


def _same_bits(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> bool:
    a = np.asarray(a, dtype="<f4").ravel()
    b = np.asarray(b, dtype="<f4").ravel()
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def export_head(model: nn.Module, input_hw: tuple[int, int], out_dir: str | os.PathLike, *,
                checkpoint_sha256: str, formats: Iterable[str] = ("safetensors",),
                box_candidates: int = 1000) -> dict:
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
    manifest.update({
        "source_checkpoint_sha256": checkpoint_sha256,
        "software": software_versions(),
        "files": files,
        "roundtrip": {fmt: "bit-exact" for fmt in files},
        "tensors": [{"name": name, "shape": list(t.shape), "dtype": "float32", "sha256": tensor_sha256(t)}
                    for name, t in tensors.items()],
    })
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))
    return manifest


def check_head_tensors(manifest: Mapping, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise naming every missing/extra tensor, wrong shape, or sha256 mismatch."""
    expected = required_tensors(manifest)
    recorded = {entry["name"]: entry for entry in manifest["tensors"]}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise HeadWeightsError(f"{source}: the head reads exactly {len(expected)} tensors; "
                               + (f"missing {missing}" if missing else "")
                               + ("; " if missing and extra else "")
                               + (f"unexpected {extra}" if extra else "")
                               + " — re-export with the `weights` rule")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise HeadWeightsError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, the head "
                                   f"needs {shape}; re-export with the `weights` rule")
        if name not in recorded or recorded[name]["sha256"] != tensor_sha256(tensors[name]):
            raise HeadWeightsError(f"{source}: tensor {name} does not match its sha256 in {MANIFEST}; "
                                   "the files are from different exports — re-export with the `weights` rule")


def load_head(directory: str | os.PathLike, *, source: str = "safetensors") -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) from an export folder, checked against the manifest (names, shapes, sha256)."""
    folder = Path(directory)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise HeadWeightsError(f"{manifest_path} not found; run the `weights` rule (snakemake results/weights/{MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise HeadWeightsError(f"{manifest_path}: manifest version {manifest.get('version')}, this trtflow "
                               f"reads {MANIFEST_VERSION}; re-export with the `weights` rule")
    if source not in manifest["files"]:
        raise HeadWeightsError(f"{manifest_path}: no {source!r} file was exported (have {list(manifest['files'])}); "
                               "add it to config weights.format")
    path = folder / manifest["files"][source]
    if source == "safetensors":
        tensors = load_file(str(path))
    else:
        shapes = {entry["name"]: entry["shape"] for entry in manifest["tensors"]}
        tensors = {name: torch.from_numpy(flat.reshape(shapes.get(name, flat.shape)))
                   for name, flat in read_wts(path).items()}
    check_head_tensors(manifest, tensors, str(path))
    return manifest, tensors
