"""Snakemake in scratch copies of the workflow, as a user types it, and what its log says.

conftest's session fixture `completed_run` (the default target, built once: 1.5 to 3 minutes on 2 cores)
is shared by the slow test files. Tests that change files or outputs work on `clone(completed_run, ...)`,
never on it; runs of a test's own start from conftest's `scratch_run`. Taking either fixture (or `nvcc`) is
what marks a test `pipeline`; `snakemake` refuses to start in a test that is not marked.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "profiles", "src", "models", "plugins")
PRECISIONS = ("fp32", "fp16", "int8")
# a small demo data set, for runs of a test's own where the models are not what is tested
SMALL_DATA = {"data": {"demo": {"num_val": 8, "num_calib": 8}}}
# set by conftest for each test: the id of a running test that is not marked `pipeline`, None for one that is
UNMARKED_TEST: str | None = None


def scratch_workflow(workdir: Path, extra: tuple[str, ...] = ()) -> Path:
    """The workflow's files (not results/, logs/ or .snakemake/), and `extra` paths, copied into `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in (*WORKFLOW_FILES, *extra):
        source, target = ROOT / name, workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, target)
    return workdir


def clone(workdir: Path, destination: Path) -> Path:
    """A copy of a run, results and Snakemake's records included, with every mtime kept."""
    shutil.copytree(workdir, destination, symlinks=True, ignore=shutil.ignore_patterns("locks", "incomplete"))
    return destination


class SnakemakeRun(subprocess.CompletedProcess):
    """A finished `snakemake` process."""

    @property
    def console(self) -> str:
        """What the user saw: standard output, then standard error (where Snakemake logs its jobs)."""
        return self.stdout + self.stderr


