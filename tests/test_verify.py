"""trtflow.run.verify: thresholds, and the stage end to end on CPU (the engine refused for want of a GPU, the
deployment-form reference verified instead); its matching is tests/test_matching.py's."""

import html
import json
from pathlib import Path

import numpy as np
import pytest

from test_executors import IMAGE_SIZES, POSTPROCESS, deployment, preprocess_settings, small_coco  # noqa: F401
from test_plan_metadata import RTX_TARGETS, write_plan
from trtflow.common.metrics import coco_map
from trtflow.run.executors import Executor, ExecutorChoice, head_detections
from trtflow.run.report import Artifact, precision_section, stage_rows
from trtflow.run.verify import Thresholds, VerifyError, run_verify, verify_detections


def test_thresholds_name_each_failure():
    result = {"match_recall": 0.985, "match_precision": 0.999, "max_abs_dscore": 0.0123, "map_drop_points": 0.7}
    assert Thresholds(min_match_recall=0.99).failures(result) == ["match_recall 0.9850 < 0.99"]
    assert Thresholds(max_abs_dscore=0.01).failures(result) == ["max_abs_dscore 0.01230 > 0.01"]
    assert Thresholds(max_map_drop_points=0.5).failures(result) == ["mAP drop 0.70 points > 0.5"]
    assert Thresholds(min_match_precision=0.9995, max_abs_dscore=0.001).failures(result) == [
        "match_precision 0.9990 < 0.9995",
        "max_abs_dscore 0.01230 > 0.001",
    ]
    assert (
        Thresholds(
            min_match_recall=0.98, min_match_precision=0.99, max_abs_dscore=0.02, max_map_drop_points=1
        ).failures(result)
        == []
    )
    # nothing matched: no |Δscore| to bound (recall, when set, fails instead)
    assert Thresholds(max_abs_dscore=0.01).failures({**result, "max_abs_dscore": None}) == []
    assert Thresholds.from_config(None) == Thresholds()


# --------------------------------------------------------------------------- the stage on a tiny detector


def plan_for_no_gpu_here(folder: Path) -> Path:
    """An fp32 TensorRT-RTX plan file and its metadata: verify refuses it on a machine without a GPU, before
    reading its bytes (which are not a plan)."""
    return write_plan(folder / "engine_fp32.plan", b"not run", compute_capabilities=RTX_TARGETS)


@pytest.mark.needs_no_cuda
def test_run_verify_on_cpu_names_the_executor_and_why_not_the_engine(deployment, tmp_path):
    """No GPU here: the engine is refused, the deployment-form reference is verified, the JSON says both."""

    from trtflow.common.metrics import coco_map
    from trtflow.run.detection_loop import detect_dataset
    from trtflow.run.verify import run_verify

    plan = plan_for_no_gpu_here(tmp_path)
    detections = detect_dataset(
        deployment.torchvision, deployment.coco, deployment.preprocess, deployment.postprocess, batch_size=2
    )
    reference, metrics = tmp_path / "reference.json", tmp_path / "reference_metrics.json"
    reference.write_text(json.dumps(detections))
    metrics.write_text(json.dumps(coco_map(deployment.coco, detections)))
    out = tmp_path / "verify/fp32.json"
    run_verify(
        "fp32",
        plan=plan,
        onnx=deployment.onnx,
        weights_dir=deployment.weights,
        val_json=deployment.coco,
        reference_detections=reference,
        reference_metrics=metrics,
        preprocess=deployment.preprocess,
        postprocess=deployment.postprocess,
        thresholds=Thresholds(min_match_recall=0.99),
        settings={"batch_size": 2},
        out_json=out,
        detections_out=tmp_path / "verify/fp32_detections.json",
    )
    result = json.loads(out.read_text())
    assert result["executor"] == "onnxruntime+static-head" and result["engine_executed"] is False
    assert result["verified_level"] == "deployment-form" and "neither the plan nor" in result["unverified"]
    assert "no CUDA GPU is visible" in result["reason"]
    assert result["executor_details"]["providers"] == ["CPUExecutionProvider"]
    assert result["images"] == deployment.images and result["reference_detections"] > 0
    assert result["match_recall"] >= 0.99 and result["passed"]
    assert abs(result["mAP"] - result["reference_mAP"]) <= 0.01


