"""The workflow runs from anywhere: without nvcc, from another folder (-s, --directory, --configfile) and as a
Snakemake `module` of another workflow.

The default target without nvcc reuses the suite's completed run (a dry run and a real no-op run on a clone of it).
The one real build from another folder (a small data set: the int8 plan and what it needs, about two minutes on
2 cores) also serves the module: in that working directory a workflow that imports this one as a module builds
the fp32 plan from the same data, checkpoint, ONNX and weights.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from snakemake_runs import ROOT, SMALL_DATA, clone, config_overlay, jobs_of, snakemake, without_nvcc

# the default target of a fresh run, as the dry run plans it (nvcc is on PATH here)
DEFAULT_TARGET_RULES = {
    "data",
    "model",
    "onnx",
    "onnx_parity",
    "reference",
    "weights",
    "calibrate",
    "calibration_accuracy",
    "plugins",
    "engine",
    "verify",
    "bench",
    "report",
    "all",
}


@pytest.fixture(scope="module")
def no_nvcc(completed_run) -> tuple[dict, tuple[str, ...]]:
    """(environment, config arguments) of a machine without nvcc: plugins.nvcc points nowhere too."""
    overlay = config_overlay(completed_run, "no_nvcc.yaml", "plugins:\n  nvcc: /nowhere/bin/nvcc\n")
    assert shutil.which("nvcc", path=without_nvcc()["PATH"]) is None
    return without_nvcc(), overlay


def test_without_nvcc_the_default_target_leaves_out_the_plugin(completed_run, no_nvcc):
    env, overlay = no_nvcc
    planned = snakemake(completed_run, "--dry-run", "--forceall", *overlay, env=env)
    rules = {job.rule for job in jobs_of(planned.console)}
    assert rules == DEFAULT_TARGET_RULES - {"plugins"}, rules
    # where the engines use the plugin, the default target still asks for it (and its rule says how to get nvcc)
    plugin_overlay = config_overlay(
        completed_run, "no_nvcc_plugin.yaml", "plugins:\n  nvcc: /nowhere/bin/nvcc\nengine:\n  roi_align: plugin\n"
    )
    planned = snakemake(completed_run, "--dry-run", "--forceall", *plugin_overlay, env=env)
    assert "plugins" in {job.rule for job in jobs_of(planned.console)}


def test_without_nvcc_snakemake_completes_the_default_target(completed_run, no_nvcc, tmp_path):
    """A completed run without its plugin library: with nvcc gone, `snakemake --cores 2` has nothing to do."""
    env, overlay = no_nvcc
    workdir = clone(completed_run, tmp_path / "run")
    shutil.rmtree(workdir / "results/plugins")
    result = snakemake(workdir, *overlay, env=env)
    assert "Nothing to be done" in result.console, result.stderr[-3000:]
    assert not (workdir / "results/plugins").exists()
    assert (workdir / "results/report.html").is_file()
    # with nvcc back (and config.yaml's plugins.nvcc), the same target builds the plugin again
    planned = snakemake(workdir, "--dry-run")
    assert [job.rule for job in jobs_of(planned.console) if job.rule != "all"] == ["plugins"]


def readme_section(title: str) -> str:
    """The text of the README section headed `## <title>`, up to the next heading of its level."""
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def readme_command(checkout: Path, workdir: str) -> list[str]:
    """The README's run-from-another-folder command, word for word, with <clone> and <dir> filled in; without its
    leading `snakemake --cores 2`, which tests/snakemake_runs.snakemake types."""
    section = readme_section("Run from another folder, or as a module")
    (line,) = [line.strip() for line in section.splitlines() if line.startswith("    snakemake ")]
    words = shlex.split(line.replace("<clone>", str(checkout)).replace("<dir>", workdir))
    assert words[:3] == ["snakemake", "--cores", "2"], line
    return words[3:]


@pytest.fixture(scope="module")
def elsewhere(scratch_run, tmp_path_factory) -> tuple[Path, Path, str]:
    """A clone of the workflow, and a working directory elsewhere in which the README's command built
    results/engine_int8.plan."""
    checkout = scratch_run("clone")
    root = tmp_path_factory.mktemp("elsewhere")
    workdir = root / "work"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(SMALL_DATA))  # the rest: the schema's defaults
    log = snakemake(root, *readme_command(checkout, "work")).console
    return checkout, workdir, log


@pytest.mark.parametrize("config_text", [None, "", "# every key at its default\n"])
def test_from_another_folder_no_config_or_an_empty_one_takes_the_defaults(elsewhere, tmp_path, config_text):
    """The README's command in a folder without config.yaml, or with an empty one: the demo's jobs are planned
    (Snakemake refuses an empty config file; the Snakefile reads none then)."""
    checkout, _, _ = elsewhere
    (tmp_path / "work").mkdir()
    if config_text is not None:
        (tmp_path / "work/config.yaml").write_text(config_text)
    planned = snakemake(tmp_path, *readme_command(checkout, "work"), "--dry-run")
    assert sorted(job.rule for job in jobs_of(planned.console)) == [
        "calibrate",
        "data",
        "engine",
        "model",
        "onnx",
        "weights",
    ]
    assert "Config file(s): ['config.yaml']" not in planned.console


def test_from_another_folder_the_workflow_builds_a_plan(elsewhere):
    checkout, workdir, log = elsewhere
    metadata = json.loads((workdir / "results/engine_int8.json").read_text())
    assert (workdir / "results/engine_int8.plan").stat().st_size == metadata["plan_bytes"] > 0
    assert metadata["precision"] == "int8" and metadata["sources"]["onnx"]["path"] == "results/onnx/features.qdq.onnx"
    # the shipped checkpoint, trtflow's code and the scripts come from the clone; nothing is written into it
    model_job = next(job for job in jobs_of(log) if job.rule == "model")
    assert str(checkout / "models/demo_detector.safetensors") in model_job.fields["input"]
    assert str(checkout / "src/trtflow/common/model.py") in model_job.fields["input"]
    assert not any((checkout / name).exists() for name in ("results", "logs", ".snakemake"))
    assert json.loads((workdir / "results/data/val.json").read_text())["images"].__len__() == 8


def test_as_a_module_the_workflow_plans_everything_and_builds_a_plan(elsewhere):
    checkout, workdir, _ = elsewhere
    # the README's Snakefile, word for word
    (snippet,) = re.findall(r"```python\n(.*?)```", readme_section("Run from another folder, or as a module"), re.S)
    (workdir / "Snakefile").write_text(snippet.replace("<clone>", str(checkout)))
    # the importing workflow's default target is trtflow's: every stage but what the int8 plan already built
    planned = snakemake(workdir, "--dry-run")
    rules = {job.rule for job in jobs_of(planned.console)}
    assert rules == DEFAULT_TARGET_RULES - {"data", "model", "onnx", "weights", "calibrate"}, rules
    # the module's jobs are the same jobs: the int8 plan is up to date, the fp32 plan builds from the same files
    assert "Nothing to be done" in snakemake(workdir, "--dry-run", "results/engine_int8.plan").console
    built = snakemake(workdir, "results/engine_fp32.plan")
    assert [job.rule for job in jobs_of(built.console)] == ["engine"]
    metadata = json.loads((workdir / "results/engine_fp32.json").read_text())
    assert (
        metadata["precision"] == "fp32"
        and (workdir / "results/engine_fp32.plan").stat().st_size == metadata["plan_bytes"]
    )
