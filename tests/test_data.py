"""trtflow.data: demo data set, COCO validation, robust image reading, image listing."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from trtflow import data
from trtflow.artifacts import write_json
from trtflow.data import BadImageError, DatasetError


def write_image(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix, pixels)
    assert ok
    path.write_bytes(encoded.tobytes())
    return path


def picture(height=48, width=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- demo data set ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_val(tmp_path_factory):
    """A 12-image demo val split made from a repository-like root."""
    root = tmp_path_factory.mktemp("repo")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        data.make_demo_split("val", 12, 0, "results/data/val.json")
    return root


def test_demo_split_is_byte_identical_across_runs(demo_val, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data.make_demo_split("val", 12, 0, "results/data/val.json")
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
    data.make_demo_split("val", 3, 0, "results/data/val.json")
    assert (tmp_path / "results/data/val/000003.jpg").read_bytes() == (
        demo_val / "results/data/val/000003.jpg"
    ).read_bytes()
    val, train, reseeded = (
        data.demo_image(seed, split, 3)[1] for seed, split in [(0, "val"), (0, "train"), (1, "val")]
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
        pixels = data.read_image(image["file_name"])
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
        mask = data._shape_mask(category_id, side, rng)
        # every edge of the box holds a shape pixel: the box is exactly the drawn shape's
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        assert max(mask.shape) in (side, side + 1)  # circles are 2r+1 px across


def test_occlusion_is_limited():
    square = np.ones((20, 20), bool)
    below = data._Shape(1, 0, 0, square, np.zeros(3), np.zeros((20, 20), bool))
    covers_half = data._Shape(1, 10, 0, square, np.zeros(3), np.zeros((20, 20), bool))
    covers_fifth = data._Shape(1, 16, 0, square, np.zeros(3), np.zeros((20, 20), bool))
    assert not data._place(covers_half, [below], 0.3)
    assert not below.covered.any()
    assert data._place(covers_fifth, [below], 0.3)
    assert below.covered.mean() == pytest.approx(0.2)


def test_demo_objects_are_visible_and_varied():
    sizes, categories = [], set()
    for index in range(1, 31):
        _, objects = data.demo_image(0, "val", index)
        sizes += [max(o["bbox"][2:]) for o in objects]
        categories |= {o["category_id"] for o in objects}
    assert categories == {1, 2, 3, 4}
    assert min(sizes) >= 16 and max(sizes) > 120 and np.median(sizes) > 30


# --- read_image ----------------------------------------------------------------------------


def test_read_image_returns_bgr_uint8(tmp_path):
    pixels = picture()
    path = write_image(tmp_path / "ok.png", pixels)
    assert np.array_equal(data.read_image(path), pixels)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = picture()[..., 0]
    image = data.read_image(write_image(tmp_path / "gray.png", gray))
    assert image.shape == (48, 64, 3) and all(np.array_equal(image[..., c], gray) for c in range(3))


def test_16_bit_is_scaled_to_8_bit(tmp_path):
    pixels = picture()
    image = data.read_image(write_image(tmp_path / "deep.png", pixels.astype(np.uint16) * 257))
    assert image.dtype == np.uint8 and np.array_equal(image, pixels)
    gray16 = np.full((40, 40), 65535, np.uint16)
    assert (data.read_image(write_image(tmp_path / "deep_gray.png", gray16)) == 255).all()


def test_alpha_is_dropped_not_composited(tmp_path):
    pixels = picture()
    alpha = np.zeros((48, 64, 1), np.uint8)  # fully transparent: compositing would change every pixel
    image = data.read_image(write_image(tmp_path / "rgba.png", np.concatenate([pixels, alpha], axis=2)))
    assert np.array_equal(image, pixels)


def test_jpeg_with_bytes_after_end_marker_reads(tmp_path):
    path = write_image(tmp_path / "tail.jpg", picture())
    path.write_bytes(path.read_bytes() + b"\x00" * 16)
    assert data.read_image(path).shape == (48, 64, 3)


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path


BAD_IMAGES = {
    "empty.jpg": (lambda p: p.write_bytes(b""), "empty (0 bytes)"),
    "half.jpg": (lambda p: truncated(write_image(p, picture(200, 200))), "truncated JPEG"),
    "no_end.jpg": (lambda p: p.write_bytes(write_image(p, picture()).read_bytes()[:-2]), "truncated JPEG"),
    "half.png": (lambda p: truncated(write_image(p, picture(200, 200))), "corrupt or truncated PNG"),
    "text.jpg": (lambda p: p.write_text("this is not an image"), "not an image OpenCV can read"),
    "tiny.png": (lambda p: write_image(p, picture(20, 300)), "300x20 px, under 32 px a side"),
    "huge.png": (lambda p: write_image(p, np.zeros((40, 8001, 3), np.uint8)), "8001x40 px, over 8000 px a side"),
    "float.tiff": (lambda p: write_image(p, np.zeros((40, 40, 3), np.float32)), "float32 pixels"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_is_named_with_problem_and_fix(tmp_path, name):
    make, problem = BAD_IMAGES[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(BadImageError) as caught:
        data.read_image(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert problem in caught.value.problem and "Fix: " in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_missing_and_folder_paths_are_bad_images(tmp_path):
    with pytest.raises(BadImageError, match="does not exist"):
        data.read_image(tmp_path / "nowhere.jpg")
    with pytest.raises(BadImageError, match="is a folder"):
        data.read_image(tmp_path)


# --- bad image policy ------------------------------------------------------------------


@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / "images"
    for index in range(3):
        write_image(folder / f"good{index}.jpg", picture(seed=index))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("no pixels here")
    return folder


def test_skip_policy_counts_and_lists_bad_images(mixed_folder):
    index = data.index_images(mixed_folder, "skip")
    assert [Path(i["file_name"]).name for i in index["images"]] == ["good0.jpg", "good1.jpg", "good2.jpg"]
    assert [i["id"] for i in index["images"]] == [1, 2, 3]
    assert all((i["height"], i["width"]) == (48, 64) for i in index["images"])
    skipped = {Path(s["file"]).name: s["reason"] for s in index["info"]["skipped"]}
    assert skipped.keys() == {"empty.jpg", "text.png"} and "empty" in skipped["empty.jpg"]


def test_fail_policy_names_every_bad_image(mixed_folder):
    with pytest.raises(DatasetError) as caught:
        data.index_images(mixed_folder, "fail")
    assert len(caught.value.problems) == 2
    message = str(caught.value)
    assert message.startswith(f"{mixed_folder}: 2 problems:\n  - ")
    assert str(mixed_folder / "empty.jpg") in message and str(mixed_folder / "text.png") in message
    assert "data.bad_images: skip" in message


def test_unknown_policy_is_refused(mixed_folder):
    with pytest.raises(ValueError, match="data.bad_images is 'ignore'"):
        data.index_images(mixed_folder, "ignore")


# --- COCO data sets ----------------------------------------------------------------------


@pytest.fixture
def user_coco(tmp_path):
    """A user data set: images/ + annotations.json with bare file names, 3 images, 4 boxes."""
    for index in (1, 2, 3):
        write_image(tmp_path / "images" / f"{index}.jpg", picture(60, 80, index))
    coco = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 80, "height": 60} for i in (1, 2, 3)],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 10]},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [0, 0, 80, 60], "area": 100.0},
            {"id": 12, "image_id": 2, "category_id": 1, "bbox": [10.5, 20.25, 30, 30]},
            {"id": 13, "image_id": 3, "category_id": 3, "bbox": [60, 40, 20.5, 20]},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
    }
    return tmp_path, coco


def save(folder: Path, coco) -> Path:
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def test_index_coco_resolves_and_completes(user_coco):
    folder, coco = user_coco
    index = data.index_coco(save(folder, coco), folder / "images")
    assert [i["file_name"] for i in index["images"]] == [(folder / "images" / f"{i}.jpg").as_posix() for i in (1, 2, 3)]
    assert [a["id"] for a in index["annotations"]] == [1, 2, 3, 4]
    assert [a["area"] for a in index["annotations"]] == [200.0, 100.0, 900.0, 410.0]
    assert all(a["iscrowd"] == 0 for a in index["annotations"])
    assert index["categories"] == coco["categories"]  # sparse ids kept
    assert index["info"]["skipped"] == [] and index["info"]["unlisted_images"] == 0
    out = folder / "val.json"
    write_json(out, index, indent=1, sort_keys=False)
    assert len(COCO(str(out)).getAnnIds()) == 4


BAD_ANNOTATIONS = {
    "unknown image": ({"image_id": 9}, "image id 9, which 'images' does not list"),
    "unknown category": ({"category_id": 2}, "category id 2, which 'categories' does not list"),
    "negative width": ({"bbox": [5, 5, -3, 4]}, "non-positive width or height"),
    "outside": ({"bbox": [70, 5, 30, 4]}, "reaches outside the 80x60 image"),
    "not a box": ({"bbox": [1, 2, 3]}, "is not [x, y, width, height] numbers"),
    "nan": ({"bbox": [1, 2, 3, float("nan")]}, "non-finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_ANNOTATIONS))
def test_bad_annotation_fails_or_is_skipped(user_coco, case):
    folder, coco = user_coco
    change, reason = BAD_ANNOTATIONS[case]
    coco["annotations"][0].update(change)
    path = save(folder, coco)
    with pytest.raises(DatasetError) as caught:
        data.index_coco(path, folder / "images", "fail")
    assert str(caught.value).startswith(f"{path}: annotation 10 ") and reason in str(caught.value)
    index = data.index_coco(path, folder / "images", "skip")
    assert len(index["annotations"]) == 3
    [skipped] = index["info"]["skipped_annotations"]
    assert skipped["id"] == 10 and reason in skipped["reason"]


def test_missing_and_resized_images_fail_or_skip_with_their_annotations(user_coco):
    folder, coco = user_coco
    (folder / "images" / "2.jpg").unlink()
    coco["images"][2]["width"] = 100
    write_image(folder / "images" / "extra.jpg", picture())
    path = save(folder, coco)
    with pytest.raises(DatasetError) as caught:
        data.index_coco(path, folder / "images")
    message = str(caught.value)
    assert f"{folder / 'images' / '2.jpg'}: does not exist" in message
    assert f"{folder / 'images' / '3.jpg'}: is 80x60 px but the JSON says 100x60" in message
    index = data.index_coco(path, folder / "images", "skip")
    assert [i["id"] for i in index["images"]] == [1]
    assert len(index["annotations"]) == 2 and index["info"]["annotations_dropped_with_skipped_images"] == 2
    assert {Path(s["file"]).name for s in index["info"]["skipped"]} == {"2.jpg", "3.jpg"}
    assert index["info"]["unlisted_images"] == 1  # extra.jpg


STRUCTURAL_FAULTS = {
    "not json": (
        "{'images': []",
        "is not valid JSON: Expecting property name enclosed in double quotes at line 1, column 2",
    ),
    "a list": ("[]", "holds a JSON list, not an object"),
    "captions file": (json.dumps({"images": [], "annotations": []}), "has no 'categories' list"),
    "duplicate image id": (
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 1, "file_name": "2.jpg"}],
                "annotations": [],
                "categories": [],
            }
        ),
        "id 1 is used twice",
    ),
    "image without file_name": (
        json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}),
        "entry 0 needs an integer 'id' and a string 'file_name'",
    ),
}


@pytest.mark.parametrize("case", sorted(STRUCTURAL_FAULTS))
@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_structural_faults_always_fail(user_coco, case, policy):
    folder, _ = user_coco
    text, problem = STRUCTURAL_FAULTS[case]
    path = folder / "annotations.json"
    path.write_text(text)
    with pytest.raises(DatasetError) as caught:
        data.index_coco(path, folder / "images", policy)
    assert str(caught.value).startswith(f"{path}: {problem}")


def test_images_folder_must_exist(user_coco):
    folder, coco = user_coco
    with pytest.raises(DatasetError, match="is not a folder"):
        data.index_coco(save(folder, coco), folder / "pictures")
    with pytest.raises(DatasetError, match="data.images is not set"):
        data.index_coco(save(folder, coco), None)


# --- list_images ------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path):
    for name in ["b.jpg", "a.PNG", "sub/c.jpeg", ".hidden.jpg", ".cache/d.jpg", "notes.txt"]:
        path = tmp_path / "tree" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return tmp_path / "tree"


def test_list_images_of_folder_is_recursive_sorted_and_filtered(image_tree):
    assert [p.relative_to(image_tree).as_posix() for p in data.list_images(image_tree)] == [
        "a.PNG",
        "b.jpg",
        "sub/c.jpeg",
    ]


def test_list_images_of_glob(image_tree):
    assert [p.name for p in data.list_images(f"{image_tree}/**/*.jp*g")] == ["b.jpg", "c.jpeg"]
    with pytest.raises(DatasetError, match="matches no files"):
        data.list_images(f"{image_tree}/*.bmp")


def test_list_images_of_coco_json(image_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    coco = {"images": [{"id": 2, "file_name": "tree/b.jpg"}, {"id": 1, "file_name": "c.jpeg"}]}
    (image_tree / "sub" / "index.json").write_text(json.dumps(coco))
    # tree/b.jpg: relative to the repository root (trtflow's JSONs); c.jpeg: beside the JSON
    assert [p.as_posix() for p in data.list_images("tree/sub/index.json")] == ["tree/b.jpg", "tree/sub/c.jpeg"]


def test_list_images_names_a_missing_or_empty_spec(tmp_path):
    with pytest.raises(DatasetError, match=f"^{tmp_path / 'nothing'}: does not exist\nFix: "):
        data.list_images(tmp_path / "nothing")
    with pytest.raises(DatasetError, match="holds no image files"):
        data.list_images(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="neither a folder, a glob pattern nor a COCO .json"):
        data.list_images(tmp_path / "notes.txt")


# --- prepare_data (rule `data`) -----------------------------------------------------------


def config(**changes):
    return {
        "source": "demo",
        "images": None,
        "annotations": None,
        "bad_images": "fail",
        "demo": {"seed": 0, "num_val": 3, "num_calib": 2},
        **changes,
    }


def test_prepare_demo_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data.prepare_data(config(), "results/data/val.json", "results/data/calib.json")
    val, calib = (data.load_json(f"results/data/{split}.json") for split in ("val", "calib"))
    assert (len(val["images"]), len(calib["images"])) == (3, 2)
    assert calib["images"][0]["file_name"] == "results/data/calib/000001.jpg"
    assert sorted(p.name for p in (tmp_path / "results/data").iterdir()) == ["calib", "calib.json", "val", "val.json"]


def test_prepare_user_data_with_calibration_images(user_coco, monkeypatch):
    folder, coco = user_coco
    monkeypatch.chdir(folder)
    save(folder, coco)
    (folder / "images" / "3.jpg").write_bytes(b"")
    settings = config(source="coco", images="images", annotations="annotations.json", bad_images="skip")
    data.prepare_data(settings, "results/val.json", "results/calib.json", calibration_images="images/*.jpg")
    val, calib = data.load_json("results/val.json"), data.load_json("results/calib.json")
    assert [i["file_name"] for i in val["images"]] == ["images/1.jpg", "images/2.jpg"]
    assert val["info"]["skipped"] == [{"file": "images/3.jpg", "reason": "is empty (0 bytes)"}]
    assert calib["annotations"] == [] and len(calib["images"]) == 2 and calib["categories"] == coco["categories"]
    assert len(calib["info"]["skipped"]) == 1


def test_failed_preparation_leaves_no_output(user_coco, monkeypatch):
    folder, coco = user_coco
    monkeypatch.chdir(folder)
    save(folder, coco)
    (folder / "images" / "3.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="3.jpg: is empty"):
        data.prepare_data(
            config(source="coco", images="images", annotations="annotations.json"),
            "results/val.json",
            "results/calib.json",
        )
    assert not (folder / "results").exists() or not any((folder / "results").iterdir())


def test_user_images_without_annotations_give_images_only_val(user_coco, monkeypatch):
    folder, _ = user_coco
    monkeypatch.chdir(folder)
    data.prepare_data(config(source="coco", images="images"), "results/val.json", "results/calib.json")
    val, calib = data.load_json("results/val.json"), data.load_json("results/calib.json")
    assert len(val["images"]) == 3 and val["annotations"] == []
    assert calib["images"] == val["images"] and "val images" in calib["info"]["calibration"]
