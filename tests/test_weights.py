"""trtflow.build.weights: head tensors + manifest export, exact round-trips, strict loading.

Also home of the small random-init detectors the head and network tests share.
"""

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models.detection import (
    FasterRCNN,
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign

from trtflow.build.weights import export_head
from trtflow.formats.head_weights import (
    HeadWeightsError,
    load_head,
    read_wts,
    required_tensors,
    tensor_sha256,
    write_wts,
)

# Test-time budgets small enough for CPU, large enough for real NMS work.
BUDGETS = {"rpn_pre_nms_top_n_test": 150, "rpn_post_nms_top_n_test": 60}


def tiny_fpn_detector(num_classes: int = 4, seed: int = 0, conv_head: bool = False) -> FasterRCNN:
    """A torchvision FasterRCNN on a small custom BackboneWithFPN (strides 4, 8, 16 + pool); its box
    head is a TwoMLPHead, or with `conv_head` a FastRCNNConvFCHead with batch norms (as in the v2 arch)."""
    torch.manual_seed(seed)
    body = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU()),
            c3=nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU()),
            c4=nn.Sequential(nn.Conv2d(12, 16, 3, 2, 1), nn.ReLU()),
        )
    )
    backbone = BackboneWithFPN(body, {"stem": "0", "c3": "1", "c4": "2"}, [8, 12, 16], out_channels=16)
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 4)
    pooler = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2)
    box_head = (
        FastRCNNConvFCHead((16, 7, 7), [16, 16], [32], norm_layer=nn.BatchNorm2d)
        if conv_head
        else TwoMLPHead(16 * 49, 32)
    )
    model = FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=pooler,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(32, num_classes),
        **BUDGETS,
    )
    randomize_batch_norms(model)
    return model.eval()


