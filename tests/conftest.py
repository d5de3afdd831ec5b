import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


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
