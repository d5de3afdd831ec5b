"""The README's Troubleshooting table, row by row: each error, provoked by a bad input made here, reaches the
console as the row says, in one line and without a traceback (issue 23: "Every error of the README's
Troubleshooting table reaches the console as one line (test per row)").

The rows are read out of the README, so a row added there without a provocation here fails
`test_every_row_is_provoked_here`. A row's "you see" cell is a pattern: `...` stands for any text and the row's
placeholders (X, <img>, N, ...) for what this test made; a multi-problem error (ConfigError, DatasetError) is its
headline line plus one line per problem, which the one cell writes as "`headline - problem`".

Where a row's error comes from a job, a real `snakemake` run shows it; the runs are few, shared by rows, and run
three at a time (each is mostly interpreter start-up and imports):
- `config_types`, `config_paths`: dry runs with a bad config overlay (checked before any job);
- `first_jobs`: one scratch run of the jobs that need nothing built (data, plugins without nvcc, and two models of
  a `models:` config, one per bad checkpoint), --keep-going;
- `provenance`: a scratch run whose job imports another trtflow; `locked`: a scratch run with a lock left behind;
- `reference_engine`, `verify`: clones of the suite's completed run, whose later stages need earlier outputs;
- `detect_no_gpu`, `detect_impossible`: the `trtflow detect` command.
Rows that need a GPU this machine lacks (Hopper, a GPU the plan does not target) or a full disk go through the
real code path with the device facts or the disk's answer substituted at the narrowest seam.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from snakemake_runs import ROOT, clone, config_overlay, snakemake, without_nvcc
from test_detect import trtflow
from trtflow import cli
from trtflow.run import runtime

# -- the table ------------------------------------------------------------------------------------------------


def troubleshooting_rows(readme: str) -> list[str]:
    """The "you see" cell of each row of the README's Troubleshooting table."""
    section = readme.split("\n## Troubleshooting\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| you see |") and set(rows[1]) <= set("|- "), rows[:2]
    return [row.strip("|").split(" | ")[0].strip() for row in rows[2:]]


ROWS = troubleshooting_rows((ROOT / "README.md").read_text())


def promised_lines(cell: str) -> list[str]:
    """The console lines a "you see" cell promises: its code spans, less those in a parenthesised aside (a
    mention, such as "(also a NaN/inf box ...)"), a multi-problem error's span split into headline and problems."""
    lines, depth = [], 0
    for index, part in enumerate(cell.split("`")):
        if index % 2:  # code
            if depth == 0:
                headline, *problems = part.split(" - ")
                lines += [headline, *(f"- {problem}" for problem in problems)]
        else:
            depth += part.count("(") - part.count(")")
    return lines


def line_pattern(text: str, values: dict[str, str]) -> re.Pattern:
    """`text` as a regular expression: `...` any text, each placeholder of `values` its regular expression (a
    placeholder of letters only as a whole word), the rest literal."""
    names = sorted(values, key=len, reverse=True)
    tokens = [rf"(?<!\w){re.escape(name)}(?!\w)" if name.isalnum() else re.escape(name) for name in names]
    parts = re.split(f"({'|'.join([*tokens, re.escape('...')])})", text)
    regex = ""
    for index, part in enumerate(parts):
        if index % 2 == 0:
            regex += re.escape(part)
        else:
            regex += values[part] if part in values else ".*"
    return re.compile(regex)


# -- what the user saw, and its shape --------------------------------------------------------------------------


@dataclass(frozen=True)
class Console:
    """What a provoked error left on the console (stdout, then stderr), and what shape its error takes."""

    text: str
    # job: a job's line, then the Snakefile's onerror repeats it, `trtflow: <rule> failed: <line> (traceback: <log>)`
    # config: `<files>: invalid configuration:`, then one line per problem, ending the console
    # last: the error is the last line (trtflow detect, or a job wrapper's process alone)
    # snakemake: Snakemake's own message
    shape: str
    rule: str | None = None


