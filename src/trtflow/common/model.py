"""Detectors trtflow knows: the demo detector and torchvision's Faster R-CNN family.

Every detector here is a torchvision `FasterRCNN`; trtflow runs its parts directly on already
preprocessed tensors (`run_detector`), bypassing torchvision's own resize, so that every later stage
sees exactly the network input the engine sees.
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from trtflow.artifacts import atomic_write, files_sha256, software_versions, write_json

TORCHVISION_ARCHS = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
)
ARCHS = ("demo", *TORCHVISION_ARCHS)

DEMO_WIDTHS = (32, 64, 128, 192)
DEMO_FPN_CHANNELS = 64
DEMO_ANCHOR_SIZES = ((16,), (32,), (64,), (128,), (256,))
DEMO_REPRESENTATION_SIZE = 256


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with the configured model."""


INPUT_NAME = "images"
# The features network's outputs, in FeaturesNetwork.forward's order: every FPN map by its level name (p2, ..., pool),
# then each level's RPN objectness and box deltas, named by these prefixes (objectness_p2, deltas_p2, ...).
OBJECTNESS_PREFIX, DELTAS_PREFIX = "objectness_", "deltas_"
RPN_PREFIXES = (OBJECTNESS_PREFIX, DELTAS_PREFIX)


class FeaturesNetwork(nn.Module):
    """Backbone + FPN + RPN head of a torchvision FasterRCNN: every FPN map, then each level's RPN outputs."""

    def __init__(self, model):
        super().__init__()
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head

    def forward(self, images):
        feature_maps = list(self.backbone(images).values())
        objectness, deltas = self.rpn_head(feature_maps)
        per_level = [tensor for pair in zip(objectness, deltas) for tensor in pair]
        return (*feature_maps, *per_level)


