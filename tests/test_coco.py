"""trtflow.common.coco: image listing, COCO validation and indexing, the bad-image policy."""

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from test_images import picture, write_image
from trtflow.artifacts import write_json
from trtflow.common.coco import DatasetError, index_coco, index_images, list_images

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
    index = index_images(mixed_folder, "skip")
    assert [Path(i["file_name"]).name for i in index["images"]] == ["good0.jpg", "good1.jpg", "good2.jpg"]
    assert [i["id"] for i in index["images"]] == [1, 2, 3]
    assert all((i["height"], i["width"]) == (48, 64) for i in index["images"])
    skipped = {Path(s["file"]).name: s["reason"] for s in index["info"]["skipped"]}
    assert skipped.keys() == {"empty.jpg", "text.png"} and "empty" in skipped["empty.jpg"]


def test_fail_policy_names_every_bad_image(mixed_folder):
    with pytest.raises(DatasetError) as caught:
        index_images(mixed_folder, "fail")
    assert len(caught.value.problems) == 2
    message = str(caught.value)
    assert message.startswith(f"{mixed_folder}: 2 problems:\n  - ")
    assert str(mixed_folder / "empty.jpg") in message and str(mixed_folder / "text.png") in message
    assert "data.bad_images: skip" in message


def test_unknown_policy_is_refused(mixed_folder):
    with pytest.raises(ValueError, match="data.bad_images is 'ignore'"):
        index_images(mixed_folder, "ignore")


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
    index = index_coco(save(folder, coco), folder / "images")
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
        index_coco(path, folder / "images", "fail")
    assert str(caught.value).startswith(f"{path}: annotation 10 ") and reason in str(caught.value)
    index = index_coco(path, folder / "images", "skip")
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
        index_coco(path, folder / "images")
    message = str(caught.value)
    assert f"{folder / 'images' / '2.jpg'}: does not exist" in message
    assert f"{folder / 'images' / '3.jpg'}: is 80x60 px but the JSON says 100x60" in message
    index = index_coco(path, folder / "images", "skip")
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
        index_coco(path, folder / "images", policy)
    assert str(caught.value).startswith(f"{path}: {problem}")


def test_images_folder_must_exist(user_coco):
    folder, coco = user_coco
    with pytest.raises(DatasetError, match="is not a folder"):
        index_coco(save(folder, coco), folder / "pictures")
    with pytest.raises(DatasetError, match="data.images is not set"):
        index_coco(save(folder, coco), None)


# --- list_images ------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path):
    for name in ["b.jpg", "a.PNG", "sub/c.jpeg", ".hidden.jpg", ".cache/d.jpg", "notes.txt"]:
        path = tmp_path / "tree" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return tmp_path / "tree"


def test_list_images_of_folder_is_recursive_sorted_and_filtered(image_tree):
    assert [p.relative_to(image_tree).as_posix() for p in list_images(image_tree)] == [
        "a.PNG",
        "b.jpg",
        "sub/c.jpeg",
    ]


def test_list_images_of_glob(image_tree):
    assert [p.name for p in list_images(f"{image_tree}/**/*.jp*g")] == ["b.jpg", "c.jpeg"]
    with pytest.raises(DatasetError, match="matches no files"):
        list_images(f"{image_tree}/*.bmp")


def test_list_images_of_coco_json(image_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    coco = {"images": [{"id": 2, "file_name": "tree/b.jpg"}, {"id": 1, "file_name": "c.jpeg"}]}
    (image_tree / "sub" / "index.json").write_text(json.dumps(coco))
    # tree/b.jpg: relative to the repository root (trtflow's JSONs); c.jpeg: beside the JSON
    assert [p.as_posix() for p in list_images("tree/sub/index.json")] == ["tree/b.jpg", "tree/sub/c.jpeg"]


def test_list_images_names_a_missing_or_empty_spec(tmp_path):
    with pytest.raises(DatasetError, match=f"^{tmp_path / 'nothing'}: does not exist\nFix: "):
        list_images(tmp_path / "nothing")
    with pytest.raises(DatasetError, match="holds no image files"):
        list_images(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="neither a folder, a glob pattern nor a COCO .json"):
        list_images(tmp_path / "notes.txt")