def test_run_verify_fails_below_enforced_thresholds_only(deployment, tmp_path):
    from trtflow.run.verify import VerifyError, run_verify

    empty = tmp_path / "reference.json"
    empty.write_text("[]")  # every deployed detection is then unmatched: match_precision 0
    (tmp_path / "metrics.json").write_text(json.dumps({"mAP": 0.0, "mAP50": 0.0}))
    kwargs = dict(
        plan=tmp_path / "missing.plan",
        onnx=deployment.onnx,
        weights_dir=deployment.weights,
        val_json=deployment.coco,
        reference_detections=empty,
        reference_metrics=tmp_path / "metrics.json",
        preprocess=deployment.preprocess,
        postprocess=deployment.postprocess,
        thresholds=Thresholds(min_match_precision=0.9),
        settings={"batch_size": 2},
        detections_out=tmp_path / "detections.json",
    )
    with pytest.raises(
        VerifyError,
        match=r"fp16 \(onnxruntime\+static-head, level deployment-form\) fails verification: match_precision 0",
    ):
        run_verify("fp16", out_json=tmp_path / "enforced.json", **kwargs)
    result = run_verify("fp16", out_json=tmp_path / "recorded.json", enforce=False, **kwargs)
    assert result["passed"] is False and "missing.json not found" in result["reason"]
    assert result["executor_details"]["head_dtype"] == "float16"


# --------------------------------------------------------------------------- impossible outputs


def fixed_head_outputs(images: int) -> dict[str, np.ndarray]:
    """The head's outputs (`trtflow.common.head.HEAD_OUTPUTS`) for `images` images: two detections each of three rows,
    the third row zero as the head pads, labels 1 and 2 of the three classes of `small_coco`."""
    return {
        "num_detections": np.full(images, 2, np.int32),
        "boxes": np.tile(np.array([[8, 8, 40, 30], [20, 10, 60, 50], [0, 0, 0, 0]], np.float32), (images, 1, 1)),
        "scores": np.tile(np.array([0.9, 0.7, 0.0], np.float32), (images, 1)),
        "classes": np.tile(np.array([1, 2, 0], np.int32), (images, 1)),
    }


def second_image(output: str, index, value):
    """A fault: the second image of each batch gets `value` at `index` of `output`."""

    def fault(outputs):
        outputs[output][(1, *index)] = value

    return fault


# (fault, what the reason says of the second image of the data set); the head says (trtflow.common.head, HEAD_OUTPUTS):
# labels 1..C-1 (0 is the background), boxes and scores are finite numbers, num_detections rows hold detections
IMPOSSIBLE_OUTPUTS = {
    "label 0": (
        second_image("classes", (0,), 0),
        "classes[0] is 0, should be a model label in 1..3 (0 is the background)",
    ),
    "label num_classes": (
        second_image("classes", (1,), 4),
        "classes[1] is 4, should be a model label in 1..3 (0 is the background)",
    ),
    "NaN score": (second_image("scores", (1,), np.nan), "scores[1] is nan, should be finite"),
    "inf box": (second_image("boxes", (0, 2), np.inf), "boxes[0] is [8.0, 8.0, inf, 30.0], should be finite"),
    "more detections than rows": (
        second_image("num_detections", (), 4),
        "num_detections is 4, should be 0..3 (the rows of boxes, scores and classes)",
    ),
}


def fixed_executor(fault=None) -> Executor:
    """A deliberately wrong network, built here outside the code under test: the fixed head outputs with `fault`
    applied, read as every head executor reads them."""

    def detect(batch: np.ndarray):
        outputs = fixed_head_outputs(len(batch))
        if fault is not None:
            fault(outputs)
        return head_detections(outputs)

    return Executor("fixed-outputs", detect)


