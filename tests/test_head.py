"""trtflow.common.head: the static deployment-form head against torchvision's own stages.

Random-init detectors (outputs tamed into trained-like ranges), random seeded inputs, B = 2:
anchors exact, proposals equal, RoIAlign within 1e-5 x max|ref| of MultiScaleRoIAlign, final
detections matched (same class, IoU >= 0.9) at >= 0.99; NMS exact against batched_nms.
"""

import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms, box_iou

from test_weights import ARCHS, tame, tiny_fpn_detector, torchvision_detector
from trtflow.build.weights import export_head
from trtflow.common.head import StaticHead, greedy_nms, level_anchors
from trtflow.formats.head_weights import load_head

BATCH = 2


class Case:
    """A detector, its exported head, and torchvision's outputs for each stage on one batch."""

    def __init__(self, model, input_hw, folder, seed=1):
        self.model, self.input_hw = model, input_hw
        export_head(model, input_hw, folder, checkpoint_sha256="0" * 64)
        self.manifest, self.tensors = load_head(folder)
        self.head = StaticHead(self.manifest, self.tensors)
        torch.manual_seed(seed)
        self.images = ImageList(torch.randn(BATCH, 3, *input_hw), [tuple(input_hw)] * BATCH)
        with torch.no_grad():
            self.features = model.backbone(self.images.tensors)
            self.objectness, self.deltas = model.rpn.head(list(self.features.values()))
            self.proposals, _ = model.rpn(self.images, self.features)
            self.detections, _ = model.roi_heads(self.features, self.proposals, self.images.image_sizes)

    @property
    def maps(self):
        return list(self.features.values())


@pytest.fixture(scope="module", params=["tiny", "tiny_conv_head", *ARCHS])
def case(request, tmp_path_factory):
    if request.param.startswith("tiny"):
        model, input_hw = tiny_fpn_detector(conv_head=request.param == "tiny_conv_head"), (96, 128)
    else:
        model, input_hw = torchvision_detector(request.param), (128, 160)
    return Case(tame(model, input_hw), input_hw, tmp_path_factory.mktemp(request.param))


def match_rate(ref_boxes, ref_labels, boxes, labels) -> float:
    """Fraction of reference detections with a same-class detection at IoU >= 0.9."""
    if len(ref_boxes) == 0:
        return 1.0
    if len(boxes) == 0:
        return 0.0
    hit = (box_iou(ref_boxes, boxes) >= 0.9) & (ref_labels[:, None] == labels[None, :].long())
    return hit.any(dim=1).float().mean().item()


def test_anchors_equal_torchvision(case):
    reference = case.model.rpn.anchor_generator(case.images, case.maps)[0]
    assert torch.equal(torch.cat(level_anchors(case.manifest)), reference)


def test_proposals_equal_torchvision(case):
    with torch.no_grad():
        proposals = case.head.propose(case.objectness, case.deltas)
    budget = case.manifest["rpn"]["post_nms_top_n"]
    assert proposals.boxes.shape == (BATCH, budget, 4) and proposals.valid.shape == (BATCH, budget)
    for b, reference in enumerate(case.proposals):
        n = int(proposals.valid[b].sum())
        assert n == len(reference) > 0
        assert proposals.valid[b, :n].all() and not proposals.valid[b, n:].any()
        scale = reference.abs().max()
        same_rows = ((proposals.boxes[b, :n] - reference).abs().amax(dim=1) <= 1e-5 * scale).float().mean()
        assert same_rows >= 0.99, f"image {b}: only {same_rows:.3f} of proposals equal torchvision's in order"


def test_roi_align_matches_multiscale_roi_align(case):
    """torchvision's proposals plus boxes that hit RoIAlign's edge rules: partly outside the image,
    below one pixel, larger than the image (level clamps), on the last row/column."""
    torch.manual_seed(3)
    height, width = case.input_hw
    edge = torch.tensor(
        [
            [-30.0, -30.0, 10.0, 12.0],
            [width - 5.0, height - 3.0, width + 40.0, height + 20.0],
            [3.2, 4.1, 3.5, 4.3],
            [-200.0, -150.0, width + 300.0, height + 250.0],
            [0.0, 0.0, width, height],
            [width - 1.0, 0.0, width, height - 1.0],
        ]
    )
    corner = torch.rand(40, 2) * torch.tensor([width, height])
    random_boxes = torch.cat([corner, corner + torch.rand(40, 2) * 150 + 0.5], dim=1)
    boxes = [torch.cat([p, edge, random_boxes]) for p in case.proposals]
    padded = torch.zeros(BATCH, max(len(b) for b in boxes), 4)
    for b, rois in enumerate(boxes):
        padded[b, : len(rois)] = rois
    with torch.no_grad():
        reference = case.model.roi_heads.box_roi_pool(case.features, boxes, case.images.image_sizes)
        pooled = case.head.pool(case.maps, padded)
    ours = torch.cat([pooled[b, : len(rois)] for b, rois in enumerate(boxes)])
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max()
    assert error <= 1e-5 * reference.abs().max(), f"max abs err {error:.3g} vs max |ref| {reference.abs().max():.3g}"