def randomize_batch_norms(model: nn.Module) -> None:
    """Random eval statistics and affine parameters, so that folding batch norms is really tested."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)


ARCHS = {
    "fasterrcnn_resnet50_fpn": fasterrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn_v2": fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
    "fasterrcnn_mobilenet_v3_large_320_fpn": fasterrcnn_mobilenet_v3_large_320_fpn,
}


def torchvision_detector(arch: str, num_classes: int = 3, seed: int = 0) -> FasterRCNN:
    """A random-init torchvision arch with CPU-sized budgets and random batch-norm statistics."""
    torch.manual_seed(seed)
    model = ARCHS[arch](weights=None, weights_backbone=None, num_classes=num_classes, **BUDGETS).eval()
    randomize_batch_norms(model)
    return model


def tame(model: FasterRCNN, input_hw: tuple[int, int], seed: int = 0) -> FasterRCNN:
    """Rescale the RPN and box-predictor outputs of a random-init model into trained-like ranges
    (objectness logits std 2, RPN deltas 0.3, class logits 1.5, box codes 1): random backbones give
    deltas that blow every box up or logits that saturate sigmoid/softmax into score ties."""
    torch.manual_seed(seed)
    x = torch.randn(1, 3, *input_hw)
    images = ImageList(x, [tuple(input_hw)])

    def rescale(layer: nn.Module, output: torch.Tensor, std: float) -> None:
        layer.weight.mul_(std / output.std())
        layer.bias.zero_()

    with torch.no_grad():
        features = model.backbone(x)
        objectness, deltas = model.rpn.head(list(features.values()))
        rescale(model.rpn.head.cls_logits, torch.cat([o.flatten() for o in objectness]), 2.0)
        rescale(model.rpn.head.bbox_pred, torch.cat([d.flatten() for d in deltas]), 0.3)
        proposals, _ = model.rpn(images, features)
        pooled = model.roi_heads.box_roi_pool(features, proposals, images.image_sizes)
        logits, codes = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
        rescale(model.roi_heads.box_predictor.cls_score, logits, 1.5)
        rescale(model.roi_heads.box_predictor.bbox_pred, codes, 1.0)
    return model


@pytest.fixture(scope="module")
def tiny():
    return tiny_fpn_detector()


def test_manifest_holds_the_head_metadata(tiny, tmp_path):
    manifest = export_head(tiny, (96, 128), tmp_path, checkpoint_sha256="ab" * 32)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert [(f["name"], f["key"], f["size"], f["anchor_stride"]) for f in manifest["features"]] == [
        ("p2", "0", [24, 32], [4, 4]),
        ("p3", "1", [12, 16], [8, 8]),
        ("p4", "2", [6, 8], [16, 16]),
        ("pool", "pool", [3, 4], [32, 32]),
    ]
    rpn = manifest["rpn"]
    assert rpn["anchor_sizes"] == [[16.0], [32.0], [64.0], [128.0]]
    assert rpn["aspect_ratios"] == [[0.5, 1.0, 2.0]] * 4
    assert rpn["box_coder_weights"] == [1.0, 1.0, 1.0, 1.0]
    assert rpn["bbox_xform_clip"] == math.log(1000.0 / 16)
    assert (rpn["pre_nms_top_n"], rpn["post_nms_top_n"], rpn["nms_thresh"], rpn["score_thresh"], rpn["min_size"]) == (
        150,
        60,
        0.7,
        0.0,
        1e-3,
    )
    pool = manifest["roi_pool"]
    assert pool["features"] == ["p2", "p3", "p4"] and pool["scales"] == [0.25, 0.125, 0.0625]
    assert (pool["k_min"], pool["k_max"], pool["canonical_scale"], pool["canonical_level"]) == (2, 4, 224, 4)
    assert (pool["output_size"], pool["sampling_ratio"]) == ([7, 7], 2)
    box = manifest["box"]
    assert box["box_coder_weights"] == [10.0, 10.0, 5.0, 5.0]
    assert (box["score_thresh"], box["nms_thresh"], box["detections_per_img"], box["min_size"]) == (
        0.05,
        0.5,
        100,
        1e-2,
    )
    assert manifest["num_classes"] == 4 and manifest["input"] == {"height": 96, "width": 128}
    assert manifest["source_checkpoint_sha256"] == "ab" * 32
    assert [layer["kind"] for layer in manifest["box_head"]["layers"]] == ["flatten", "linear", "linear"]
    names = [t["name"] for t in manifest["tensors"]]
    assert (
        set(names)
        == set(required_tensors(manifest))
        == {
            "box_head.fc6.weight",
            "box_head.fc6.bias",
            "box_head.fc7.weight",
            "box_head.fc7.bias",
            "box_predictor.cls_score.weight",
            "box_predictor.cls_score.bias",
            "box_predictor.bbox_pred.weight",
            "box_predictor.bbox_pred.bias",
        }
    )
    state = tiny.roi_heads.state_dict()
    _, tensors = load_head(tmp_path)
    for name in names:
        assert torch.equal(tensors[name], state[name])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_torchvision_archs_export(arch, tmp_path):
    model = torchvision_detector(arch)
    formats = ["safetensors", "wts"] if arch.endswith("_v2") else ["safetensors"]  # .wts: ~100 MB of hex each
    manifest = export_head(model, (128, 160), tmp_path, checkpoint_sha256="0" * 64, formats=formats)
    _, tensors = load_head(tmp_path)
    if "wts" in formats:
        _, from_wts = load_head(tmp_path, source="wts")
        assert all(torch.equal(tensors[n], from_wts[n]) for n in tensors)
    levels = [f["name"] for f in manifest["features"]]
    if "mobilenet" in arch:
        # two maps at stride 32: the second gets a suffix; LevelMapper can reach only the first
        assert levels == ["p5_0", "p5_1", "pool"] and manifest["roi_pool"]["features"] == ["p5_0"]
        assert len(manifest["rpn"]["anchor_sizes"][0]) * len(manifest["rpn"]["aspect_ratios"][0]) == 15
    else:
        assert levels == ["p2", "p3", "p4", "p5", "pool"]
        assert manifest["roi_pool"]["features"] == ["p2", "p3", "p4", "p5"]
    if arch.endswith("_v2"):
        layers = manifest["box_head"]["layers"]
        assert [layer["kind"] for layer in layers] == ["conv2d"] * 4 + ["flatten", "linear"]
        # folded conv + BN == torchvision's Conv2dNormActivation in eval mode
        x = torch.randn(5, 256, 7, 7)
        block = model.roi_heads.box_head[0]
        folded = torch.relu(
            nn.functional.conv2d(x, tensors["box_head.0.0.weight"], tensors["box_head.0.0.bias"], padding=1)
        )
        reference = block(x)
        assert (folded - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_wts_is_tensorrtx_format_and_bit_exact(tmp_path):
    tensors = {
        "a.weight": torch.tensor([[1.0, -2.5], [float("inf"), 3.4028235e38]]),
        "b": torch.tensor([1e-45, -0.0, float("nan")]),
        "big": torch.randn(1000, 37),
    }
    write_wts(tmp_path / "x.wts", tensors)
    lines = (tmp_path / "x.wts").read_text().splitlines()
    assert lines[0] == "3"
    assert lines[1].split() == ["a.weight", "4", "3f800000", "c0200000", "7f800000", "7f7fffff"]
    assert lines[2].split()[:4] == ["b", "3", "00000001", "80000000"]
    back = read_wts(tmp_path / "x.wts")
    for name, t in tensors.items():
        assert np.array_equal(back[name].view(np.uint32), t.numpy().ravel().view(np.uint32)), name


def test_safetensors_round_trip_is_bit_exact(tiny, tmp_path):
    export_head(tiny, (64, 64), tmp_path, checkpoint_sha256="1" * 64)
    manifest, tensors = load_head(tmp_path)
    direct = load_file(str(tmp_path / "head.safetensors"))
    for entry in manifest["tensors"]:
        assert entry["dtype"] == "float32"
        assert entry["sha256"] == tensor_sha256(direct[entry["name"]]) == tensor_sha256(tensors[entry["name"]])
        assert list(direct[entry["name"]].shape) == entry["shape"]


def test_missing_or_extra_tensor_is_named(tiny, tmp_path):
    export_head(tiny, (64, 64), tmp_path, checkpoint_sha256="1" * 64)
    path = tmp_path / "head.safetensors"
    tensors = load_file(str(path))
    extra = {**tensors, "box_head.fc8.weight": torch.zeros(2)}
    save_file(extra, str(path))
    with pytest.raises(HeadWeightsError, match=r"unexpected \['box_head.fc8.weight'\]"):
        load_head(tmp_path)
    del tensors["box_predictor.bbox_pred.bias"]
    save_file(tensors, str(path))
    with pytest.raises(HeadWeightsError, match=r"missing \['box_predictor.bbox_pred.bias'\]"):
        load_head(tmp_path)


def test_changed_tensor_fails_its_sha256(tiny, tmp_path):
    export_head(tiny, (64, 64), tmp_path, checkpoint_sha256="1" * 64)
    path = tmp_path / "head.safetensors"
    tensors = load_file(str(path))
    tensors["box_head.fc7.bias"][0] += 1e-3
    save_file(tensors, str(path))
    with pytest.raises(HeadWeightsError, match="box_head.fc7.bias does not match its sha256"):
        load_head(tmp_path)


def test_bad_requests_fail_clearly(tiny, tmp_path):
    with pytest.raises(HeadWeightsError, match=r"unknown weights format\(s\) \['onnx'\]"):
        export_head(tiny, (64, 64), tmp_path, checkpoint_sha256="1", formats=["onnx"])
    with pytest.raises(HeadWeightsError, match="manifest.json not found"):
        load_head(tmp_path)
    export_head(tiny, (64, 64), tmp_path, checkpoint_sha256="1")
    with pytest.raises(HeadWeightsError, match="no 'wts' file was exported"):
        load_head(tmp_path, source="wts")
    tiny.roi_heads.box_roi_pool.sampling_ratio = -1
    try:
        with pytest.raises(HeadWeightsError, match="sampling_ratio is -1"):
            export_head(tiny, (64, 64), tmp_path, checkpoint_sha256="1")
    finally:
        tiny.roi_heads.box_roi_pool.sampling_ratio = 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.safetensors", "manifest.json"]


def test_unsupported_box_head_is_named(tiny, tmp_path):
    head = tiny.roi_heads.box_head
    tiny.roi_heads.box_head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 49, 32), nn.GELU())
    try:
        with pytest.raises(HeadWeightsError, match=r"box head layer box_head.2 \(GELU\) has no API-built equivalent"):
            export_head(tiny, (64, 64), tmp_path, checkpoint_sha256="1")
    finally:
        tiny.roi_heads.box_head = head
    assert not any(tmp_path.iterdir())
