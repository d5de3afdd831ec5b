"""The cluster profiles schedule: a dry run of every job through each profile asks for no more threads than the
profile's `max-threads`.

The SLURM and Kubernetes executor plugins are not installed here, so each profile is dry-run with its own
threads and resources (`set-threads`, `default-resources`, `set-resources`) through the cluster-generic
executor; its executor-, storage- and container-specific keys and its `max-threads` (which would cap the threads
and hide what the rules ask for) are left out. `--cores` is set far above any machine so that nothing is scaled
down either: the threads in the dry run are what the rules and the profile request.
"""

from pathlib import Path

import pytest
import yaml

from snakemake_runs import ROOT, config_overlay, jobs_of, snakemake

PROFILES = ("slurm", "kubernetes")
# profile keys that only the named executor or storage plugin understands
PLUGIN_KEYS = (
    "executor",
    "jobs",
    "max-threads",
    "container-image",
    "default-storage-provider",
    "default-storage-prefix",
    "kubernetes-",
)
UNBOUNDED_CORES = 1_000_000


def generic_profile(name: str, folder: Path) -> tuple[dict, Path]:
    """(the profile as shipped, a copy of its scheduling keys on the cluster-generic executor in `folder`)."""
    profile = yaml.safe_load((ROOT / "workflow/profiles" / name / "config.yaml").read_text())
    kept = {key: value for key, value in profile.items() if not key.startswith(PLUGIN_KEYS)}
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        yaml.safe_dump({**kept, "executor": "cluster-generic", "cluster-generic-submit-cmd": "false", "jobs": 20})
    )
    return profile, folder


@pytest.fixture(scope="module")
def scratch_with_training(completed_run) -> tuple[str, ...]:
    """Every rule, the demo training included."""
    return config_overlay(completed_run, "train_overlay.yaml", "model:\n  checkpoint: train\n")


@pytest.mark.parametrize("name", PROFILES)
def test_no_job_of_a_cluster_profile_asks_for_more_threads_than_its_maximum(
    name, completed_run, scratch_with_training, tmp_path
):
    profile, folder = generic_profile(name, tmp_path / name)
    maximum = profile["max-threads"]
    assert isinstance(maximum, int) and maximum >= 1, f"workflow/profiles/{name}: set max-threads"
    result = snakemake(
        completed_run,
        "--profile",
        str(folder),
        "--dry-run",
        "--forceall",
        *scratch_with_training,
        cores=UNBOUNDED_CORES,
    )
    jobs = jobs_of(result.console)
    threads = {job.name: int(job.fields.get("threads", 1)) for job in jobs}
    assert {"train_demo", "calibrate", "engine", "verify", "bench", "report"} <= {job.rule for job in jobs}
    assert all(value <= maximum for value in threads.values()), (name, maximum, threads)
    # bench asks for the profile's threads (not every core of the unbounded run), calibrate its own 4
    assert {value for job, value in threads.items() if job.startswith("bench[")} == {profile["set-threads"]["bench"]}
    assert threads["calibrate"] == 4
    # a CPU count a resource sets directly (SLURM's cpus_per_task) is bounded too
    for job in jobs:
        cpus = job.resources.get("cpus_per_task")
        assert cpus is None or int(cpus) <= maximum, (name, job.name, cpus)