def assert_one_line(console: Console, patterns: list[re.Pattern]) -> None:
    """Each pattern is found within one console line, and the error it belongs to takes no more lines than its
    shape allows; nothing on the console is a traceback."""
    lines = console.text.splitlines()
    assert "Traceback" not in console.text, console.text[-3000:]
    for pattern in patterns:
        assert any(map(pattern.search, lines)), f"no console line matches {pattern.pattern!r}:\n{console.text[-3000:]}"
    if console.shape == "job":
        # the Snakefile's onerror repeats each failed job's error: `trtflow: <rule> failed: <error> (traceback:
        # <log>)` in one line, or, for an error that lists problems, its headline, one line per problem ("  - ")
        # and the fix ("Fix: "), the last line ending with the log
        repeats = []
        for start, line in enumerate(lines):
            if line.startswith(f"trtflow: {console.rule} failed: "):
                end = next(n for n in range(start, len(lines)) if re.search(r" \(traceback: \S+\)$", lines[n]))
                repeats.append(lines[start : end + 1])
        holding = [repeat for repeat in repeats if all(any(map(p.search, repeat)) for p in patterns)]
        assert len(holding) == 1, f"{len(holding)} `trtflow: {console.rule} failed:` repeats hold the row:\n{repeats}"
        for line in holding[0][1:]:
            assert line.startswith(("  - ", "Fix: ")), f"the error goes on past one line: {line!r}"
    elif console.shape == "config":
        # the headline, then one line per problem (indented), which end the console
        start = max(number for number, line in enumerate(lines) if line.endswith(": invalid configuration:"))
        assert all(line.startswith("  ") for line in lines[start + 1 :]), "\n".join(lines[start:])
        assert all(any(map(p.search, lines[start:])) for p in patterns)
    elif console.shape == "last":
        assert patterns[-1].search(lines[-1]), f"the error is not the console's last line:\n{console.text[-3000:]}"
    # "snakemake": Snakemake's own message, whose line the patterns found (its LockException goes on with the
    # folder and the --unlock hint on lines of their own: Snakemake's text, not trtflow's)


# -- bad inputs, made here -------------------------------------------------------------------------------------

CATEGORIES = [
    {"id": number, "name": name} for number, name in enumerate(("circle", "rectangle", "triangle", "star"), 1)
]


def user_data_set(folder: Path) -> dict[str, Path]:
    """Two good photos and a truncated JPEG; `bad.json` lists all three and an annotation of an unlisted
    category (id 9), `three_classes.json` the good photos with three categories (the demo model has four)."""
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir(parents=True)
    for number in range(2):
        cv2.imwrite(str(images / f"good{number}.jpg"), rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    whole = cv2.imencode(".jpg", rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))[1].tobytes()
    (images / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    entries = [
        {"id": 1, "file_name": "good0.jpg", "width": 80, "height": 64},
        {"id": 2, "file_name": "good1.jpg", "width": 80, "height": 64},
        {"id": 3, "file_name": "cut.jpg", "width": 128, "height": 128},
    ]
    boxes = [{"id": number, "image_id": number, "category_id": 1, "bbox": [2, 2, 10, 10]} for number in (1, 2, 3)]
    unlisted = {"id": 7, "image_id": 1, "category_id": 9, "bbox": [2, 2, 10, 10]}
    bad = folder / "bad.json"
    bad.write_text(json.dumps({"images": entries, "annotations": [*boxes, unlisted], "categories": CATEGORIES}))
    three = folder / "three_classes.json"
    three.write_text(json.dumps({"images": entries[:2], "annotations": boxes[:2], "categories": CATEGORIES[:3]}))
    return {"images": images, "bad": bad, "cut": images / "cut.jpg", "three_classes": three}


def coco_data(images: Path, annotations: Path) -> dict:
    return {"data": {"source": "coco", "images": str(images), "annotations": str(annotations)}}


def keeping_mtime(path: Path, text: str) -> None:
    """Rewrite `path`, its modification time kept: Snakemake sees no newer input, so nothing reruns for it."""
    stat = path.stat()
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def first_val_images(workdir: Path, count: int) -> None:
    """Cut a completed run's val split and reference detections down to its first `count` images (mtimes kept), so
    that a verify job over them takes seconds; the split stays consistent with its reference."""
    val_path, reference_path = workdir / "results/data/val.json", workdir / "results/reference/detections.json"
    val = json.loads(val_path.read_text())
    kept = {image["id"] for image in val["images"][:count]}
    val["images"] = val["images"][:count]
    val["annotations"] = [entry for entry in val["annotations"] if entry["image_id"] in kept]
    keeping_mtime(val_path, json.dumps(val))
    reference = [entry for entry in json.loads(reference_path.read_text()) if entry["image_id"] in kept]
    keeping_mtime(reference_path, json.dumps(reference))


def labels_from_zero(workdir: Path, precision: str) -> None:
    """A wrong network: the recorded head's label offset (the constant added to a class's index to make the model
    label, `labels = index mod per_class + 1`) set to 0, so the first class comes out as label 0, the background.
    The plan's JSON is updated to the record's new hash, as a build of that wrong head would write it."""
    record = workdir / f"results/engine_{precision}.network.safetensors"
    with safe_open(str(record), "np") as file:
        metadata = file.metadata()
    layers = json.loads(next(iter(metadata.values())))["layers"]
    (offset,) = [
        layer["inputs"][1]
        for layer in layers
        if layer["name"].startswith("head/box/candidates/elementwise") and layer["params"].get("op") == "SUM"
    ]
    (constant,) = [layer for layer in layers if offset in [output["name"] for output in layer["outputs"]]]
    arrays = load_file(str(record))
    key = constant["weights"]["weights"]
    assert arrays[key].tolist() == [1], arrays[key]
    arrays[key] = np.zeros_like(arrays[key])
    save_file(arrays, str(record), metadata=metadata)
    sidecar = workdir / f"results/engine_{precision}.json"
    plan = json.loads(sidecar.read_text())
    plan["network_record"]["sha256"] = hashlib.sha256(record.read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(plan, indent=1))


def shadowing_trtflow(workdir: Path) -> Path:
    """Another trtflow, one module edited, where a job's Python looks first: the folder of the script Snakemake
    runs (.snakemake/scripts/). It stands for an environment that imports another copy than the clone's."""
    copy = workdir / ".snakemake/scripts/trtflow"
    shutil.copytree(ROOT / "src/trtflow", copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "workflow.py", "a") as module:
        module.write("\n# another copy of trtflow\n")
    return copy


def left_lock(workdir: Path, target: str) -> None:
    """What a killed run leaves: Snakemake's lock on the files it was making."""
    locks = workdir / ".snakemake/locks"
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "0.output.lock").write_text(f"{target}\n")