def backbone_maps(model, input_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The backbone's maps, by key, for one zero image of `input_hw`: a dry run for their names and sizes."""
    param = next(model.backbone.parameters())
    with torch.no_grad():
        return model.backbone(torch.zeros(1, 3, *input_hw, dtype=param.dtype, device=param.device))


def level_names(model, input_hw: tuple[int, int], maps: dict[str, torch.Tensor] | None = None) -> list[str]:
    """`p{log2(stride)}` for each FPN map in backbone order, `pool` for torchvision's max-pool level.

    Where two maps share a stride (torchvision's MobileNetV3-FPN returns two stride-32 maps), each of them
    is suffixed with its backbone key: `p5_0`, `p5_1`. `maps`: the dry run's, where the caller has it.
    """
    maps = backbone_maps(model, input_hw) if maps is None else maps
    by_stride = {
        key: "pool" if key == "pool" else f"p{round(math.log2(input_hw[0] / m.shape[-2]))}" for key, m in maps.items()
    }
    taken = list(by_stride.values())
    return [name if taken.count(name) == 1 else f"{name}_{key}" for key, name in by_stride.items()]


def output_names(levels: list[str]) -> list[str]:
    return [*levels, *(f"{prefix}{level}" for level in levels for prefix in RPN_PREFIXES)]


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """A basic ResNet block: two 3x3 convolutions and a (projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels, out_channels, stride)
        self.conv2 = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        )

    def forward(self, x):
        return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


def demo_backbone() -> BackboneWithFPN:
    """A small ResNet-like body (strides 4, 8, 16, 32) under a 64-channel FPN with a max-pool level."""
    w2, w3, w4, w5 = DEMO_WIDTHS
    body = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(conv_bn_relu(3, w2 // 2, 2), conv_bn_relu(w2 // 2, w2, 2)),
            c2=ResidualBlock(w2, w2, 1),
            c3=ResidualBlock(w2, w3, 2),
            c4=ResidualBlock(w3, w4, 2),
            c5=ResidualBlock(w4, w5, 2),
        )
    )
    return BackboneWithFPN(
        body,
        return_layers={"c2": "0", "c3": "1", "c4": "2", "c5": "3"},
        in_channels_list=list(DEMO_WIDTHS),
        out_channels=DEMO_FPN_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
    )


def head_settings(model_cfg: dict) -> dict:
    """torchvision FasterRCNN keyword arguments for the inference budgets and thresholds in config."""
    rpn, box = model_cfg["rpn"], model_cfg["box"]
    return dict(
        rpn_pre_nms_top_n_test=rpn["pre_nms_top_n"],
        rpn_post_nms_top_n_test=rpn["post_nms_top_n"],
        rpn_nms_thresh=rpn["nms_thresh"],
        box_score_thresh=box["score_thresh"],
        box_nms_thresh=box["nms_thresh"],
        box_detections_per_img=box["detections_per_img"],
    )


def build_detector(model_cfg: dict) -> detection.FasterRCNN:
    """An untrained detector of the configured architecture and class count."""
    arch, num_classes = model_cfg["arch"], model_cfg["num_classes"]
    settings = head_settings(model_cfg)
    if arch == "demo":
        anchors = AnchorGenerator(DEMO_ANCHOR_SIZES, ((0.5, 1.0, 2.0),) * len(DEMO_ANCHOR_SIZES))
        box_head = TwoMLPHead(DEMO_FPN_CHANNELS * 7 * 7, DEMO_REPRESENTATION_SIZE)
        return detection.FasterRCNN(
            demo_backbone(),
            rpn_anchor_generator=anchors,
            box_head=box_head,
            box_predictor=FastRCNNPredictor(DEMO_REPRESENTATION_SIZE, num_classes),
            rpn_pre_nms_top_n_train=600,
            rpn_post_nms_top_n_train=300,
            **settings,
        )
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"model.arch: unknown architecture {arch!r}; use one of {', '.join(ARCHS)}")
    constructor = getattr(detection, arch)
    return constructor(weights=None, weights_backbone=None, num_classes=num_classes, **settings)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from .safetensors, or from .pt/.pth (plain, or under a 'model'/'state_dict' key)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"model.checkpoint: {path} does not exist; point it at a state_dict file, or set it to `train`"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's own text would suggest weights_only=False: unsafe, and no fix
        raise CheckpointError(
            f"model.checkpoint: cannot read {path}: it is not tensors saved with torch.save (a "
            f"damaged file, or a whole pickled model: save model.state_dict() instead)"
        ) from error
    except Exception as error:  # any decoder error means the same thing to the user
        raise CheckpointError(
            f"model.checkpoint: cannot read {path} ({error}); it must be a torch state_dict "
            f"saved with safetensors or torch.save"
        ) from error
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"model.checkpoint: {path} holds no state_dict of tensors; save model.state_dict()")
    return loaded


def checkpoint_num_classes(state_dict: dict[str, torch.Tensor]) -> int | None:
    weight = state_dict.get("roi_heads.box_predictor.cls_score.weight")
    return None if weight is None else int(weight.shape[0])


def load_detector(model_cfg: dict, checkpoint: str | Path | None = None) -> detection.FasterRCNN:
    """The configured detector with `checkpoint` (default: `model.checkpoint`) loaded, in eval mode.

    The class count is checked first, so a mismatch names both numbers instead of a shape error.
    """
    checkpoint = Path(checkpoint or model_cfg["checkpoint"])
    state_dict = read_state_dict(checkpoint)
    found = checkpoint_num_classes(state_dict)
    if found is not None and found != model_cfg["num_classes"]:
        raise CheckpointError(
            f"{checkpoint}: the checkpoint has {found} classes (background included) but config "
            f"model.num_classes is {model_cfg['num_classes']}; set model.num_classes: {found}"
        )
    model = build_detector(model_cfg)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:  # missing, unexpected or mis-shaped tensors
        summary = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise CheckpointError(
            f"{checkpoint}: does not fit model.arch {model_cfg['arch']!r} ({summary} ...); check model.arch"
        ) from error
    return model.eval()


def run_detector(model: detection.FasterRCNN, images: torch.Tensor, targets=None):
    """Backbone -> RPN -> RoI heads on a preprocessed (B, 3, H, W) batch; every image spans the whole input.

    In eval mode returns torchvision's detections (boxes in input pixels); in train mode the loss dict.
    """
    image_list = ImageList(images, [tuple(images.shape[-2:])] * images.shape[0])
    features = model.backbone(images)
    proposals, rpn_losses = model.rpn(image_list, features, targets)
    detections, box_losses = model.roi_heads(features, proposals, image_list.image_sizes, targets)
    return {**rpn_losses, **box_losses} if model.training else detections


def save_validated_checkpoint(
    model_cfg: dict, source: str | Path, checkpoint_out: str | Path, info_out: str | Path
) -> dict:
    """Load `source` into the configured detector (class count checked) and save it as the pipeline's checkpoint.

    The info JSON carries the source's sha256: every later artifact records it, so artifacts of
    different checkpoints are never mixed.
    """
    from safetensors.torch import save_file

    model = load_detector(model_cfg, source)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    header = {"arch": model_cfg["arch"], "num_classes": str(model_cfg["num_classes"])}
    atomic_write(checkpoint_out, lambda staging: save_file(state, str(staging), metadata=header))
    info = {
        "arch": model_cfg["arch"],
        "num_classes": model_cfg["num_classes"],
        "source": str(source),
        "sha256": files_sha256(source),
        "parameters": sum(v.numel() for v in model.parameters()),
        "software": software_versions(),
    }
    write_json(info_out, info)
    return info
