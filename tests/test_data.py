"""trtflow.build.data: the `data` stage, preparing the val and calib splits."""

import pytest

from test_coco import save, user_coco  # noqa: F401  (user_coco: a fixture)
from trtflow.build.data import prepare_data
from trtflow.common.coco import DatasetError, load_json

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
    prepare_data(config(), "results/data/val.json", "results/data/calib.json")
    val, calib = (load_json(f"results/data/{split}.json") for split in ("val", "calib"))
    assert (len(val["images"]), len(calib["images"])) == (3, 2)
    assert calib["images"][0]["file_name"] == "results/data/calib/000001.jpg"
    assert sorted(p.name for p in (tmp_path / "results/data").iterdir()) == ["calib", "calib.json", "val", "val.json"]


def test_prepare_user_data_with_calibration_images(user_coco, monkeypatch):
    folder, coco = user_coco
    monkeypatch.chdir(folder)
    save(folder, coco)
    (folder / "images" / "3.jpg").write_bytes(b"")
    settings = config(source="coco", images="images", annotations="annotations.json", bad_images="skip")
    prepare_data(settings, "results/val.json", "results/calib.json", calibration_images="images/*.jpg")
    val, calib = load_json("results/val.json"), load_json("results/calib.json")
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
        prepare_data(
            config(source="coco", images="images", annotations="annotations.json"),
            "results/val.json",
            "results/calib.json",
        )
    assert not (folder / "results").exists() or not any((folder / "results").iterdir())


def test_user_images_without_annotations_give_images_only_val(user_coco, monkeypatch):
    folder, _ = user_coco
    monkeypatch.chdir(folder)
    prepare_data(config(source="coco", images="images"), "results/val.json", "results/calib.json")
    val, calib = load_json("results/val.json"), load_json("results/calib.json")
    assert len(val["images"]) == 3 and val["annotations"] == []
    assert calib["images"] == val["images"] and "val images" in calib["info"]["calibration"]
