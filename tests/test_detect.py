"""`trtflow detect`: a plan on image files, with the preprocessing, postprocessing and classes of its JSON.

On this CPU machine the plan cannot run, so `trtflow detect --fallback` runs the executor verify ran; on the
shared completed run its detections on the val images are verify's, entry for entry.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import cv2
import pytest
import yaml

from test_executors import POSTPROCESS, preprocess_settings
from test_images import picture, write_image
from test_plan_metadata import file_record, write_plan
from test_verify import IMPOSSIBLE_OUTPUTS, fixed_executor, no_gpu
from trtflow import cli
from trtflow.config import plan_config_differences
from trtflow.formats.plan_metadata import FORMAT, VERSION, metadata_path
from trtflow.formats.usage import classes_of

TRTFLOW = Path(sys.executable).with_name("trtflow")  # the console script of [project.scripts]
RESULT_KEYS = ("image_id", "category_id", "bbox", "score")  # a COCO results entry


def trtflow(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """The console command, with the one CPU thread Snakemake gave rule verify (`threads: 1` sets
    OMP_NUM_THREADS=1): float sums split over other thread counts can differ in a score's fifth decimal."""
    return subprocess.run(
        [str(TRTFLOW), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def val_images(completed_run) -> list[dict]:
    """The completed run's val split: its images' entries, in order."""
    return json.loads((completed_run / "results/data/val.json").read_text())["images"]


@pytest.fixture(scope="module")
def both_detects(completed_run, val_images, tmp_path_factory) -> tuple[Path, Path, Future, Future]:
    """`detect --fallback` on the val images twice, side by side (one CPU thread each, as verify): in the completed
    run (`detected`), and in a folder holding only the plan, its JSON and its network record (`plan_only`)."""
    out, plan_only = tmp_path_factory.mktemp("detect"), tmp_path_factory.mktemp("plan_only")
    for name in ("engine_fp32.plan", "engine_fp32.json", "engine_fp32.network.safetensors"):
        shutil.copy2(completed_run / "results" / name, plan_only / name)
    files = [image["file_name"] for image in val_images]
    with ThreadPoolExecutor(2) as pool:  # the threads only wait
        in_run = pool.submit(
            trtflow,
            completed_run,
            "detect",
            "--engine",
            "results/engine_fp32.plan",
            *files,
            "--fallback",
            "--out",
            str(out / "dets.json"),
            "--draw",
            str(out / "drawn"),
        )
        paths = [str(completed_run / name) for name in files]
        alone = pool.submit(
            trtflow, plan_only, "detect", "--engine", "engine_fp32.plan", *paths, "--fallback", "--out", "dets.json"
        )
    return out, plan_only, in_run, alone


@pytest.fixture(scope="module")
def detected(both_detects) -> tuple[dict, subprocess.CompletedProcess, Path]:
    out, _, result, _ = both_detects
    result = result.result()
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "dets.json").read_text()), result, out


def test_detect_with_fallback_gives_verifys_detections(completed_run, detected, val_images):
    output, result, _ = detected
    assert "warning" not in result.stderr  # the plan is the run's own configuration
    verify = json.loads((completed_run / "results/verify/fp32.json").read_text())
    expected = json.loads((completed_run / "results/verify/fp32_detections.json").read_text())
    # the executor verify ran, named in the output and on the console
    assert output["executor"] == verify["executor"] and output["engine_executed"] is verify["engine_executed"] is False
    assert f"by {verify['executor']} (the engine did not run here)" in result.stderr
    # detect numbers the images 1.. in the order given: map them to the val ids
    val_ids = {image["file_name"]: image["id"] for image in val_images}
    ids = {image["id"]: val_ids[image["file_name"]] for image in output["images"]}
    # verify's file also holds the fields COCO scoring adds (id, area, ...): compare the detections themselves
    expected = [{key: entry[key] for key in RESULT_KEYS} for entry in expected]
    assert [{**d, "image_id": ids[d["image_id"]]} for d in output["detections"]] == expected
    assert len(expected) > 100