def snakemake(
    workdir: Path, *args: str, cores: int = 2, check: bool = True, env: dict | None = None, timeout: float = 600
) -> SnakemakeRun:
    """`snakemake --cores N ARGS` in `workdir`, as a user types it (no profile unless ARGS names one).

    `env` is laid over this process's environment. Refused in a test not marked `pipeline`: `make test-fast`
    would run it."""
    if UNMARKED_TEST is not None:
        raise AssertionError(
            f"{UNMARKED_TEST} runs snakemake {' '.join(args)} but is not marked `pipeline`: take the fixture it runs "
            "in, `completed_run` or `scratch_run` (conftest marks every test that uses one)"
        )
    result = subprocess.run(
        snakemake_command(cores, *args),
        cwd=workdir,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    return checked(SnakemakeRun(result.args, result.returncode, result.stdout, result.stderr), check)


def snakemake_command(cores: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--cores", str(cores), *args]


def checked(result: SnakemakeRun, check: bool) -> SnakemakeRun:
    if check and result.returncode:
        raise AssertionError(
            f"snakemake {' '.join(result.args[5:])} failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


class BackgroundSnakemake:
    """`snakemake --cores N ARGS` in `workdir`, started now and waited for later (`result()`), its output in files
    beside `workdir`: conftest starts the shared completed run when the session starts, so that it builds while
    the tests that do not need it run. No UNMARKED_TEST check: conftest starts it only where a selected test takes
    `completed_run` (so is marked `pipeline`)."""

    def __init__(self, workdir: Path, *args: str, cores: int = 2, timeout: float = 600):
        self.workdir, self.deadline = workdir, time.monotonic() + timeout
        self.outputs = [workdir.with_name(f"{workdir.name}.{stream}") for stream in ("stdout", "stderr")]
        with self.outputs[0].open("w") as stdout, self.outputs[1].open("w") as stderr:
            self.process = subprocess.Popen(
                snakemake_command(cores, *args),
                cwd=workdir,
                stdout=stdout,
                stderr=stderr,
                text=True,
                start_new_session=True,  # stop() ends its jobs too
            )

    def result(self, check: bool = True) -> SnakemakeRun:
        try:
            self.process.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        stdout, stderr = (path.read_text() for path in self.outputs)
        return checked(SnakemakeRun(self.process.args, self.process.returncode, stdout, stderr), check)

    def stop(self) -> None:
        """Ends the run and its jobs where it still runs (a session that ends before a test waited for it)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class Job:
    """One job of a Snakemake run or dry run, as its log block shows it."""

    rule: str
    fields: dict = field(default_factory=dict)

    @property
    def wildcards(self) -> dict[str, str]:
        text = self.fields.get("wildcards", "")
        return dict(item.split("=", 1) for item in text.split(", ") if "=" in item)

    @property
    def resources(self) -> dict[str, str]:
        text = self.fields.get("resources", "")
        return dict(item.split("=", 1) for item in text.split(", ") if "=" in item)

    @property
    def output(self) -> list[str]:
        text = self.fields.get("output", "")
        return text.split(", ") if text else []

    @property
    def log(self) -> str:
        return self.fields.get("log", "")

    @property
    def reason(self) -> str:
        return self.fields.get("reason", "")

    @property
    def name(self) -> str:
        """`engine[int8]`: the rule and its wildcard values, for readable assertions."""
        values = ",".join(value for value in self.wildcards.values() if value)
        return f"{self.rule}[{values}]" if values else self.rule


JOB_START = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
JOB_FIELD = re.compile(r"^ {4}(\w+): (.*)$")
JOB_FINISHED = re.compile(r"^Finished jobid: \d+ \(Rule: (\w+)\)$")


def jobs_of(output: str) -> list[Job]:
    """The jobs a Snakemake run started (or a dry run would start), in log order."""
    jobs, current = [], None
    for line in output.splitlines():
        started = JOB_START.match(line)
        if started:
            current = Job(started.group(1))
            jobs.append(current)
            continue
        field_line = JOB_FIELD.match(line) if current else None
        if field_line:
            current.fields[field_line.group(1)] = field_line.group(2)
        else:
            current = None
    return jobs


def events_of(output: str) -> list[tuple[str, str]]:
    """("start" | "finish", rule) in the order a real run logged them: which jobs ran at the same time."""
    events = []
    for line in output.splitlines():
        for kind, pattern in (("start", JOB_START), ("finish", JOB_FINISHED)):
            match = pattern.match(line)
            if match:
                events.append((kind, match.group(1)))
    return events


def planned(workdir: Path, *args: str, env: dict | None = None) -> list[str]:
    """The sorted job names (`rule[wildcards]`) a dry run of ARGS would run."""
    return sorted(job.name for job in jobs_of(snakemake(workdir, "--dry-run", *args, env=env).console))


def without_nvcc() -> dict:
    """An environment in which find_nvcc finds nothing: PATH without nvcc's folders, no CUDA_HOME."""
    path = [entry for entry in os.environ["PATH"].split(os.pathsep) if not (Path(entry) / "nvcc").exists()]
    return {"PATH": os.pathsep.join(path), "CUDA_HOME": "", "CUDA_PATH": ""}


def cluster_generic(submitted: Path) -> tuple[str, ...]:
    """Arguments that send every job through Snakemake's cluster-generic executor to this machine
    (tests/submit_local.sh, copied into the working directory), two at a time; each submission's rule is appended to
    `submitted`."""
    return (
        "--executor",
        "cluster-generic",
        "--jobs",
        "2",
        "--seconds-between-status-checks",
        "1",
        "--cluster-generic-submit-cmd",
        f"SUBMIT_LOG={submitted} bash tests/submit_local.sh {{rule}}",
    )


def config_overlay(workdir: Path, name: str, yaml_text: str) -> tuple[str, ...]:
    """Arguments that layer `yaml_text` over config.yaml, as a user's second --configfile would."""
    path = workdir / name
    path.write_text(yaml_text)
    return ("--configfile", "config.yaml", name)
