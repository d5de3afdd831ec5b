import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "pipeline: runs Snakemake on the workflow (the shared completed demo run, or "
                                       "runs of its own); `make test-fast` leaves these out")


def runs_snakemake(module) -> bool:
    """Whether a test module uses tests/pipeline_fixture.py (its fixtures or its Snakemake helpers)."""
    helpers = (getattr(value, "__module__", None) for value in vars(module).values())
    return "pipeline_fixture" in getattr(module, "pytest_plugins", ()) or "pipeline_fixture" in helpers


def pytest_collection_modifyitems(items):
    """Every test of a module that runs Snakemake is a `pipeline` test."""
    for item in items:
        if runs_snakemake(item.module) or "completed_run" in item.fixturenames:
            item.add_marker(pytest.mark.pipeline)


@pytest.fixture(scope="session")
def default_config() -> dict:
    """config.yaml with the schema's defaults filled in, as the pipeline sees it."""
    from snakemake.utils import validate

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
