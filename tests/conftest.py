"""Test markers, registered once, and the fixtures test modules share.

Markers: `pipeline` (runs Snakemake; `make test-fast` leaves these out; set here, by module), `needs_cuda`,
`needs_full_tensorrt` and `needs_snakemake` (skipped, with the reason, where this machine lacks it), and
`needs_no_cuda` (what happens without a GPU: skipped where one is visible).
"""

import copy
import importlib.util

import pytest
import torch
import yaml

pytest.register_assert_rewrite("snakemake_runs")
from snakemake_runs import ROOT, scratch_workflow, snakemake  # noqa: E402  (after the assert-rewrite hook)

MARKERS = {
    "pipeline": "runs Snakemake on the workflow (the shared completed demo run, or runs of its own)",
    "needs_cuda": "needs a CUDA GPU",
    "needs_no_cuda": "shows what happens without a CUDA GPU",
    "needs_full_tensorrt": "needs full TensorRT (not TensorRT-RTX)",
    "needs_snakemake": "needs Snakemake installed (the GPU machine has none)",
}
CUDA = torch.cuda.is_available()
FULL_TENSORRT = importlib.util.find_spec("tensorrt") is not None
SNAKEMAKE = importlib.util.find_spec("snakemake") is not None
MISSING = {  # marker -> why it is skipped here; only the markers whose requirement is missing
    marker: reason
    for marker, missing, reason in (
        ("needs_cuda", not CUDA, "no CUDA GPU is visible here"),
        ("needs_no_cuda", CUDA, "a CUDA GPU is visible: what happens without one cannot be shown here"),
        (
            "needs_full_tensorrt",
            not FULL_TENSORRT,
            "full TensorRT is not installed here (it needs NVIDIA's pip index and a CUDA GPU)",
        ),
        ("needs_snakemake", not SNAKEMAKE, "snakemake is not installed here"),
    )
    if missing
}


def pytest_configure(config):
    for marker, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{marker}: {meaning}")


def runs_snakemake(module) -> bool:
    """Whether a test module uses tests/snakemake_runs.py's helpers."""
    return any(getattr(value, "__module__", None) == "snakemake_runs" for value in vars(module).values())


def pytest_collection_modifyitems(items):
    for item in items:
        if runs_snakemake(item.module) or "completed_run" in item.fixturenames:
            item.add_marker(pytest.mark.pipeline)
        for marker in MISSING.keys() & {mark.name for mark in item.iter_markers()}:
            item.add_marker(pytest.mark.skip(reason=MISSING[marker]))


@pytest.fixture(scope="session")
def completed_run(tmp_path_factory):
    """The default target (reference, parity, plugins, calibration, three engines, verify, report), built once."""
    workdir = scratch_workflow(tmp_path_factory.mktemp("completed_run"))
    snakemake(workdir, timeout=1200)
    return workdir


@pytest.fixture(scope="session")
def default_config() -> dict:
    """config.yaml with the schema's defaults filled in, as the pipeline sees it."""
    from snakemake.utils import validate  # not at the top: the GPU machine runs tests without Snakemake

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    validate(config, str(ROOT / "workflow/schemas/config.schema.yaml"))
    return config


@pytest.fixture
def config(default_config) -> dict:
    return copy.deepcopy(default_config)


@pytest.fixture
def small_model_cfg(config) -> dict:
    """The demo detector at a small input size, for fast tests."""
    return {**config["model"], "input": {"height": 128, "width": 160}}