def test_a_plan_with_only_its_json_and_network_record_suffices_for_fallback(completed_run, val_images, both_detects):
    """A folder holding only the plan, its JSON and its network record: the ONNX and head weights are needed only for
    the deployment-form rung, which is left out with its reason; the detections are still verify's."""
    _, plan_only, _, result = both_detects
    result = result.result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the deployment-form rung of --fallback is left out: the features ONNX" in result.stderr
    output = json.loads((plan_only / "dets.json").read_text())
    assert output["verified_level"] == "network-definition"
    val_ids = {str(completed_run / image["file_name"]): image["id"] for image in val_images}
    ids = {image["id"]: val_ids[image["file_name"]] for image in output["images"]}
    expected = json.loads((completed_run / "results/verify/fp32_detections.json").read_text())
    expected = [{key: entry[key] for key in RESULT_KEYS} for entry in expected]
    assert [{**d, "image_id": ids[d["image_id"]]} for d in output["detections"]] == expected
    assert len(expected) > 100


def test_detect_draws_each_image(detected, completed_run):
    output, _, out = detected
    first = output["images"][0]
    drawn = cv2.imread(str(out / "drawn" / f"{Path(first['file_name']).stem}.png"))
    original = cv2.imread(str(completed_run / first["file_name"]))
    assert drawn.shape == original.shape and (drawn != original).any(axis=2).mean() > 0.005
    assert len(list((out / "drawn").glob("*.png"))) == len(output["images"])


def test_detect_without_fallback_says_the_plan_cannot_run_here(completed_run, val_images):
    image = val_images[0]["file_name"]
    result = trtflow(completed_run, "detect", "--engine", "results/engine_fp32.plan", image)
    assert result.returncode == 1
    assert "cannot run on this machine; pass --fallback" in result.stderr and "no CUDA GPU" in result.stderr


OTHER_CHECKPOINT = b"another model's bytes"


def test_a_plan_of_another_configuration_than_its_runs_config_yaml_is_named_with_the_differences(
    completed_run, val_images, tmp_path
):
    """The run's config.yaml changed after the plan was built (another input size, threshold and checkpoint):
    detect still uses what the plan records, and says in one line which keys differ."""
    (tmp_path / "results").mkdir()
    for suffix in (".plan", ".json", ".network.safetensors"):
        shutil.copy2(completed_run / f"results/engine_fp32{suffix}", tmp_path / f"results/engine_fp32{suffix}")
    other_checkpoint = tmp_path / "other.safetensors"
    other_checkpoint.write_bytes(OTHER_CHECKPOINT)
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"input": {"height": 256}, "checkpoint": "other.safetensors"},
                "postprocess": {"score_thresh": 0.3},
            }
        )
    )
    result = trtflow(tmp_path, "detect", "--engine", "results/engine_fp32.plan", val_images[0]["file_name"])
    (warning,) = [line for line in result.stderr.splitlines() if "warning" in line]
    recorded = json.loads((completed_run / "results/engine_fp32.json").read_text())
    assert warning == (
        "trtflow detect: warning: results/engine_fp32.plan was built for another configuration than the config.yaml "
        "of its run (model.input: the plan height 320, width 320, config.yaml height 256, width 320; "
        "postprocess.score_thresh: the plan 0.05, config.yaml 0.3; model.checkpoint: the plan sha256 "
        f"{recorded['sources']['checkpoint_sha256'][:12]}, config.yaml other.safetensors (sha256 "
        f"{hashlib.sha256(OTHER_CHECKPOINT).hexdigest()[:12]})): detect uses what the plan records; rebuild "
        "it to use the current one (snakemake results/engine_fp32.plan)"
    )


def test_only_a_plan_under_results_beside_a_config_yaml_is_compared(completed_run, tmp_path):
    recorded = json.loads((completed_run / "results/engine_fp32.json").read_text())
    assert plan_config_differences(completed_run / "results/engine_fp32.plan", recorded) == []
    (tmp_path / "config.yaml").write_text("postprocess: {score_thresh: 0.3}\n")
    assert plan_config_differences(tmp_path / "engine_fp32.plan", recorded) == []  # not under results/
    assert plan_config_differences(tmp_path / "results/other/engine_fp32.plan", recorded) == []  # no such model
    (tmp_path / "config.yaml").write_text("models: {other: {}}\npostprocess: {score_thresh: 0.3}\n")
    assert plan_config_differences(tmp_path / "results/other/engine_fp32.plan", recorded) == [
        "postprocess.score_thresh: the plan 0.05, config.yaml 0.3"
    ]
    (tmp_path / "config.yaml").write_text("postprocess: {score_thresh: high}\n")  # invalid: the pipeline says so
    assert plan_config_differences(tmp_path / "results/engine_fp32.plan", recorded) == []