@pytest.fixture(scope="module")
def fixed_case(tmp_path_factory) -> dict:
    """Six images of three classes, and as their reference the fixed executor's detections without a fault."""
    from trtflow.run.detection_loop import detect_dataset

    folder = tmp_path_factory.mktemp("fixed")
    val = folder / "val.json"
    val.write_text(json.dumps(small_coco(folder, IMAGE_SIZES)))
    preprocess = preprocess_settings()
    reference = detect_dataset(fixed_executor(), val, preprocess, POSTPROCESS, batch_size=2)
    (folder / "reference.json").write_text(json.dumps(reference))
    (folder / "metrics.json").write_text(json.dumps(coco_map(val, reference)))
    return dict(
        val_json=val,
        reference_detections=folder / "reference.json",
        reference_metrics=folder / "metrics.json",
        preprocess=preprocess,
        postprocess=POSTPROCESS,
    )


def second_file(case: dict) -> str:
    """The file of the data set's second image, the first one a fault reaches."""
    return json.loads(case["val_json"].read_text())["images"][1]["file_name"]


def no_gpu(executor: Executor) -> ExecutorChoice:
    """What the ladder chooses where the engine is refused for want of a GPU and the network definition runs."""
    return ExecutorChoice(executor, "network-definition", ("no CUDA GPU is visible",))


def test_the_fixed_outputs_pass_verify(fixed_case):
    """The control: without a fault the fixed outputs are possible, and verify matches them to themselves."""
    result, deployed = verify_detections(
        "fp32", no_gpu(fixed_executor()), thresholds=Thresholds(min_match_recall=1.0), batch_size=2, **fixed_case
    )
    assert result["passed"] and result["failures"] == [] and len(deployed) == 2 * len(IMAGE_SIZES)
    assert result["match_recall"] == result["match_precision"] == 1.0 and result["max_abs_dscore"] == 0.0


@pytest.mark.parametrize("fault, reason", IMPOSSIBLE_OUTPUTS.values(), ids=IMPOSSIBLE_OUTPUTS)
def test_an_impossible_output_is_a_failed_verdict_naming_it(fixed_case, fault, reason):
    """Labels outside 1..num_classes-1, non-finite boxes or scores, more detections than rows: verify says
    `passed: false` with the reason (image, output, value, what it should be), no traceback."""
    result, deployed = verify_detections(
        "fp32", no_gpu(fixed_executor(fault)), thresholds=Thresholds(min_match_recall=0.99), batch_size=2, **fixed_case
    )
    assert result["passed"] is False and deployed == []
    assert result["failures"] == [f"impossible output: {second_file(fixed_case)}: {reason}"]
    assert result["executor"] == "fixed-outputs" and result["verified_level"] == "network-definition"


@pytest.mark.parametrize("fault, reason", IMPOSSIBLE_OUTPUTS.values(), ids=IMPOSSIBLE_OUTPUTS)
def test_run_verify_records_an_impossible_output_and_enforce_fails_in_one_line(
    fixed_case, tmp_path, monkeypatch, fault, reason
):
    monkeypatch.setattr(
        "trtflow.run.verify.choose_executor", lambda precision, plan, **kwargs: no_gpu(fixed_executor(fault))
    )
    kwargs = dict(
        plan=tmp_path / "engine_fp16.plan",
        onnx=tmp_path / "features.onnx",
        weights_dir=tmp_path,
        thresholds=Thresholds(min_match_recall=0.97),
        settings={"batch_size": 2},
        out_json=tmp_path / "fp16.json",
        detections_out=tmp_path / "fp16_detections.json",
        **fixed_case,
    )
    with pytest.raises(VerifyError) as raised:
        run_verify("fp16", **kwargs)
    assert str(raised.value) == (
        "fp16 (fixed-outputs, level network-definition) fails verification: "
        f"impossible output: {second_file(fixed_case)}: {reason}"
    )
    written = json.loads((tmp_path / "fp16.json").read_text())
    assert written["passed"] is False and reason in written["failures"][0]
    assert json.loads((tmp_path / "fp16_detections.json").read_text()) == []
    result = run_verify("fp16", enforce=False, **kwargs)
    assert result["passed"] is False and reason in result["impossible_output"]
    # the report shows it in place of the numbers there are none of
    (row,) = stage_rows(None, None, None, {}, {"fp16": Artifact("results/verify/fp16.json", result)}, {})
    assert row[2] == f"fixed-outputs (engine did not run): impossible output, {second_file(fixed_case)}: {reason}"
    assert html.escape(reason) in precision_section("fp16", result, None) and "FAILED" in str(row[3])