# -- the shared runs -------------------------------------------------------------------------------------------


@dataclass
class Runs:
    """Where the runs happen, and what each made (`made`: the paths a row's placeholders stand for)."""

    completed: Path
    scratch: Path  # the config dry runs and the left lock
    first_jobs: Path
    provenance: Path
    reference_engine: Path
    verify: Path
    data: dict[str, Path]
    made: dict[str, Path] = field(default_factory=dict)


def run_console(result) -> str:
    return result.stdout + result.stderr


def trtflow_detect(workdir: Path, *args: str) -> str:
    result = trtflow(workdir, "detect", *args)
    assert result.returncode == 1, run_console(result)[-3000:]
    return run_console(result)


def failing_snakemake(workdir: Path, *args: str, env: dict | None = None) -> str:
    result = snakemake(workdir, *args, check=False, env=env)
    assert result.returncode == 1, result.console[-3000:]
    return result.console


def provoke_all(runs: Runs) -> dict[str, str]:
    """The bad inputs, then every shared run (each a process of its own; the threads only wait): its console."""
    scratch = runs.scratch
    bad_types = config_overlay(scratch, "bad_types.yaml", "model:\n  num_classes: five\n")
    bad_paths = config_overlay(
        scratch,
        "bad_paths.yaml",
        yaml.safe_dump(
            {
                "engine": {"batch": {"min": 1, "opt": 4, "max": 8}},
                "model": {"checkpoint": "models/x.pth"},
                "calibration": {"images": "no/such/images/*.jpg"},
            }
        ),
    )
    left_lock(scratch, "results/plugins/build.json")

    first = runs.first_jobs
    (first / "not_a_state_dict.pth").write_bytes(b"\x00not a pickle")
    two_models = {"models": {"unreadable": {"checkpoint": "not_a_state_dict.pth"}, "seven": {"num_classes": 7}}}
    first_config = config_overlay(
        first, "bad_first.yaml", yaml.safe_dump({**coco_data(runs.data["images"], runs.data["bad"]), **two_models})
    )
    first_targets = (
        "results/data/val.json",
        "results/plugins/build.json",
        "results/unreadable/model/model.json",
        "results/seven/model/model.json",
    )
    runs.made["shadow"] = shadowing_trtflow(runs.provenance)

    reference_engine_config = config_overlay(
        runs.reference_engine,
        "three_classes.yaml",
        yaml.safe_dump({"backend": "tensorrt", **coco_data(runs.data["images"], runs.data["three_classes"])}),
    )
    verify = runs.verify
    first_val_images(verify, 4)
    labels_from_zero(verify, "fp32")
    tight = config_overlay(
        verify, "tight.yaml", yaml.safe_dump({"verify": {"thresholds": {"fp16": {"max_abs_dscore": 1e-4}}}})
    )
    # the verify job's images: the first one with a detection of the first class is the one both name
    val_images = [image["file_name"] for image in json.loads((verify / "results/data/val.json").read_text())["images"]]

    calls = {  # the longest first
        # two verify jobs side by side (each declares a GPU, which a CPU run does not use)
        "verify": lambda: failing_snakemake(
            verify,
            "results/verify/fp32.json",
            "results/verify/fp16.json",
            "--keep-going",
            "--resources",
            "gpu=2",
            *tight,
        ),
        "reference_engine": lambda: failing_snakemake(
            runs.reference_engine,
            "results/reference/metrics.json",
            "results/engine_fp32.plan",
            "--keep-going",
            *reference_engine_config,
        ),
        "first_jobs": lambda: failing_snakemake(
            first, *first_targets, "--keep-going", *first_config, env=without_nvcc()
        ),
        "detect_impossible": lambda: trtflow_detect(
            verify, "--engine", "results/engine_fp32.plan", *val_images, "--fallback"
        ),
        "detect_no_gpu": lambda: trtflow_detect(runs.completed, "--engine", "results/engine_fp32.plan", val_images[0]),
        "provenance": lambda: failing_snakemake(runs.provenance, "results/plugins/build.json"),
        "locked": lambda: failing_snakemake(scratch, "results/plugins/build.json"),
        "config_types": lambda: failing_snakemake(scratch, "--dry-run", *bad_types),
        "config_paths": lambda: failing_snakemake(scratch, "--dry-run", *bad_paths),
    }
    # three at a time: on two cores more processes at once only slow each other (all nine at once: 65 s, three at
    # a time: 47 s, two: 51 s, on this machine under another run's load)
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(call) for name, call in calls.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def runs(completed_run, scratch_run, tmp_path_factory) -> Runs:
    clones = tmp_path_factory.mktemp("troubleshooting")
    return Runs(
        completed=completed_run,
        scratch=scratch_run("troubleshooting_scratch"),
        first_jobs=scratch_run("troubleshooting_first_jobs"),
        provenance=scratch_run("troubleshooting_provenance"),
        reference_engine=clone(completed_run, clones / "reference_engine"),
        verify=clone(completed_run, clones / "verify"),
        data=user_data_set(tmp_path_factory.mktemp("user_data")),
    )


