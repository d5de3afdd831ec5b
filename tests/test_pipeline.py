"""The demo pipeline end to end: what the default target produced (run once, tests/pipeline_fixture.py).

Reruns and parallel runs of the same completed run are tested in test_reruns.py and test_parallel.py."""
import json

pytest_plugins = ["pipeline_fixture"]


def test_demo_reference_reaches_the_map_bar(completed_run):
    metrics = json.loads((completed_run / "results/reference/metrics.json").read_text())
    assert metrics["images"] == 100 and metrics["mAP"] >= 0.60


def test_demo_onnx_parity_passes(completed_run):
    parity = json.loads((completed_run / "results/onnx/parity.json").read_text())
    assert parity["passed"] and parity["max_abs"] <= 1e-4 * max(o["ref_max"] for o in parity["outputs"].values())


def test_demo_int8_simulation_keeps_the_map(completed_run):
    accuracy = json.loads((completed_run / "results/calib/accuracy.json").read_text())
    assert accuracy["fp32_mAP"] >= 0.60 and accuracy["delta"] <= 0.005  # at most 0.5 mAP points lost


def test_demo_engines_are_real_plans_with_metadata(completed_run):
    for precision in ("fp32", "fp16", "int8"):
        plan = completed_run / f"results/engine_{precision}.plan"
        metadata = json.loads((completed_run / f"results/engine_{precision}.json").read_text())
        assert metadata["precision"] == precision and metadata["plan_bytes"] == plan.stat().st_size > 1_000_000
        assert [o["name"] for o in metadata["outputs"]] == ["num_detections", "boxes", "scores", "classes"]


def test_demo_verify_names_its_executor_and_meets_the_thresholds(completed_run):
    for precision in ("fp32", "fp16", "int8"):
        verdict = json.loads((completed_run / f"results/verify/{precision}.json").read_text())
        assert verdict["passed"] and verdict["images"] == 100
        if not verdict["engine_executed"]:
            assert verdict["executor"] == "onnxruntime+static-head" and "cannot run" in verdict["reason"]
    assert json.loads((completed_run / "results/verify/fp32.json").read_text())["match_recall"] >= 0.99


def test_demo_report_links_every_stage(completed_run):
    html = (completed_run / "results/report.html").read_text()
    assert all(word in html for word in ("parity", "fp32", "fp16", "int8", "data:image/png;base64"))
