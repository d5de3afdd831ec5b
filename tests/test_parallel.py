"""Parallel runs: independent jobs run together, GPU jobs queue for the GPU, shared files survive concurrent writers.

The engine builds here are TensorRT-RTX ahead-of-time builds (no GPU needed): the three precisions
are independent jobs. Full TensorRT builds on the GPU and declares `gpu=1`, so the default profile
(`resources: gpu: 1`) queues them; `--set-resources engine:gpu=1` reproduces that scheduling here.
"""

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest
import yaml

from snakemake_runs import PRECISIONS, ROOT, clone, config_overlay, events_of, jobs_of, snakemake

ENGINES = tuple(f"results/engine_{precision}.plan" for precision in PRECISIONS)
# Rules that use a GPU when one is there: training, full-TensorRT builds, and running the engines.
GPU_RULES = {"train_demo", "engine", "verify", "bench"}
# Metadata that describes the build rather than what was built: it may differ between two builds.
BUILD_RECORD_KEYS = {"build_seconds", "plan_sha256", "plan_bytes", "timing_cache"}


def build_engines(workdir: Path, *args: str) -> tuple[str, dict]:
    """Force the three engine builds with 4 cores; (Snakemake's log, {precision: (plan sha256, metadata)})."""
    result = snakemake(workdir, *ENGINES, "--forcerun", "engine", *args, cores=4)
    built = {}
    for precision in PRECISIONS:
        plan = (workdir / f"results/engine_{precision}.plan").read_bytes()
        record = json.loads((workdir / f"results/engine_{precision}.json").read_text())
        built[precision] = (hashlib.sha256(plan).hexdigest(), record)
    return result.console, built


def overlapping(events: list[tuple[str, str]], rule: str) -> int:
    """The most jobs of `rule` that were running at the same time."""
    running = most = 0
    for kind, name in events:
        if name == rule:
            running += 1 if kind == "start" else -1
            most = max(most, running)
    return most


@pytest.fixture(scope="module")
def two_builds(completed_run, tmp_path_factory) -> tuple[Path, tuple[str, dict], tuple[str, dict]]:
    """The three engine builds forced twice in one clone of the completed run: first with room for three at once
    (even where the builds claim a GPU each, as full TensorRT's do), then as the default profile schedules them, with
    `gpu=1` per build (as full TensorRT declares). Two forced builds of the three for both tests, not three."""
    workdir = clone(completed_run, tmp_path_factory.mktemp("parallel") / "run")
    together = build_engines(workdir, "--resources", "gpu=3")
    queued = build_engines(
        workdir, "--workflow-profile", "workflow/profiles/default", "--set-resources", "engine:gpu=1"
    )
    return workdir, together, queued


def test_three_engine_builds_run_together_and_twice_give_identical_plans(two_builds):
    """The first build runs the three side by side; the second, one at a time, gives the same plans."""
    workdir, (first_log, first), (_, second) = two_builds
    assert overlapping(events_of(first_log), "engine") == 3, first_log[-3000:]
    backend = first["fp32"][1]["backend"]
    for precision in PRECISIONS:
        (first_sha, first_record), (second_sha, second_record) = first[precision], second[precision]
        described = {k: v for k, v in first_record.items() if k not in BUILD_RECORD_KEYS}
        assert described == {k: v for k, v in second_record.items() if k not in BUILD_RECORD_KEYS}, precision
        if backend == "tensorrt_rtx":
            # TensorRT-RTX builds are deterministic: the same inputs give the same bytes, whatever ran beside them
            assert first_sha == second_sha == first_record["plan_sha256"], precision
            # and it has no timing cache: the metadata says so instead of writing an empty one
            assert first_record["timing_cache"] == {
                "used": False,
                "reason": f"tensorrt_rtx {first_record['backend_version']} does not use timing caches",
            }
        else:  # full TensorRT times tactics on the GPU: plans may differ in bytes, the shared cache is merged
            assert first_record["timing_cache"]["used"] and second_record["timing_cache"]["used"]
    assert (workdir / "results/cache/timing.cache").exists() == (backend == "tensorrt")


