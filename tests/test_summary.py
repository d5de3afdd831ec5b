"""trtflow.run.summary: each precision's verdict in words at the end of a `snakemake` run's console, read from the
verify JSONs there are; and `snakemake --report` before the default target ran reports what is built and says which
target to run for the rest."""

import json
import shutil
import subprocess
import sys
import zipfile

import pytest

from snakemake_runs import PRECISIONS, clone, snakemake
from trtflow.run.summary import print_verdicts, verdict_lines, verdict_words

NETWORK_DEFINITION = {
    "verified_level": "network-definition",
    "engine_executed": False,
    "match_recall": 0.9521,
    "match_precision": 0.9362,
    "max_abs_dscore": 0.4034,
    "map_drop_points": -0.34,
    "failures": [],
    "passed": True,
}


def write_verify(results, name, **fields):
    path = results / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**NETWORK_DEFINITION, **fields}))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({}, "passed at network definition"),
        ({"verified_level": "engine", "engine_executed": True}, "passed at engine"),
        ({"passed": False, "verified_level": "deployment-form"}, "failed at deployment form"),
        ({"verified_level": None, "engine_executed": True, "passed": False}, "failed at engine"),  # before levels
    ],
)
def test_a_verdict_is_pass_or_fail_at_its_level(fields, words):
    assert verdict_words({**NETWORK_DEFINITION, **fields}) == words


def test_one_line_per_precision_with_its_numbers_and_what_its_level_left_unverified(tmp_path):
    results = tmp_path / "results"
    write_verify(results, "verify/fp32.json")
    write_verify(results, "verify/fp32_detections.json")  # not a verdict: detections
    write_verify(
        results, "verify/int8.json", passed=False, failures=["match_recall 0.9521 < 0.99"], verified_level="engine"
    )
    lines = verdict_lines(results)
    assert lines[0].startswith("trtflow verification (") and "deployment form < network definition < engine" in lines[0]
    assert lines[1:3] == [
        "  fp32  passed at network definition    match recall 0.9521, precision 0.9362, max |Δscore| 0.403, "
        "mAP drop -0.34 points",
        "  int8  failed at engine                match recall 0.9521, precision 0.9362, max |Δscore| 0.403, "
        "mAP drop -0.34 points; FAILED: match_recall 0.9521 < 0.99",
    ]
    assert lines[3:] == [
        "  at network definition: TensorRT's compilation of this network (layer fusion, kernel choice, "
        "reduced-precision kernels) did not run here"
    ]


def test_models_are_named_and_nothing_is_printed_without_a_verify_json(tmp_path, capsys):
    results = tmp_path / "results"
    print_verdicts(results)
    (results / "verify").mkdir(parents=True)
    print_verdicts(results)
    assert capsys.readouterr().out == ""
    write_verify(results, "demo_320/verify/fp16.json", impossible_output="a box beyond the image")
    print_verdicts(results)
    assert capsys.readouterr().out.splitlines()[1] == (
        "  demo_320 fp16  passed at network definition    impossible output: a box beyond the image"
    )


def test_the_snakefile_imports_the_summary_without_torch():
    """The Snakefile imports the summary at start, before any job: torch would cost every run seconds."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, trtflow.run.summary; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "False"


def test_a_run_ends_with_every_precision_verdict(completed_run, tmp_path):
    """A run that reruns a job prints the verdicts last (Snakemake's onsuccess). A no-op rerun prints nothing:
    Snakemake returns before its onsuccess / onerror handlers where nothing is to be done."""
    run = clone(completed_run, tmp_path / "run")
    console = snakemake(run, "--forcerun", "report").console
    verdicts = console[console.index("trtflow verification (results/**/verify/*.json") :].splitlines()
    assert [line.split()[:4] for line in verdicts[1:4]] == [
        [precision, "passed", "at", "network"] for precision in sorted(PRECISIONS)
    ]
    for line in verdicts[1:4]:
        assert "match recall" in line and "mAP drop" in line
    noop = snakemake(run).console
    assert "Nothing to be done" in noop and "trtflow verification" not in noop


def test_snakemake_report_after_make_demo_covers_what_is_built_and_says_what_it_lacks(completed_run, tmp_path):
    """`make demo` builds only results/engine_int8.plan and what it needs: `snakemake --report` then makes the report
    of those jobs (Snakemake alone stops at the first report item not built) and says what to run for the rest."""
    run = clone(completed_run, tmp_path / "after_make_demo")
    for name in ("verify", "bench", "report", "report.html", "reference", "onnx/parity.json", "calib/accuracy.json"):
        shutil.rmtree(run / "results" / name) if (run / "results" / name).is_dir() else (
            run / "results" / name
        ).unlink()
    for precision in ("fp32", "fp16"):
        for suffix in (".plan", ".json", ".network.safetensors"):
            (run / f"results/engine_{precision}{suffix}").unlink()
    report = snakemake(run, "--report", "report.zip")
    assert (
        "snakemake --report: results/report.html is not built yet (`make demo` builds only results/engine_int8.plan), "
        "so the report holds the jobs that ran and no verification: run `snakemake --cores 2` first for the verdicts, "
        "plots and tables"
    ) in report.console
    with zipfile.ZipFile(run / "report.zip") as archive:
        # the description and the runtime of the jobs that ran (engine, calibrate ...); no item yet
        assert archive.namelist() == ["report/report.html"]
        assert "calibrate" in archive.read("report/report.html").decode()