def test_detect_skips_a_corrupt_image_naming_it(completed_run, val_images, tmp_path):
    """The corrupt file is named with read_image's reason and left out; the good one's detections are written."""
    good = completed_run / val_images[0]["file_name"]
    ok, encoded = cv2.imencode(".jpg", cv2.imread(str(good)))
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(encoded.tobytes()[: len(encoded) // 2])  # cut: no end-of-image marker
    result = trtflow(
        completed_run,
        "detect",
        "--engine",
        "results/engine_fp32.plan",
        "--fallback",
        str(good),
        str(corrupt),
        "--out",
        str(tmp_path / "dets.json"),
    )
    assert result.returncode == 1
    assert f"trtflow detect: skipped {corrupt}: is a truncated JPEG" in result.stderr, result.stderr[-2000:]
    output = json.loads((tmp_path / "dets.json").read_text())
    assert output["images"] == [{"id": 1, "file_name": str(good)}] and output["detections"]
    assert [entry["file_name"] for entry in output["skipped"]] == [str(corrupt)]


def plan_with_usage(folder: Path) -> Path:
    """An fp32 plan file (not a plan) whose JSON says how to use it, and the files its `sources` name."""
    sources = {
        "onnx": file_record(folder / "results/onnx/features.onnx"),
        "checkpoint_sha256": None,
        "head_weights": file_record(folder / "results/weights/manifest.json"),
        "calibration_table": None,
        "plugin_library": None,
    }
    return write_plan(
        folder / "results/engine_fp32.plan",
        sources=sources,
        preprocess=preprocess_settings(),
        postprocess=POSTPROCESS,
        classes=classes_of([{"id": i, "name": f"class{i}"} for i in (1, 2, 3)]),
    )


@pytest.mark.parametrize("fault, reason", IMPOSSIBLE_OUTPUTS.values(), ids=IMPOSSIBLE_OUTPUTS)
def test_detect_refuses_an_impossible_output_with_verifys_reason(tmp_path, monkeypatch, capsys, fault, reason):
    """The executor gives what no head can (label 0, a label past the classes, NaN score, inf box, more
    detections than rows): `trtflow detect` says so in one line, the same reason verify gives, and writes nothing."""
    plan = plan_with_usage(tmp_path)
    files = [str(write_image(tmp_path / f"photo_{n}.png", picture(seed=n))) for n in (1, 2)]
    monkeypatch.setattr(
        "trtflow.run.detect.choose_executor", lambda precision, plan, **kwargs: no_gpu(fixed_executor(fault))
    )
    out = tmp_path / "dets.json"
    status = cli.main(["detect", "--engine", str(plan), *files, "--fallback", "--out", str(out)])
    stderr = capsys.readouterr().err
    assert status == 1 and not out.exists() and "Traceback" not in stderr
    assert stderr.splitlines()[-1] == (
        f"trtflow detect: DetectError: fixed-outputs (level network-definition) gave an impossible output: "
        f"{files[1]}: {reason}"
    ), stderr[-2000:]


def test_detect_refuses_a_plan_json_of_a_newer_format_naming_it(tmp_path, capsys):
    """The plan's JSON is read through trtflow.formats.plan_metadata: one written by a newer trtflow is refused, naming the
    file, the version found, the version read here and the fix, before any image is read."""
    plan = plan_with_usage(tmp_path)
    path = metadata_path(plan)
    path.write_text(path.read_text().replace(f"{FORMAT}/{VERSION}", f"{FORMAT}/{VERSION + 1}", 1))
    status = cli.main(["detect", "--engine", str(plan), str(tmp_path / "absent.png"), "--fallback"])
    assert status == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"trtflow detect: PlanMetadataError: {path} has format '{FORMAT}/{VERSION + 1}', this trtflow reads "
        f"{FORMAT}/{VERSION} (the file was written by a newer trtflow); rebuild the engine (snakemake -f {plan})"
    )


def test_detect_takes_folders_and_globs_skips_a_bad_file_and_writes_coco_results(tmp_path, monkeypatch, capsys):
    """A folder and a glob name the images; a corrupt one among them is named on the console and left out, the rest
    detected on (exit status 1); `--score-thresh` leaves out the lower-scoring box in every output, and
    `--coco-results` is the list pycocotools' `loadRes` takes."""
    from pycocotools.coco import COCO  # not at the top: only this test reads the results back through pycocotools

    plan = plan_with_usage(tmp_path)
    folder = [write_image(tmp_path / "folder" / f"photo_{n}.png", picture(seed=n)) for n in (1, 2)]
    globbed = write_image(tmp_path / "more" / "photo_3.png", picture(seed=3))
    broken = tmp_path / "folder" / "photo_0.png"
    broken.write_bytes(b"not an image")
    monkeypatch.setattr(
        "trtflow.run.detect.choose_executor", lambda precision, plan, **kwargs: no_gpu(fixed_executor())
    )
    out, coco_results, drawn = tmp_path / "dets.json", tmp_path / "coco.json", tmp_path / "drawn"
    status = cli.main(
        ["detect", "--engine", str(plan), str(tmp_path / "folder"), str(tmp_path / "more" / "*.png"), "--fallback"]
        + ["--score-thresh", "0.8", "--out", str(out), "--coco-results", str(coco_results), "--draw", str(drawn)]
    )
    stderr = capsys.readouterr().err
    assert status == 1
    assert f"trtflow detect: skipped {broken}: " in stderr and "1 inputs skipped" in stderr, stderr[-2000:]
    output = json.loads(out.read_text())
    assert [image["file_name"] for image in output["images"]] == [str(path) for path in (*folder, globbed)]
    assert [entry["file_name"] for entry in output["skipped"]] == [str(broken)]
    seconds = output["seconds"]  # from reading the images to the detections: positive, a third of it per image
    assert seconds["detect"] > 0 and seconds["per_image"] == pytest.approx(seconds["detect"] / 3, abs=1e-3)
    assert (
        f"3 detections on 3 images by fixed-outputs (the engine did not run here) in {seconds['detect']:.1f} s ("
        in stderr
    )
    # the fixed head gives scores 0.9 and 0.7 on each image: only the 0.9 box is at or above 0.8
    assert [(d["image_id"], d["score"]) for d in output["detections"]] == [(1, 0.9), (2, 0.9), (3, 0.9)]
    ground_truth = COCO()
    ground_truth.dataset = {"images": output["images"], "categories": output["categories"], "annotations": []}
    ground_truth.createIndex()
    loaded = ground_truth.loadRes(str(coco_results))
    assert sorted((a["image_id"], a["score"]) for a in loaded.anns.values()) == [(1, 0.9), (2, 0.9), (3, 0.9)]
    assert sorted(path.name for path in drawn.glob("*.png")) == ["photo_1.png", "photo_2.png", "photo_3.png"]


def test_detect_refuses_a_batch_size_below_one_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["detect", "--engine", "results/engine_fp32.plan", "photo.png", "--batch-size", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "trtflow detect: error: argument --batch-size: '0' is not a whole number of at least 1 "
        "(see trtflow detect --help)\n"
    )


def test_help_and_version_answer_without_loading_torch():
    """`trtflow detect --help` and `trtflow --version` parse arguments only: torch, OpenCV and the executors load
    once the arguments are checked."""
    code = (
        "import sys\nfrom trtflow import cli\n"
        "for argv in (['detect', '--help'], ['--version']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "print([name for name in ('torch', 'cv2', 'trtflow.run.detect') if name in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "usage: trtflow detect" in result.stdout
    assert result.stdout.splitlines()[-2:] == [f"trtflow {version('trtflow')}", "[]"]


def test_a_missing_plan_is_named_with_the_precisions_the_workflow_builds(tmp_path, capsys):
    plan = tmp_path / "results/engine_bf16.plan"
    assert cli.main(["detect", "--engine", str(plan), "photo.png"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"trtflow detect: DetectError: the plan {plan} does not exist; build it with the pipeline (snakemake -f "
        "results/engine_<precision>.plan, <precision> one of fp32, fp16, int8, fp8)"
    )