def test_the_default_profile_lets_one_gpu_job_run_at_a_time(completed_run, two_builds):
    """With `gpu=1` per build (as full TensorRT declares) and the profile's gpu: 1, the builds queue."""
    profile = yaml.safe_load((ROOT / "workflow/profiles/default/config.yaml").read_text())
    assert profile["resources"] == {"gpu": 1}
    _, _, (log, built) = two_builds
    assert overlapping(events_of(log), "engine") == 1, log[-3000:]
    reference = json.loads((completed_run / "results/engine_fp32.json").read_text())["plan_sha256"]
    assert built["fp32"][0] == reference


def test_a_plain_snakemake_run_picks_up_the_default_profile(completed_run):
    """Users type `snakemake --cores 4 ...`: the GPU limit only holds if Snakemake finds the profile by itself."""
    result = snakemake(completed_run, "--dry-run")
    assert "Using workflow specific profile" in result.console, (
        "Snakemake looks for the default workflow profile in profiles/default/ beside the Snakefile (or in the "
        "working directory), so workflow/profiles/default/ is not found unless the Snakefile moves to workflow/ "
        "or the profile to profiles/default/"
    )


@pytest.fixture(scope="module")
def every_job(completed_run) -> list:
    """Every job of a fresh full-TensorRT pipeline with demo training, as the dry run schedules them."""
    overlay = config_overlay(completed_run, "full_tensorrt.yaml", "backend: tensorrt\nmodel:\n  checkpoint: train\n")
    result = snakemake(completed_run, "--dry-run", "--forceall", *overlay)
    return jobs_of(result.console)


def test_exactly_the_gpu_rules_claim_a_gpu(every_job):
    claims = {}
    for job in every_job:
        claims.setdefault(job.rule, set()).add(job.resources.get("gpu", "0"))
    assert {rule for rule, gpus in claims.items() if gpus == {"1"}} == GPU_RULES
    assert all(gpus == {"0"} for rule, gpus in claims.items() if rule not in GPU_RULES), claims


def test_every_job_logs_under_logs_and_its_rule(every_job):
    """`logs/{rule}/...`: one folder per rule, so a failed job's log is found by the rule's name."""
    targets = {"all", "engines"}  # rules that only collect files run nothing and log nothing
    working = [job for job in every_job if job.rule not in targets]
    assert {job.rule for job in working} >= {"data", "model", "train_demo", "engine", "verify", "report"}
    for job in working:
        logs = job.fields.get("log", "").split(", ")
        assert all(log.startswith(f"logs/{job.rule}/") for log in logs), (job.name, logs)
    assert len({job.fields["log"] for job in working}) == len(working)  # no two jobs share a log


def _write_repeatedly(path: str, fill: int, size: int, times: int) -> None:
    from trtflow.artifacts import write_bytes

    for _ in range(times):
        write_bytes(path, bytes([fill]) * size)


def _read_while_written(path: str, size: int, stop, torn) -> None:
    while not stop.is_set():
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            continue
        if len(data) != size or len(set(data)) != 1:
            torn.value += 1


def test_concurrent_writers_of_one_artifact_never_leave_a_torn_file(tmp_path):
    """Four processes rewrite one file while a fifth reads it: every read is one writer's whole content."""
    path, size = str(tmp_path / "shared.bin"), 4 << 20
    context = multiprocessing.get_context("spawn")
    stop, torn = context.Event(), context.Value("i", 0)
    reader = context.Process(target=_read_while_written, args=(path, size, stop, torn))
    reader.start()
    writers = [context.Process(target=_write_repeatedly, args=(path, fill, size, 10)) for fill in range(1, 5)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    stop.set()
    reader.join(30)
    assert [writer.exitcode for writer in writers] == [0] * 4
    assert torn.value == 0
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]  # no staging file left behind
    assert len(set(Path(path).read_bytes())) == 1
