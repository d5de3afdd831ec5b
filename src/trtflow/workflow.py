"""Glue between Snakemake and trtflow: which trtflow the workflow and its jobs import, the code a rule's rerun
triggers track, logging to the rule's log file and readable failures."""

from __future__ import annotations

import ast
import contextlib
import functools
import logging
import os
import re
import sys
import traceback
from pathlib import Path

import trtflow
from trtflow.artifacts import files_sha256


class ProvenanceError(RuntimeError):
    """The trtflow a process imports is not the code the workflow's rerun triggers track."""


def use_workflow_source(src: Path) -> None:
    """Make the jobs this Snakemake process starts import the trtflow in `src` (the folder beside the Snakefile,
    whose modules the rules list as inputs): `src` goes first on PYTHONPATH, which they inherit, after the folder of
    the jobs' sitecustomize (workflow/jobstart: Ctrl-C quiet from a job's first line on). The Snakefile has put `src`
    first on sys.path for this process, and refused a trtflow imported from elsewhere before it."""
    src = Path(src).resolve()
    jobstart = src.parent / "workflow/jobstart"
    first = [str(jobstart)] * jobstart.is_dir() + [str(src)]
    others = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry and entry not in first]
    os.environ["PYTHONPATH"] = os.pathsep.join([*first, *others])


def check_job_code(scriptdir: str | os.PathLike) -> None:
    """Refuse a job whose trtflow is not, file for file and byte for byte, the code its rerun triggers track:
    `<workflow>/src/trtflow/`, beside the `workflow/scripts/` folder the job's script comes from. A job whose
    workflow has no src/ (the package installed in a container image) has nothing tracked to compare; its
    artifacts still record the code that ran (`artifacts.running_code`)."""
    tracked = Path(scriptdir).resolve().parents[1] / "src" / "trtflow"
    imported = Path(trtflow.__file__).resolve().parent
    if imported == tracked or not tracked.is_dir():
        return
    files = {path.relative_to(root) for root in (tracked, imported) for path in root.rglob("*.py")}
    differing = sorted(
        str(name)
        for name in files
        if not ((tracked / name).is_file() and (imported / name).is_file())
        or files_sha256(tracked / name) != files_sha256(imported / name)
    )
    if differing:
        raise ProvenanceError(
            f"this job imports trtflow from {imported}, but its rerun triggers track {tracked}, and "
            f"{len(differing)} file(s) differ ({', '.join(differing)}): the job would run other code than the "
            "code that decides its reruns. Snakemake puts the workflow's src/ first on PYTHONPATH; an environment "
            "that drops it (--use-conda without --conda-not-block-search-path-envvars) must have this clone "
            f"installed: pip install -e {tracked.parents[1]}"
        )


@contextlib.contextmanager
def exit_with_message(*errors: type[Exception]):
    """For the Snakefile: one of `errors` ends the run with its message alone, which names the file or key and the
    fix; Snakemake would follow it with the traceback of the trtflow code that raised it."""
    try:
        yield
    except errors as error:
        print(error, file=sys.stderr)
        raise SystemExit(1) from None


@contextlib.contextmanager
def script_logging(snakemake):
    """Send the script's prints, progress bars and warnings to its rule log; a failure also goes to stderr.

    A failing stage exits 1 with its one-line message on the console and nothing else, so the user sees the file
    and the fix without opening the log (Snakemake's failure block names it); the log keeps the message with its
    traceback. (Ctrl-C: trtflow's __init__.)
    """
    log_path = snakemake.log[0] if snakemake.log else None
    with contextlib.ExitStack() as stack:
        if log_path:
            stream = stack.enter_context(open(log_path, "w", buffering=1))
            stack.enter_context(contextlib.redirect_stdout(stream))
            stack.enter_context(contextlib.redirect_stderr(stream))
            logging.basicConfig(
                stream=stream, level=logging.INFO, force=True, format="%(asctime)s %(name)s %(levelname)s %(message)s"
            )
        try:
            check_job_code(snakemake.scriptdir)
            yield
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
            traceback.print_exc()  # the whole story into the log (stderr is the log here)
            print(f"{FAILURE_MARK}{message}", file=sys.stderr)  # for failure_lines, where the log is the console
            print(message, file=sys.__stderr__)
            raise SystemExit(1) from None


# Begins a failed job's last log line: what failure_lines repeats at the end of the run.
FAILURE_MARK = "trtflow job failed: "
# Snakemake's own console (and log file) text: a failed job's block, and what it prints on Ctrl-C
FAILED_RULE = re.compile(r"^Error in rule (\S+):$")
FAILED_JOB_LOG = re.compile(r"^\s+log: (.+) \(check log file\(s\) for error details\)$")
CANCELLED = "Terminating processes on user request"


def failure_lines(snakemake_logs: list[str | os.PathLike]) -> list[str]:
    """The end of a failed run's console (Snakefile `onerror`): each failed job's one-line error and the log that
    holds its traceback, read from Snakemake's log of the run; or, after Ctrl-C, which jobs it stopped and that
    the same command goes on from there. Empty where the log names no failed job."""
    text = "\n".join(Path(path).read_text(errors="replace") for path in snakemake_logs if Path(path).is_file())
    failed, rule = [], None
    for line in text.splitlines():
        if match := FAILED_RULE.match(line):
            rule = match.group(1)
        elif rule and (match := FAILED_JOB_LOG.match(line)):
            failed.append((rule, match.group(1).split(", ")[0]))
            rule = None
    if not failed:
        return []
    if CANCELLED in text:
        stopped = ", ".join(f"{rule} ({log})" for rule, log in failed)
        return [
            f"trtflow: stopped by Ctrl-C: {stopped} did not finish; the finished jobs are kept, "
            "so the same command goes on from there"
        ]
    return [f"trtflow: {rule} failed: {job_failure(Path(log))} (traceback: {log})" for rule, log in failed]


def job_failure(log: Path) -> str:
    """A failed job's error as script_logging wrote it to the job's log; else where to look."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    if FAILURE_MARK not in text:
        return "see its log"
    return text.rsplit(FAILURE_MARK, 1)[1].strip()


def print_failures(snakemake_logs: list[str | os.PathLike]) -> None:
    for line in failure_lines(snakemake_logs):
        print(line, file=sys.stderr, flush=True)


@functools.cache
def imported_modules(source: Path, package: str = "trtflow") -> frozenset[str]:
    """Dotted names of the `package` modules `source` imports, at module top or inside functions alike."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from trtflow.backend import layer_dtypes` may name a submodule: both spellings are candidates
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return frozenset(name for name in names if name == package or name.startswith(f"{package}."))


def module_file(name: str, package_dir: Path) -> Path | None:
    """The file of dotted module `name` in the package at `package_dir`; None where no such module exists."""
    parts = name.split(".")[1:]
    folder = package_dir.joinpath(*parts)
    if (folder / "__init__.py").is_file():
        return folder / "__init__.py"
    path = folder.with_suffix(".py") if parts else None
    return path if path is not None and path.is_file() else None


@functools.cache
def code_closure(script: Path, package_dir: Path) -> tuple[Path, ...]:
    """Every module of the package at `package_dir` (src/trtflow) that `script` runs: its imports, theirs, and
    the packages they live in, sorted. A rule lists these as inputs, so editing any of them reruns it."""
    found: set[Path] = set()
    pending = [script]
    while pending:
        for name in imported_modules(pending.pop()):
            parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)]
            for path in filter(None, (module_file(module, package_dir) for module in parents)):
                if path not in found:
                    found.add(path)
                    pending.append(path)
    return tuple(sorted(found))
