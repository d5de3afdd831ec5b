"""The demo pipeline end to end: what the default target produced (run once: conftest.completed_run).

Reruns and parallel runs of the same completed run are tested in test_reruns.py and test_parallel.py."""

import json


def test_demo_reference_reaches_the_map_bar(completed_run):
    metrics = json.loads((completed_run / "results/reference/metrics.json").read_text())
    assert metrics["images"] == 100 and metrics["mAP"] >= 0.60


def test_demo_onnx_parity_passes(completed_run):
    parity = json.loads((completed_run / "results/onnx/parity.json").read_text())
    assert parity["passed"] and parity["max_abs"] <= 1e-4 * max(o["ref_max"] for o in parity["outputs"].values())


def test_demo_int8_simulation_keeps_the_map(completed_run):
    accuracy = json.loads((completed_run / "results/calib/accuracy.json").read_text())
    assert accuracy["fp32_mAP"] >= 0.60 and accuracy["int8_delta"] <= 0.005  # at most 0.5 mAP points lost


def test_demo_engines_are_real_plans_with_metadata(completed_run):
    for precision in ("fp32", "fp16", "int8"):
        plan = completed_run / f"results/engine_{precision}.plan"
        metadata = json.loads((completed_run / f"results/engine_{precision}.json").read_text())
        assert metadata["precision"] == precision and metadata["plan_bytes"] == plan.stat().st_size > 1_000_000
        assert [o["name"] for o in metadata["outputs"]] == ["num_detections", "boxes", "scores", "classes"]


def test_demo_verify_names_its_level_and_meets_the_thresholds(completed_run):
    """Where the plans cannot run (no GPU), verify evaluates each plan's TensorRT network definition."""
    verdicts = {
        p: json.loads((completed_run / f"results/verify/{p}.json").read_text()) for p in ("fp32", "fp16", "int8")
    }
    for precision, verdict in verdicts.items():
        assert verdict["passed"] and verdict["images"] == 100
        if not verdict["engine_executed"]:
            assert verdict["verified_level"] == "network-definition" and verdict["executor"] == "tensorrt-network"
            assert "cannot run" in verdict["reason"] and "compilation" in verdict["unverified"]
    assert verdicts["fp32"]["match_recall"] == 1.0 and verdicts["fp32"]["max_abs_dscore"] <= 1e-4
    assert verdicts["fp16"]["match_recall"] >= 0.97
    assert verdicts["int8"]["map_drop_points"] <= verdicts["int8"]["thresholds"]["max_map_drop_points"]


def test_demo_report_links_every_stage(completed_run):
    html = (completed_run / "results/report.html").read_text()
    assert all(word in html for word in ("parity", "fp32", "fp16", "int8", "data:image/png;base64"))
