"""The demo pipeline end to end, once, in a scratch copy of the workflow (the one slow test)."""
import json
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT

WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "src", "models", "plugins")
TARGETS = ("results/reference/metrics.json", "results/onnx/parity.json")


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
