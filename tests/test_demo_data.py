"""trtflow.build.demo_data: the synthetic demo data set."""

import numpy as np
import pytest
from pycocotools.coco import COCO

from trtflow.build import demo_data
from trtflow.common.images import read_image


@pytest.fixture(scope="module")
def demo_val(tmp_path_factory):
    """A 12-image demo val split made from a repository-like root."""
    root = tmp_path_factory.mktemp("repo")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        demo_data.make_demo_split("val", 12, 0, "results/data/val.json")
    return root


def test_demo_split_is_byte_identical_across_runs(demo_val, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo_data.make_demo_split("val", 12, 0, "results/data/val.json")
    again = sorted((tmp_path / "results/data").rglob("*"))
    first = sorted((demo_val / "results/data").rglob("*"))
    assert [p.relative_to(tmp_path) for p in again] == [p.relative_to(demo_val) for p in first]
    assert len(again) == 12 + 2  # 12 JPEGs, the folder, the JSON; nothing else left behind
    for mine, theirs in zip(again, first, strict=True):
        if mine.is_file():
            assert mine.read_bytes() == theirs.read_bytes(), mine


def test_demo_splits_draw_from_their_own_streams(demo_val, tmp_path, monkeypatch):
    # image i of a split depends on (seed, split, i) only: not on the split's size or other splits
    monkeypatch.chdir(tmp_path)
    demo_data.make_demo_split("val", 3, 0, "results/data/val.json")
    assert (tmp_path / "results/data/val/000003.jpg").read_bytes() == (
        demo_val / "results/data/val/000003.jpg"
    ).read_bytes()
    val, train, reseeded = (
        demo_data.demo_image(seed, split, 3)[1] for seed, split in [(0, "val"), (0, "train"), (1, "val")]
    )
    assert val != train and val != reseeded


def test_demo_split_is_valid_coco(demo_val, monkeypatch):
    monkeypatch.chdir(demo_val)
    coco = COCO("results/data/val.json")
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4]
    assert [c["name"] for c in coco.loadCats([1, 2, 3, 4])] == ["circle", "rectangle", "triangle", "star"]
    assert len(coco.imgs) == 12
    for image_id, image in coco.imgs.items():
        assert image["file_name"] == f"results/data/val/{image_id:06d}.jpg"
        pixels = read_image(image["file_name"])
        assert pixels.shape == (image["height"], image["width"], 3)
        assert 240 <= image["height"] <= 480 and 240 <= image["width"] <= 480
        objects = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert 1 <= len(objects) <= 8
        for obj in objects:
            x, y, w, h = obj["bbox"]
            assert all(isinstance(v, int) for v in obj["bbox"])
            assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
            assert 16 <= max(w, h) <= 0.6 * min(image["height"], image["width"]) + 1
            assert 0 < obj["area"] <= w * h and obj["iscrowd"] == 0
    assert len({a["id"] for a in coco.anns.values()}) == len(coco.anns)


@pytest.mark.parametrize("category_id", [1, 2, 3, 4])
@pytest.mark.parametrize("side", [16, 37, 120])
def test_shape_mask_is_tight_and_sized(category_id, side):
    rng = np.random.default_rng(side)
    for _ in range(5):
        mask = demo_data._shape_mask(category_id, side, rng)
        # every edge of the box holds a shape pixel: the box is exactly the drawn shape's
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        assert max(mask.shape) in (side, side + 1)  # circles are 2r+1 px across


def test_occlusion_is_limited():
    square = np.ones((20, 20), bool)
    below = demo_data._Shape(1, 0, 0, square, np.zeros(3), np.zeros((20, 20), bool))
    covers_half = demo_data._Shape(1, 10, 0, square, np.zeros(3), np.zeros((20, 20), bool))
    covers_fifth = demo_data._Shape(1, 16, 0, square, np.zeros(3), np.zeros((20, 20), bool))
    assert not demo_data._place(covers_half, [below], 0.3)
    assert not below.covered.any()
    assert demo_data._place(covers_fifth, [below], 0.3)
    assert below.covered.mean() == pytest.approx(0.2)


def test_demo_objects_are_visible_and_varied():
    sizes, categories = [], set()
    for index in range(1, 31):
        _, objects = demo_data.demo_image(0, "val", index)
        sizes += [max(o["bbox"][2:]) for o in objects]
        categories |= {o["category_id"] for o in objects}
    assert categories == {1, 2, 3, 4}
    assert min(sizes) >= 16 and max(sizes) > 120 and np.median(sizes) > 30