def test_detections_match_torchvision(case):
    with torch.no_grad():
        out = case.head(case.maps, case.objectness, case.deltas)
    k = case.manifest["box"]["detections_per_img"]
    assert out["num_detections"].dtype == torch.int32 and out["classes"].dtype == torch.int32
    assert out["boxes"].shape == (BATCH, k, 4) and out["scores"].shape == out["classes"].shape == (BATCH, k)
    for b, reference in enumerate(case.detections):
        n = int(out["num_detections"][b])
        boxes, scores, labels = out["boxes"][b, :n], out["scores"][b, :n], out["classes"][b, :n]
        assert n == len(reference["boxes"]) > 0
        assert match_rate(reference["boxes"], reference["labels"], boxes, labels) >= 0.99
        assert match_rate(boxes, labels, reference["boxes"], reference["labels"]) >= 0.99
        assert (scores - reference["scores"]).abs().max() <= 1e-5
        assert (labels >= 1).all() and (labels < case.manifest["num_classes"]).all()
        assert not out["boxes"][b, n:].any() and not out["scores"][b, n:].any() and not out["classes"][b, n:].any()


def clustered_boxes(generator, n, clusters=12, size=400.0):
    """Boxes jittered around a few centres, so that most pairs overlap and chains of suppression form."""
    centres = torch.rand(clusters, 2, generator=generator) * size
    pick = torch.randint(clusters, (n,), generator=generator)
    xy = centres[pick] + torch.randn(n, 2, generator=generator) * 5
    wh = 40 + torch.rand(n, 2, generator=generator) * 20
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("iou_thresh", [0.3, 0.5, 0.7])
def test_greedy_nms_equals_batched_nms(iou_thresh):
    generator = torch.Generator().manual_seed(int(iou_thresh * 10))
    batch, n = 3, 400
    boxes = torch.stack([clustered_boxes(generator, n) for _ in range(batch)])
    scores = torch.rand(batch, n, generator=generator)
    groups = torch.randint(0, 4, (batch, n), generator=generator)
    valid = torch.rand(batch, n, generator=generator) > 0.1
    order = scores.argsort(dim=1, descending=True)
    take = lambda x: torch.gather(x, 1, order) if x.dim() == 2 else torch.gather(x, 1, order[..., None].expand_as(x))
    for use_groups in (False, True):
        keep = greedy_nms(take(boxes), take(valid), iou_thresh, groups=take(groups) if use_groups else None)
        for b in range(batch):
            idx = torch.nonzero(valid[b]).squeeze(1)
            labels = groups[b, idx] if use_groups else torch.zeros_like(idx)
            reference = idx[batched_nms(boxes[b, idx], scores[b, idx], labels, iou_thresh)]
            ours = order[b][keep[b]]
            assert torch.equal(ours, reference), f"b={b} groups={use_groups}: {len(ours)} vs {len(reference)} kept"
            assert 0 < len(reference) < 0.9 * len(idx)  # suppression really happened


def test_budgets_larger_than_candidates_pad_invalid_slots(tmp_path):
    """pre_nms_top_n 8 x 4 levels < post_nms_top_n 60 and 32 proposals x 3 classes < 100 detections:
    torchvision returns fewer; the static head pads with invalid, zeroed slots."""
    model = tame(tiny_fpn_detector(), (96, 128))
    model.rpn._pre_nms_top_n["testing"] = 8
    case = Case(model, (96, 128), tmp_path)
    with torch.no_grad():
        proposals = case.head.propose(case.objectness, case.deltas)
        out = case.head(case.maps, case.objectness, case.deltas)
    for b, reference in enumerate(case.proposals):
        n = len(reference)
        assert n < 32 and int(proposals.valid[b].sum()) == n
        assert torch.allclose(proposals.boxes[b, :n], reference, rtol=0, atol=1e-5 * reference.abs().max())
        assert not proposals.boxes[b, n:].any() and (proposals.scores[b, n:] == 0).all()
        detections = case.detections[b]
        assert int(out["num_detections"][b]) == len(detections["boxes"])
        assert match_rate(detections["boxes"], detections["labels"], out["boxes"][b], out["classes"][b]) >= 0.99


def test_candidate_budget_keeps_the_best(tmp_path):
    """With room for one candidate the head returns torchvision's best detection only."""
    case = Case(tame(tiny_fpn_detector(), (96, 128)), (96, 128), tmp_path)
    case.manifest["box"]["candidates"] = 1
    with torch.no_grad():
        out = case.head(case.maps, case.objectness, case.deltas)
    assert out["num_detections"].tolist() == [1] * BATCH
    for b, reference in enumerate(case.detections):
        assert torch.allclose(out["boxes"][b, 0], reference["boxes"][0], atol=1e-4)
        assert out["classes"][b, 0] == reference["labels"][0]


def test_named_inputs_and_fp16_head(tmp_path):
    case = Case(tame(tiny_fpn_detector(), (96, 128)), (96, 128), tmp_path)
    names = [level["name"] for level in case.manifest["features"]]
    named = {
        **dict(zip(names, case.maps)),
        **{f"objectness_{n}": o for n, o in zip(names, case.objectness)},
        **{f"deltas_{n}": d for n, d in zip(names, case.deltas)},
    }
    half = StaticHead.from_export(tmp_path, dtype=torch.float16)
    with torch.no_grad():
        by_name = case.head(named, named, named)
        listed = case.head(case.maps, case.objectness, case.deltas)
        fp16 = half(named, named, named)
    for key in listed:
        assert torch.equal(by_name[key], listed[key])
    for b in range(BATCH):
        n, m = int(listed["num_detections"][b]), int(fp16["num_detections"][b])
        assert (
            match_rate(listed["boxes"][b, :n], listed["classes"][b, :n], fp16["boxes"][b, :m], fp16["classes"][b, :m])
            >= 0.9
        )
    with pytest.raises(KeyError, match="objectness_p2"):
        case.head.propose({}, named)
