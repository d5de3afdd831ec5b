"""Test markers, registered once, and the fixtures test modules share.

Markers: `pipeline` (runs Snakemake or nvcc; `make test-fast` leaves these out; set here on every test that
takes one of PIPELINE_FIXTURES, directly or through its fixtures), `needs_cuda`, `needs_full_tensorrt` and
`needs_snakemake` (skipped, with the reason, where this machine lacks it), and `needs_no_cuda` (what happens
without a GPU: skipped where one is visible).
"""

import copy
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
import yaml

pytest.register_assert_rewrite("snakemake_runs")
import snakemake_runs  # noqa: E402  (after the assert-rewrite hook)
from snakemake_runs import ROOT, scratch_workflow  # noqa: E402

MARKERS = {
    "pipeline": "runs Snakemake or nvcc: takes completed_run, scratch_run or nvcc (conftest sets it)",
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
# the fixtures through which a test runs Snakemake (the shared completed run, a scratch copy of the workflow for
# a run of its own) or compiles with nvcc: a test that takes one, directly or through its fixtures, is `pipeline`
PIPELINE_FIXTURES = ("completed_run", "scratch_run", "nvcc")


def pytest_configure(config):
    for marker, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{marker}: {meaning}")


def pytest_collection_modifyitems(items):
    for item in items:
        if any(name in item.fixturenames for name in PIPELINE_FIXTURES):  # fixturenames: the whole closure
            item.add_marker(pytest.mark.pipeline)
        for marker in MISSING.keys() & {mark.name for mark in item.iter_markers()}:
            item.add_marker(pytest.mark.skip(reason=MISSING[marker]))
    # the tests that take completed_run last, in their order otherwise: the others (those of the same modules too: no
    # module-scoped fixture serves both kinds) run while the completed run builds (pytest_collection_finish starts it)
    items.sort(key=lambda item: "completed_run" in item.fixturenames)


# the completed run, building since the session's tests were known; completed_run waits for it
BACKGROUND: dict[str, snakemake_runs.BackgroundSnakemake] = {}


def start_completed_run(tmp_path_factory) -> snakemake_runs.BackgroundSnakemake:
    workdir = scratch_workflow(tmp_path_factory.mktemp("completed_run") / "run")
    return snakemake_runs.BackgroundSnakemake(workdir, timeout=1200)


def pytest_collection_finish(session):
    """Starts the completed run (the default target: 1.5 to 3 minutes on 2 cores) where a selected test takes
    it: on 2 cores its jobs and the tests that run meanwhile leave each other idle time to use."""
    needed = any("completed_run" in item.fixturenames for item in session.items)
    option = session.config.option
    if needed and not (option.collectonly or option.setupplan):
        BACKGROUND["completed_run"] = start_completed_run(session.config._tmp_path_factory)


def pytest_sessionfinish(session):
    for run in BACKGROUND.values():
        run.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Tell snakemake_runs whether the test about to run (fixtures first) may start Snakemake."""
    snakemake_runs.UNMARKED_TEST = None if item.get_closest_marker("pipeline") else item.nodeid


@pytest.fixture(scope="session")
def completed_run(tmp_path_factory):
    """The default target (reference, parity, plugins, calibration, three engines, verify, report), built once
    (started when the session started, by pytest_collection_finish)."""
    if "completed_run" not in BACKGROUND:  # not started with the session (a test that asks for it by name)
        BACKGROUND["completed_run"] = start_completed_run(tmp_path_factory)
    run = BACKGROUND["completed_run"]
    run.result()
    return run.workdir


@pytest.fixture(scope="session")
def scratch_run(tmp_path_factory):
    """Makes a fresh scratch copy of the workflow (nothing built) for a Snakemake run of a test's own:
    `scratch_run(name, extra=())` copies the workflow's files and the `extra` paths into a new folder."""

    def new_copy(name: str, extra: tuple[str, ...] = ()) -> Path:
        return scratch_workflow(tmp_path_factory.mktemp(name), extra)

    return new_copy


@pytest.fixture(scope="session")
def nvcc() -> str:
    """The path of the CUDA compiler on PATH, for tests that compile with it; they skip where there is none."""
    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc is not on PATH: nothing can be compiled with it here")
    return path


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
