"""Jobs run the code their rerun triggers track: the trtflow beside the Snakefile, never another copy that the
Python environment imports, and every numeric artifact records the code that ran.

Measured before this was built: a second clone sharing the first clone's environment (the editable install points
at the first) reran its jobs on an edit of its own src/trtflow, yet the jobs imported the first clone's modules; a
clone installed with `pip install <clone>` and edited afterwards ran the installed copy. Each test below edits a
clone so that its code prints a marker when imported: the marker in the job's output shows whose code ran.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from snakemake_runs import ROOT, scratch_workflow, snakemake
from test_install import installed  # noqa: F401  (trtflow's wheel installed with pip --target)
from trtflow.artifacts import files_sha256
from trtflow.workflow import ProvenanceError, check_job_code, module_file

TARGET = "results/model/model.json"  # rule `model`: a numeric artifact in a few seconds, no other job first
MARKER = "provenance marker: this clone's trtflow.common.model ran"


def edited_clone(scratch_run) -> Path:
    """A scratch copy of the workflow whose trtflow.common.model prints MARKER when imported."""
    clone = scratch_run("clone")
    model = clone / "src/trtflow/common/model.py"
    model.write_text(model.read_text() + f"\nprint({MARKER!r})\n")
    return clone


def code_sha256(package: Path, modules: list[str]) -> str:
    """The sha256 `software.trtflow_code` claims, recomputed from the files of `modules` in `package`."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(f"{name}\n{files_sha256(module_file(name, package))}\n".encode())
    return digest.hexdigest()


def recorded_code(workdir: Path) -> dict:
    return json.loads((workdir / TARGET).read_text())["software"]["trtflow_code"]


def test_a_second_clone_sharing_the_environment_runs_its_own_code(scratch_run):
    """This test environment's editable install points at ROOT; the clone's jobs still import the clone's files."""
    clone = edited_clone(scratch_run)
    result = snakemake(clone, TARGET, cores=1)
    assert MARKER in result.console
    code = recorded_code(clone)
    assert "trtflow.common.model" in code["modules"] and "trtflow.workflow" in code["modules"]
    assert code["sha256"] == code_sha256(clone / "src/trtflow", code["modules"])
    assert code["sha256"] != code_sha256(ROOT / "src/trtflow", code["modules"])


def test_an_installed_copy_does_not_stand_in_for_the_edited_clone(installed, scratch_run):  # noqa: F811
    """`pip install <clone>` (here: the wheel into a --target folder first on PYTHONPATH), then an edit of the
    clone: its jobs run the edited clone, not the installed copy."""
    clone = edited_clone(scratch_run)
    result = snakemake(clone, TARGET, cores=1, env={"PYTHONPATH": str(installed)})
    assert MARKER in result.console
    code = recorded_code(clone)
    assert code["sha256"] == code_sha256(clone / "src/trtflow", code["modules"])
    assert code["sha256"] != code_sha256(installed / "trtflow", code["modules"])


def test_a_trtflow_imported_before_the_workflow_is_refused(installed, scratch_run):  # noqa: F811
    """A Python process that imported another trtflow before calling Snakemake cannot switch to the workflow's:
    the workflow refuses to start, naming the module it imported, the folder it expected and the fix."""
    clone = scratch_run("clone")
    call = (
        f"import sys; sys.path.insert(0, {str(installed)!r}); import trtflow; from snakemake.cli import main; "
        f"main(['--cores', '1', '--dry-run', {TARGET!r}])"
    )
    result = subprocess.run(
        [sys.executable, "-c", call], cwd=clone, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode != 0
    message = " ".join((result.stdout + result.stderr).split())
    assert f"imported trtflow from {installed / 'trtflow'} before the workflow could put its own code first" in message
    assert f"the workflow's rerun triggers track {clone.resolve() / 'src/trtflow'}" in message
    assert "Start snakemake in a fresh process" in message
    assert not (clone / "results").exists()


def test_a_job_whose_modules_differ_from_the_tracked_ones_is_refused(tmp_path):
    """The job-side guard (every script enters it through script_logging): the imported trtflow (this test's:
    ROOT/src) against the clone the script comes from. Identical files pass; one differing module is named; a
    workflow without src/ (the package installed in a container image) has nothing tracked to compare."""
    clone = scratch_workflow(tmp_path / "clone")
    scripts = clone / "workflow/scripts"
    check_job_code(scripts)  # the same bytes as the imported modules
    (clone / "src/trtflow/workflow.py").write_text((ROOT / "src/trtflow/workflow.py").read_text() + "\n# edited\n")
    with pytest.raises(ProvenanceError, match=r"1 file\(s\) differ \(workflow.py\)") as refusal:
        check_job_code(scripts)
    assert f"its rerun triggers track {clone.resolve() / 'src/trtflow'}" in str(refusal.value)
    assert f"pip install -e {clone.resolve()}" in str(refusal.value)
    bare = tmp_path / "image/workflow/scripts"
    bare.mkdir(parents=True)
    check_job_code(bare)