@pytest.fixture(scope="module")
def consoles(runs) -> dict[str, str]:
    return provoke_all(runs)


# -- rows provoked by a run, and what their placeholders stand for ---------------------------------------------

NUMBER = r"\d+\.\d+"


@dataclass(frozen=True)
class Provoked:
    """A row provoked by one of the shared runs: the run, the shape of its error, the failing rule, and what the
    row's placeholders stand for (regular expressions; a function of the runs where they name a made path)."""

    run: str
    shape: str
    rule: str | None = None
    values: Callable[[Runs], dict[str, str]] = lambda runs: {}


BY_RUNS = {
    "config.yaml ...: invalid configuration:": Provoked("config_types", "config"),
    "engine.batch: ...": Provoked("config_paths", "config"),
    "model.checkpoint: models/x.pth does not exist": Provoked("config_paths", "config"),
    "DatasetError: <annotations.json>": Provoked(
        "first_jobs",
        "job",
        "data",
        lambda runs: {
            "<annotations.json>": re.escape(str(runs.data["bad"])),
            "N": "2",
            "<img>": re.escape(str(runs.data["cut"])),
        },
    ),
    "annotation 7 points at category id 9": Provoked("first_jobs", "job", "data"),
    "LabelSetError:": Provoked("reference_engine", "job", "reference", lambda runs: {"80": "3", "91": "5"}),
    "CheckpointError: ... cannot read X": Provoked(
        "first_jobs", "job", "model", lambda runs: {"X": re.escape("not_a_state_dict.pth")}
    ),
    "X: the checkpoint has 5 classes": Provoked(
        "first_jobs", "job", "model", lambda runs: {"X": re.escape("models/demo_detector.safetensors")}
    ),
    "PluginBuildError: nvcc": Provoked("first_jobs", "job", "plugins"),
    "the plan cannot run on this machine; pass --fallback": Provoked("detect_no_gpu", "last"),
    "BackendUnavailableError:": Provoked("reference_engine", "job", "engine"),
    "Directory cannot be locked": Provoked("locked", "snakemake"),
    "classes[0] is 0": Provoked("verify", "job", "verify", lambda runs: {"<image>": r"results/data/val/\d+\.jpg"}),
    "gave an impossible output": Provoked("detect_impossible", "last"),
    "max_abs_dscore 0.03": Provoked("verify", "job", "verify", lambda runs: {"0.03...": NUMBER, "0.02": "0.0001"}),
    "ProvenanceError:": Provoked(
        "provenance",
        "job",
        "plugins",
        lambda runs: {
            "X": re.escape(str(runs.made["shadow"])),
            "Y": re.escape(str(runs.provenance.resolve() / "src/trtflow")),
        },
    ),
}


