"""What a run leaves on the console when it stops early (issue 23, errors in one line): Ctrl-C in a real run, the
end-of-run lines the Snakefile's onerror prints (trtflow.workflow.failure_lines, read from Snakemake's log of the
run), and which config.yaml counts as none (trtflow.config.holds_keys). The README's Troubleshooting rows are
test_troubleshooting's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from snakemake_runs import ROOT, SMALL_DATA, config_overlay
from trtflow.config import holds_keys
from trtflow.workflow import failure_lines, use_workflow_source

# -- Ctrl-C in a real run -----------------------------------------------------------------------------------------

JOB_STARTED = re.compile(r"^(?:local)?rule \w+:$")


def default_sigint():
    """In the child, before Snakemake starts: a shell's background job ignores SIGINT, and the child would inherit
    that; a user's terminal delivers it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_run_in_one_line_without_a_traceback(scratch_run):
    """The default target on a small data set, stopped by Ctrl-C (SIGINT to the whole process group, as a terminal
    sends it) 1.5 s after the first job started: no traceback, no KeyboardInterrupt, the onerror line naming
    the jobs it stopped, a non-zero exit.

    The signal waits for a moment when no job started in the last 0.5 s: a job's first tenth of a second is CPython's
    own start-up (the site module), before any code of the workflow can catch it (workflow/jobstart/sitecustomize.py
    catches it from there on; before it, Ctrl-C in the first second of a job, while Snakemake's script preamble
    imported, printed a KeyboardInterrupt traceback: this test failed so under load; the next test shows it
    without a race)."""
    workdir = scratch_run("ctrl_c")
    overlay = config_overlay(workdir, "small.yaml", yaml.safe_dump(SMALL_DATA))
    run = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--cores", "2", *overlay],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    console: list[str] = []
    job_starts: list[float] = []

    def read():  # the console as it comes, so that the signal follows a job's start
        for line in run.stdout:
            console.append(line)
            if JOB_STARTED.match(line.rstrip()):
                job_starts.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not job_starts and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        assert job_starts, "".join(console)[-3000:]
        time.sleep(1.5)
        while time.monotonic() - job_starts[-1] < 0.5:
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)
        run.wait(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    reader.join(timeout=60)
    text = "".join(console)
    assert run.returncode != 0, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    (stopped,) = [line for line in text.splitlines() if line.startswith("trtflow: stopped by Ctrl-C: ")]
    assert stopped.endswith(" did not finish; the finished jobs are kept, so the same command goes on from there"), (
        stopped
    )
    assert re.search(r"\w+ \(logs/\S+\.log\)", stopped), stopped  # a stopped job and its log


# A script job as Snakemake starts it (python .snakemake/scripts/<name>.py): its preamble's imports (here a pause
# of its own) come before the script's first `import trtflow`.
SLOW_PREAMBLE = """
import sys, time
print("preamble", flush=True)
time.sleep(30)
import trtflow
"""


def test_ctrl_c_before_a_job_imports_trtflow_ends_it_quietly(tmp_path, monkeypatch):
    """Ctrl-C while a job is still in Snakemake's script preamble: status 130 and nothing on the console (the jobs'
    sitecustomize, on the PYTHONPATH that use_workflow_source gives them); before it, Python's KeyboardInterrupt
    traceback."""
    monkeypatch.setenv("PYTHONPATH", "")
    use_workflow_source(ROOT / "src")  # what the Snakefile does; monkeypatch restores PYTHONPATH
    script = tmp_path / ".snakemake/scripts/tmpab12cd34.validate_model.py"
    script.parent.mkdir(parents=True)
    script.write_text(SLOW_PREAMBLE)
    job = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        assert job.stdout.readline() == "preamble\n"
        job.send_signal(signal.SIGINT)
        out, err = job.communicate(timeout=60)
    finally:
        job.kill()
    assert (job.returncode, err) == (130, ""), err


# -- failure_lines: the end of a failed run's console -------------------------------------------------------------


def failed_job_block(rule: str, logs: str) -> str:
    """A failed job, as Snakemake 9 writes it to its log of the run (and its console)."""
    return (
        "RuleException:\n"
        f'CalledProcessError in file "/work/flow/workflow/rules/{rule}.smk", line 40:\n'
        f"Command 'set -euo pipefail;  python /work/flow/.snakemake/scripts/tmpab12cd34.{rule}.py' returned non-zero "
        "exit status 1.\n"
        "[Sat Dec  5 11:50:37 2026]\n"
        f"Error in rule {rule}:\n"
        "    message: None\n"
        "    jobid: 1\n"
        f"    output: results/{rule}/out.json\n"
        f"    log: {logs} (check log file(s) for error details)\n"
    )


RUN_START = (
    "Building DAG of jobs...\nUsing shell: /usr/bin/bash\nProvided cores: 2\nSelect jobs to execute...\n"
    "Execute 2 jobs...\n\n[Sat Dec  5 11:50:28 2026]\nlocalrule model:\n    log: logs/model/model.log\n"
    "    jobid: 1\n    reason: Missing output files: results/model/model.json\n"
)
RUN_END = "Exiting because a job execution failed. Look above for error messages\nComplete log(s): ...\n"


def job_log(path: Path, error: str | None) -> None:
    """A job's log as trtflow's job wrapper leaves it: the traceback, then its marked one-line error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = 'Traceback (most recent call last):\n  File "validate_model.py", line 9, in <module>\n'
    path.write_text(text + (f"{error}\ntrtflow job failed: {error}\n" if error else "Killed\n"))


@pytest.fixture
def in_workdir(tmp_path, monkeypatch) -> Path:
    """Snakemake names job logs relative to the working directory, as onerror reads them."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snakemake_log(folder: Path, text: str) -> Path:
    path = folder / ".snakemake/log/2026-12-05T115027.699963.snakemake.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


CHECKPOINT = (
    "CheckpointError: model.checkpoint: cannot read garbage.pth: it is not tensors saved with torch.save "
    "(a damaged file, or a whole pickled model: save model.state_dict() instead)"
)


def test_a_failed_job_is_repeated_as_its_one_line_and_its_log(in_workdir):
    job_log(in_workdir / "logs/model/model.log", CHECKPOINT)
    log = snakemake_log(in_workdir, RUN_START + failed_job_block("model", "logs/model/model.log") + RUN_END)
    assert failure_lines([log]) == [f"trtflow: model failed: {CHECKPOINT} (traceback: logs/model/model.log)"]


def test_two_failed_jobs_each_get_their_line_and_one_without_an_error_says_where_to_look(in_workdir):
    job_log(in_workdir / "logs/model/model.log", CHECKPOINT)
    job_log(in_workdir / "logs/plugins/build.log", None)  # killed before the wrapper could write its line
    text = (
        RUN_START
        + failed_job_block("model", "logs/model/model.log")
        + failed_job_block("plugins", "logs/plugins/build.log, logs/plugins/nvcc.log")
        + RUN_END
    )
    assert failure_lines([snakemake_log(in_workdir, text)]) == [
        f"trtflow: model failed: {CHECKPOINT} (traceback: logs/model/model.log)",
        "trtflow: plugins failed: see its log (traceback: logs/plugins/build.log)",
    ]


def test_ctrl_c_names_the_jobs_it_stopped_in_one_line(in_workdir):
    text = (
        RUN_START
        + "Terminating processes on user request, this might take some time.\n"
        + failed_job_block("plugins", "logs/plugins/build.log").replace("exit status 1", "exit status 130")
        + failed_job_block("data", "logs/data/data.log").replace("exit status 1", "exit status 130")
        + RUN_END
    )
    assert failure_lines([snakemake_log(in_workdir, text)]) == [
        "trtflow: stopped by Ctrl-C: plugins (logs/plugins/build.log), data (logs/data/data.log) did not finish; "
        "the finished jobs are kept, so the same command goes on from there"
    ]


def test_a_run_without_a_failed_job_gives_no_line(in_workdir):
    finished = RUN_START + "[Sat Dec  5 11:50:37 2026]\nFinished jobid: 1 (Rule: model)\n1 of 1 steps (100%) done\n"
    assert failure_lines([snakemake_log(in_workdir, finished)]) == []
    # Ctrl-C before any job started: Snakemake names no job, nor does onerror
    cancelled = RUN_START + "Terminating processes on user request, this might take some time.\n"
    assert failure_lines([snakemake_log(in_workdir, cancelled)]) == []
    assert failure_lines([in_workdir / "no/such.snakemake.log"]) == []
    assert failure_lines([]) == []


# -- holds_keys: which config.yaml counts as none -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, holds",
    [
        (None, False),
        ("", False),
        ("\n\n", False),
        ("# trtflow configuration\n# every key at its default\n", False),
        ("model:\n  num_classes: 5\n", True),
        ("# the checkpoint only\nmodel: {checkpoint: models/mine.safetensors}\n", True),
    ],
    ids=["missing", "empty", "blank lines", "comments only", "keys", "keys after a comment"],
)
def test_holds_keys(tmp_path, text, holds):
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    assert holds_keys(path) is holds
    assert holds_keys(str(path)) is holds
