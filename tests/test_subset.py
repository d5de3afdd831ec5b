"""The val images verification runs on (config `verify.num_images`, `verify.seed`), the intervals a verdict on a
subset states, and a run of the demo on 20 of its 100 images whose intervals hold the full set's values; the same
run in shards (`verify.shard_images`), each a job of the cluster-generic executor, gives the same files byte for
byte."""

from __future__ import annotations

import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from snakemake_runs import PRECISIONS, ROOT, clone, cluster_generic, config_overlay, snakemake
from trtflow.common.metrics import coco_map, per_image_evaluation, weighted_map
from trtflow.config import ConfigError, check_config
from trtflow.run.subset import ShardError, ValSubset, check_shards, val_subset, wilson_interval


def synthetic_coco(images: int = 12, seed: int = 0) -> tuple[dict, list[dict]]:
    """A COCO ground truth of `images` images, two categories, and detections near it (some missed, some wrong)."""
    rng = np.random.default_rng(seed)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    results = []
    for image_id in range(1, images + 1):
        coco["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": 100, "height": 100})
        for _ in range(rng.integers(1, 4)):
            x, y, w, h = (float(v) for v in rng.uniform([0, 0, 10, 10], [50, 50, 40, 40]))
            category = int(rng.integers(1, 3))
            coco["annotations"].append(
                {"id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": category,
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
            if rng.random() < 0.8:
                shift = rng.normal(0, 3, 4)
                results.append(
                    {"image_id": image_id, "category_id": category, "score": round(float(rng.random()), 5),
                     "bbox": [x + shift[0], y + shift[1], max(1.0, w + shift[2]), max(1.0, h + shift[3])]}
                )  # fmt: skip
        results.append({"image_id": image_id, "category_id": 1, "score": 0.1, "bbox": [60.0, 60.0, 20.0, 20.0]})
    return coco, results


def test_unit_weights_give_cocoevals_map_exactly_and_doubling_every_image_changes_nothing():
    coco, results = synthetic_coco()
    evaluation = per_image_evaluation(coco, results)
    assert weighted_map(evaluation) == coco_map(coco, results)["mAP"]
    assert weighted_map(evaluation, np.full(12, 2.0)) == pytest.approx(coco_map(coco, results)["mAP"])
    # weight 0 is the image left out: the mAP of the other eleven, as COCOeval scores them
    kept = {**coco, "images": coco["images"][1:], "annotations": [a for a in coco["annotations"] if a["image_id"] != 1]}
    weights = np.ones(12)
    weights[0] = 0
    assert weighted_map(evaluation, weights) == pytest.approx(
        coco_map(kept, [r for r in results if r["image_id"] != 1])["mAP"], abs=1e-12
    )


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.27753], abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx([0.72247, 1.0], abs=1e-5)
    assert wilson_interval(50, 100) == pytest.approx([0.40383, 0.59617], abs=1e-5)
    assert wilson_interval(0, 0) == [0.0, 1.0]


def test_the_subset_is_seeded_in_val_order_and_the_same_for_every_caller():
    coco, _ = synthetic_coco(images=30)
    first, again = (val_subset(coco, {"num_images": 7, "seed": 3}) for _ in range(2))
    ids = [image["id"] for image in first.images]
    assert ids == [image["id"] for image in again.images] and ids == sorted(ids) and len(ids) == 7
    assert ids != [image["id"] for image in val_subset(coco, {"num_images": 7, "seed": 4}).images]
    assert first.block() == {"images": 7, "of": 30, "seed": 3} and first.is_subset
    ground_truth = first.coco(coco)
    assert {a["image_id"] for a in ground_truth["annotations"]} <= set(ids)
    assert not val_subset(coco, {"num_images": None, "seed": 0}).is_subset


def test_more_images_than_the_split_holds_warns_in_one_line_and_uses_all(caplog):
    coco, _ = synthetic_coco(images=5)
    with caplog.at_level(logging.WARNING):
        chosen = val_subset(coco, {"num_images": 20, "seed": 0})
    assert chosen.images == coco["images"] and not chosen.is_subset
    (record,) = caplog.records
    assert record.getMessage() == "verify.num_images: 20 but the val split has 5 images: all 5 are used"


def test_shards_are_runs_of_consecutive_images_and_a_gather_refuses_a_missing_one():
    subset = ValSubset([{"id": i} for i in range(10)], 10, 0)
    shards = [[image["id"] for image in subset.shard(4, index)] for index in range(subset.shard_count(4))]
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and subset.shard(None, 0) == subset.images
    check_shards(shards, subset, ["a", "b", "c"])
    with pytest.raises(ShardError, match=r"hold 8 of the 10 images verification runs on: a shard is missing"):
        check_shards(shards[:2], subset, ["a", "b"])
    with pytest.raises(ShardError, match=r"^c holds images \[8, 9\]\.\.\. where the gather expects image 4 on"):
        check_shards([shards[0], shards[2], shards[1]], subset, ["a", "c", "b"])


@pytest.mark.parametrize("key", ["num_images", "shard_images"])
@pytest.mark.parametrize("value", [0, -3])
def test_no_images_or_negative_is_refused_before_any_job_naming_the_key(key, value):
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["verify"][key] = value
    with pytest.raises(ConfigError, match=rf"verify\.{key}: {value} is less than the minimum of 1"):
        check_config(config, workdir=ROOT)


def test_a_shard_size_that_splits_a_batch_is_refused_naming_the_key():
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["verify"]["shard_images"] = 12
    config["reference"] = {"batch_size": 4}
    with pytest.raises(ConfigError, match=r"verify\.shard_images: 12 is not a multiple of verify\.batch_size 8, "):
        check_config(config, workdir=ROOT)


# --- the demo on 20 of its 100 val images


def subset_run_in(workdir: Path) -> Path:
    """completed_run (cloned into `workdir`) again with verify.num_images: 20: the reference, verify and the report
    rerun."""
    overlay = config_overlay(workdir, "subset.yaml", "verify:\n  num_images: 20\n")
    snakemake(workdir, *(f"results/verify/{p}.json" for p in PRECISIONS), "results/report.html", *overlay)
    return workdir


@pytest.fixture(scope="module")
def both_runs(completed_run, tmp_path_factory) -> tuple[Path, tuple[Path, list[str]]]:
    """subset_run and sharded_run side by side (each a Snakemake process of its own; the threads only wait): on two
    cores about 20 s less than one after the other."""
    subset_dir = clone(completed_run, tmp_path_factory.mktemp("subset") / "run")
    sharded_dir = clone(completed_run, tmp_path_factory.mktemp("sharded") / "run")
    with ThreadPoolExecutor(2) as pool:
        subset, sharded = pool.submit(subset_run_in, subset_dir), pool.submit(sharded_run_in, sharded_dir)
        return subset.result(), sharded.result()


@pytest.fixture(scope="module")
def subset_run(both_runs) -> Path:
    return both_runs[0]


@pytest.fixture(scope="module")
def sharded_run(both_runs) -> tuple[Path, list[str]]:
    return both_runs[1]


def test_twenty_of_a_hundred_images_give_intervals_that_hold_the_full_sets_values(completed_run, subset_run):
    for precision in PRECISIONS:
        full = json.loads((completed_run / f"results/verify/{precision}.json").read_text())
        part = json.loads((subset_run / f"results/verify/{precision}.json").read_text())
        assert "subset" not in full and "intervals" not in full
        assert part["subset"] == {"images": 20, "of": 100, "seed": 0} and part["images"] == 20
        intervals = part["intervals"]
        low, high = intervals["match_recall"]["interval"]
        assert low <= full["match_recall"] <= high, (precision, intervals, full["match_recall"])
        low, high = intervals["map_drop_points"]["interval"]
        assert low <= full["map_drop_points"] <= high, (precision, intervals, full["map_drop_points"])
    metrics = json.loads((subset_run / "results/reference/metrics.json").read_text())
    assert metrics["subset"] == {"images": 20, "of": 100, "seed": 0} and metrics["images"] == 20
    page = (subset_run / "results/report.html").read_text()
    assert "20 of 100 val images (seeded subset, seed 0)" in page and "interval" in page


SHARDED_PRECISION = "int8"
SUBSET_FILES = (
    "reference/detections.json",
    "reference/metrics.json",
    "verify/int8.json",
    "verify/int8_detections.json",
)


def sharded_run_in(workdir: Path) -> tuple[Path, list[str]]:
    """subset_run's int8 verdict again in shards of 16 images (16 + 4: two batches of 8, then one of 4, as one job
    batches them), every job through the cluster-generic executor, in completed_run cloned into `workdir`:
    (workdir, the rule of each job submitted)."""
    (workdir / "tests").mkdir()
    shutil.copy2(ROOT / "tests/submit_local.sh", workdir / "tests")
    overlay = config_overlay(workdir, "sharded.yaml", "verify:\n  num_images: 20\n  shard_images: 16\n")
    submitted = workdir / "submitted.txt"
    snakemake(
        workdir,
        *cluster_generic(submitted),
        # the checkpoint by name, as a run over finished results must ask for it (README, "Large val sets")
        "results/data/verify_shards.json",
        f"results/verify/{SHARDED_PRECISION}.json",
        *overlay,
    )
    return workdir, sorted(line.split()[1] for line in submitted.read_text().splitlines())


def test_shards_run_as_separate_jobs_and_gather_into_the_unsharded_files_byte_for_byte(subset_run, sharded_run):
    workdir, rules = sharded_run
    shards = json.loads((workdir / "results/data/verify_shards.json").read_text())
    assert shards == {"images": 20, "of": 100, "seed": 0, "shard_images": 16, "shards": 2}
    assert rules == [
        "reference",
        "reference_shard",
        "reference_shard",
        "verify",
        "verify_shard",
        "verify_shard",
        "verify_shards",
    ]
    for path in SUBSET_FILES:
        assert (workdir / "results" / path).read_bytes() == (subset_run / "results" / path).read_bytes(), path


def test_the_verify_gather_refuses_a_missing_shard_and_shards_that_ran_at_other_levels(tmp_path):
    from trtflow.run.verify import Thresholds, VerifyError, verify_shards

    coco, results = synthetic_coco(images=6)
    (tmp_path / "val.json").write_text(json.dumps(coco))
    (tmp_path / "reference.json").write_text(json.dumps(results))
    (tmp_path / "metrics.json").write_text(json.dumps(coco_map(coco, results)))
    ran = {"precision": "fp32", "executor": "tensorrt-network", "verified_level": "network-definition"}

    def shard(ids, level="network-definition"):
        return {
            "images": ids,
            "ran": {**ran, "verified_level": level},
            "detections": [r for r in results if r["image_id"] in ids],
        }

    settings = dict(
        val_json=tmp_path / "val.json",
        subset={"num_images": None, "seed": 0, "shard_images": 4},
        reference_detections=tmp_path / "reference.json",
        reference_metrics=tmp_path / "metrics.json",
        thresholds=Thresholds(min_match_recall=1.0),
    )
    result, deployed = verify_shards("fp32", [shard([1, 2, 3, 4]), shard([5, 6])], sources=["s0", "s1"], **settings)
    assert result["passed"] and deployed == results and "subset" not in result
    with pytest.raises(ShardError, match=r"^the shards \['s0'\] hold 4 of the 6 images"):
        verify_shards("fp32", [shard([1, 2, 3, 4])], sources=["s0"], **settings)
    with pytest.raises(VerifyError, match=r"fp32: the shards \['s1'\] ran another executor, level or software"):
        verify_shards("fp32", [shard([1, 2, 3, 4]), shard([5, 6], "deployment-form")], sources=["s0", "s1"], **settings)