def row_of(key: str) -> str:
    (row,) = [row for row in ROWS if key in row]
    return row


def test_every_row_is_provoked_here():
    """Each README row has one provocation here (its key is part of the row's text), each provocation one row."""
    keys = [*BY_RUNS, *AT_A_SEAM]
    for row in ROWS:
        assert len([key for key in keys if key in row]) == 1, f"no test (or several) provokes the row {row}"
    for key in keys:
        assert len([row for row in ROWS if key in row]) == 1, f"{key!r} is part of no row (or of several)"


@pytest.mark.parametrize("key", [key for key in BY_RUNS if any(key in row for row in ROWS)])
def test_a_row_at_the_console_of_a_run(consoles, runs, key):
    provoked = BY_RUNS[key]
    patterns = [line_pattern(line, provoked.values(runs)) for line in promised_lines(row_of(key))]
    assert_one_line(Console(consoles[provoked.run], provoked.shape, provoked.rule), patterns)


# -- rows provoked at a seam -----------------------------------------------------------------------------------


def detect_on_a_gpu(gpu: runtime.Gpu, completed_run: Path, monkeypatch, capsys) -> str:
    """`trtflow detect` on the completed run's fp32 plan where torch would see `gpu`: everything but the device
    query is the real path (the plan's metadata, the refusals, the ladder without --fallback, the CLI's line)."""
    monkeypatch.setattr(runtime, "visible_gpu", lambda: gpu)
    monkeypatch.chdir(completed_run)
    image = json.loads(Path("results/data/val.json").read_text())["images"][0]["file_name"]
    assert cli.main(["detect", "--engine", "results/engine_fp32.plan", image]) == 1
    return capsys.readouterr().err


# A job's process with nothing but the job wrapper around the stage's write: the JSON goes through
# trtflow.artifacts as every stage's does, and the disk's answer to fsync is "no space left".
DISK_FULL_JOB = """
import errno, os, sys, types
from trtflow.artifacts import write_json
from trtflow.workflow import script_logging

def no_space_left(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

os.fsync = no_space_left
job = types.SimpleNamespace(log=[sys.argv[1]], scriptdir=sys.argv[2])
with script_logging(job):
    write_json(sys.argv[3], {"mAP": 0.5})
"""


def disk_full_job(tmp_path: Path) -> tuple[str, dict[str, str]]:
    target = tmp_path / "results/metrics.json"
    target.parent.mkdir()
    log = tmp_path / "job.log"
    job = subprocess.run(
        [sys.executable, "-c", DISK_FULL_JOB, str(log), str(ROOT / "workflow/scripts"), str(target)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=120,
    )
    assert job.returncode == 1 and job.stdout == "" and not target.exists(), job.stderr
    assert "Traceback" in log.read_text()  # the traceback went to the job's log
    assert len(job.stderr.splitlines()) == 1, job.stderr  # the job's console: its error line alone
    return job.stderr, {"<file>": re.escape(str(target))}


# row key -> how the row's error is provoked: (console, {placeholder: regular expression})
AT_A_SEAM = {
    "compute capability 9.0 (Hopper)": lambda completed_run, tmp_path, monkeypatch, capsys: (
        detect_on_a_gpu(runtime.Gpu("NVIDIA H100 80GB HBM3", "9.0"), completed_run, monkeypatch, capsys),
        {},
    ),
    "the plan targets compute capabilities": lambda completed_run, tmp_path, monkeypatch, capsys: (
        detect_on_a_gpu(runtime.Gpu("Tesla T4", "7.5"), completed_run, monkeypatch, capsys),
        {"<GPU>": "Tesla T4"},
    ),
    "DiskFullError:": lambda completed_run, tmp_path, monkeypatch, capsys: disk_full_job(tmp_path),
}


@pytest.mark.parametrize("key", [key for key in AT_A_SEAM if any(key in row for row in ROWS)])
def test_a_row_provoked_at_its_seam(completed_run, tmp_path, monkeypatch, capsys, key):
    """The console is the CLI's or the job's stderr alone: the row's line is its last line (the job's only one)."""
    console, values = AT_A_SEAM[key](completed_run, tmp_path, monkeypatch, capsys)
    patterns = [line_pattern(line, values) for line in promised_lines(row_of(key))]
    assert_one_line(Console(console, "last"), patterns)
