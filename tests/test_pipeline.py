"""The demo pipeline end to end, once, in a scratch copy of the workflow (the one slow test)."""
import json
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT

WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "src", "models", "plugins")
TARGETS = ("all",)


def snakemake(workdir, *args, check=True):
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=workdir,
                            capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    for name in WORKFLOW_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, workdir / name)
    snakemake(workdir, *TARGETS)
    return workdir


def test_demo_reference_reaches_the_map_bar(demo):
    metrics = json.loads((demo / "results/reference/metrics.json").read_text())
    assert metrics["images"] == 100 and metrics["mAP"] >= 0.60


def test_demo_onnx_parity_passes(demo):
    parity = json.loads((demo / "results/onnx/parity.json").read_text())
    assert parity["passed"] and parity["max_abs"] <= 1e-4 * max(o["ref_max"] for o in parity["outputs"].values())


def test_demo_int8_simulation_keeps_the_map(demo):
    accuracy = json.loads((demo / "results/calib/accuracy.json").read_text())
    assert accuracy["fp32_mAP"] >= 0.60 and accuracy["delta"] <= 0.005  # at most 0.5 mAP points lost


def test_demo_engines_are_real_plans_with_metadata(demo):
    for precision in ("fp32", "fp16", "int8"):
        plan = demo / f"results/engine_{precision}.plan"
        metadata = json.loads((demo / f"results/engine_{precision}.json").read_text())
        assert metadata["precision"] == precision and metadata["plan_bytes"] == plan.stat().st_size > 1_000_000
        assert [o["name"] for o in metadata["outputs"]] == ["num_detections", "boxes", "scores", "classes"]


def test_demo_verify_names_its_executor_and_meets_the_thresholds(demo):
    for precision in ("fp32", "fp16", "int8"):
        verdict = json.loads((demo / f"results/verify/{precision}.json").read_text())
        assert verdict["passed"] and verdict["images"] == 100
        if not verdict["engine_executed"]:
            assert verdict["executor"] == "onnxruntime+static-head" and "cannot run" in verdict["reason"]
    assert json.loads((demo / "results/verify/fp32.json").read_text())["match_recall"] >= 0.99


def test_demo_report_links_every_stage(demo):
    html = (demo / "results/report.html").read_text()
    assert all(word in html for word in ("parity", "fp32", "fp16", "int8", "data:image/png;base64"))


def test_second_run_has_nothing_to_do_quickly(demo):
    started = time.monotonic()
    result = snakemake(demo, *TARGETS)
    assert "Nothing to be done" in result.stdout + result.stderr
    assert time.monotonic() - started <= 2.0 + 3.0  # 2 s for Snakemake itself; the rest is Python start-up in CI


def test_verify_settings_do_not_reexport(demo):
    config = (demo / "config.yaml").read_text()
    edited = demo / "edited.yaml"
    edited.write_text(config + "\nverify:\n  parity_tolerance: 0.001\n")
    plan = snakemake(demo, "-n", *TARGETS, "--configfile", str(edited)).stdout
    assert "rule onnx_parity" in plan and "rule onnx:" not in plan and "rule reference" not in plan
