"""trtflow installed from its wheel, not editable (as workflow/envs/Dockerfile installs it): every module is in the
wheel, and trtflow.config finds the config schema the package ships, without the source checkout.

The wheel is built without build isolation (the test environment's setuptools), so no network is needed; building
and installing take a few seconds.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

# what the Dockerfile copies before `pip install .`
BUILD_FILES = ("pyproject.toml", "LICENSE", "src", "workflow/schemas")
# run in a Python whose trtflow is the installed one: config.yaml checked as is and with a bad value
CHECK_CONFIGS = """
import copy, json, sys
from pathlib import Path

import yaml

import trtflow
from trtflow.config import SCHEMA, ConfigError, check_config

root = Path(sys.argv[1])
good = yaml.safe_load((root / "config.yaml").read_text())
bad = copy.deepcopy(good)
bad["model"]["input"]["width"] = 333
check_config(good, workdir=root)
try:
    check_config(bad, workdir=root)
    refusal = None
except ConfigError as error:
    refusal = str(error)
print(json.dumps({"trtflow": trtflow.__file__, "schema": str(SCHEMA), "filled_in": good["reference"],
                  "refusal": refusal}))
"""


def pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder trtflow's wheel is installed into (pip --target), built from a copy of the files the Docker
    image builds from, so that the checkout around them cannot stand in for anything missing."""
    tree = tmp_path_factory.mktemp("tree")
    for name in BUILD_FILES:
        source, copy = ROOT / name, tree / name
        if source.is_dir():
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, copy)
    wheels, target = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site-packages")
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(tree))
    (wheel,) = wheels.glob("trtflow-*.whl")
    pip("install", "--no-deps", "--target", str(target), str(wheel))
    return target


def test_the_wheel_holds_every_module(installed):
    def modules(package: Path) -> set[str]:
        return {str(path.relative_to(package)) for path in package.rglob("*.py")}

    assert modules(installed / "trtflow") == modules(ROOT / "src/trtflow")


def test_an_installed_trtflow_validates_config_with_its_packaged_schema(installed, tmp_path):
    # the installed trtflow first; the test environment's site-packages (after PYTHONPATH) for its dependencies
    environment = {**os.environ, "PYTHONPATH": str(installed)}
    result = subprocess.run(
        [sys.executable, "-c", CHECK_CONFIGS, str(ROOT)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert Path(report["trtflow"]).is_relative_to(installed)
    assert Path(report["schema"]) == installed / "trtflow/schemas/config.schema.yaml"
    assert report["filled_in"] == {"batch_size": 8}  # `reference:`: config.yaml leaves it to the schema's defaults
    assert report["refusal"] == (
        "config.yaml: invalid configuration:\n  model.input.width: 333 is not a multiple of 32"
    )
