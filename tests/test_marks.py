"""The `pipeline` mark follows cost: a test is marked when it takes a fixture that runs Snakemake or nvcc
(conftest.PIPELINE_FIXTURES), so `make test-fast` (`pytest -m "not pipeline"`) runs every other test, and a test
that starts Snakemake without being marked fails instead of slowing `make test-fast` unseen.
"""

import shutil
import subprocess
import sys

import pytest

from snakemake_runs import ROOT


def pytest_lines(*args: str, cwd=ROOT) -> list[str]:
    """The output lines of `pytest ARGS` in a fresh process (no cache written)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return (result.stdout + result.stderr).splitlines()


@pytest.fixture(scope="module")
def marks() -> dict[str, tuple[set[str], set[str]]]:
    """module -> (marked, unmarked) names of its tests, parameters left out, as pytest's collection marks them."""
    modules = ("test_bad_inputs.py", "test_plugins.py")

    def collected(selection: str) -> dict[str, set[str]]:
        lines = pytest_lines("--collect-only", "-q", "-m", selection, *(f"tests/{module}" for module in modules))
        ids = [line.removeprefix("tests/").split("::") for line in lines if line.startswith("tests/")]
        return {module: {name.split("[")[0] for found, name in ids if found == module} for module in modules}

    marked, unmarked = collected("pipeline"), collected("not pipeline")
    return {module: (marked[module], unmarked[module]) for module in modules}


def test_only_the_snakemake_runs_of_bad_inputs_are_pipeline_tests(marks):
    """Of test_bad_inputs, the five tests that run a rule through Snakemake; its in-process tests run in test-fast
    (before: every test of a module importing snakemake_runs was marked)."""
    marked, unmarked = marks["test_bad_inputs.py"]
    assert marked == {
        "test_rule_data_names_every_bad_image_and_leaves_nothing",
        "test_rule_model_fails_on_a_corrupt_checkpoint_and_saves_nothing",
        "test_snakemake_refuses_a_bad_config_before_any_job",
        "test_rule_plugins_without_nvcc_names_the_fix_and_builds_nothing",
        "test_rule_data_on_a_really_full_disk",
    }
    assert "test_a_bad_image_in_the_val_set_fails_naming_it_or_is_skipped" in unmarked and not marked & unmarked


def test_the_plugin_tests_that_compile_with_nvcc_are_pipeline_tests(marks):
    """Of test_plugins, every test of the nvcc-built library (the `built` fixture takes `nvcc`); the rest run in
    test-fast (before: none was marked, and test-fast compiled the library)."""
    marked, unmarked = marks["test_plugins.py"]
    assert {"test_rule_builds_library_ptx_and_record", "test_host_reference_matches_torchvision"} <= marked
    assert unmarked == {
        "test_missing_nvcc_names_the_fix",
        "test_build_config_rejects_ptx_newer_than_the_oldest_arch",
        "test_loader_refuses_missing_and_foreign_libraries",
        "test_spatial_scales_are_torchvisions",
        "test_every_level_is_pooled",
        "test_plugin_paths_by_backend_version",
    }


def test_a_test_that_runs_snakemake_unmarked_fails_naming_the_fixtures(tmp_path):
    """`snakemake --version` from a test that takes none of the marking fixtures: refused, with what to take."""
    for helper in ("conftest.py", "snakemake_runs.py"):
        shutil.copy(ROOT / "tests" / helper, tmp_path / helper)
    (tmp_path / "test_unmarked.py").write_text(
        'from snakemake_runs import snakemake\n\n\ndef test_version(tmp_path):\n    snakemake(tmp_path, "--version")\n'
    )
    lines = pytest_lines("-q", "--basetemp", str(tmp_path / "inner"), "test_unmarked.py", cwd=tmp_path)
    assert lines[-1].startswith("1 failed"), lines[-20:]
    assert any(
        "test_unmarked.py::test_version runs snakemake --version but is not marked `pipeline`: take the fixture "
        "it runs in, `completed_run` or `scratch_run`" in line
        for line in lines
    ), lines[-20:]
