"""`snakemake --report report.zip` on the shared completed run: the workflow description, every plot and table of
rule report and the verify / bench JSONs, each with its caption."""

import json
import re
import zipfile
from pathlib import Path

import pytest

from snakemake_runs import ROOT, snakemake

ITEMS = ("latency.png", "dscore.png", "calibration.png", "examples.png", "summary.tsv", "report.html")
# a phrase of each caption (and of the workflow description) as the report renders it
CAPTIONS = {
    "workflow.rst": "Read <strong>verify</strong> first",
    "latency.rst": "Median latency per batch",
    "dscore.rst": "Score differences of matched detections",
    "calibration.rst": "the calibrated amax of every quantized tensor",
    "examples.rst": "The first val images",
    "summary.rst": "One row per precision",
    "verify.rst": "Verification of one precision",
    "bench.rst": "Latency of one precision",
    "report_html.rst": "one-page report",
}

ITEM_CAPTIONS = [name for name in CAPTIONS if name != "workflow.rst"]  # the workflow's description has no job


@pytest.fixture(scope="module")
def report_zip(completed_run, tmp_path_factory) -> zipfile.ZipFile:
    path = tmp_path_factory.mktemp("snakemake_report") / "report.zip"
    snakemake(completed_run, "--report", str(path))
    return zipfile.ZipFile(path)


def test_the_report_holds_every_plot_table_and_result(report_zip, completed_run):
    files = {Path(name).name: name for name in report_zip.namelist() if "/data/raw/" in name}
    assert set(ITEMS) <= set(files), sorted(files)
    for name in ITEMS[:-1]:  # the very files rule report wrote
        assert report_zip.read(files[name]) == (completed_run / "results/report" / name).read_bytes(), name
    json_items = [name for name in report_zip.namelist() if name.endswith(".json")]
    assert len(json_items) == 6  # verify and bench of three precisions
    assert {json.loads(report_zip.read(name))["precision"] for name in json_items} == {"fp32", "fp16", "int8"}


def test_every_item_has_its_caption_and_the_workflow_its_description(report_zip):
    page = report_zip.read("report/report.html").decode()
    for caption, phrase in CAPTIONS.items():
        assert (ROOT / "workflow/report" / caption).is_file()
        assert phrase in page, caption


def test_captions_name_the_files_of_their_job(report_zip):
    """Captions are templates (`snakemake.input` / `output` of the job), so under `models:` they name
    results/<model>/...; none spells a results/ path itself."""
    text = re.sub(r"<[^>]+>", "", report_zip.read("report/report.html").decode())  # captions as read
    for caption in ITEM_CAPTIONS:
        assert "results/" not in (ROOT / "workflow/report" / caption).read_text(), caption
    for rendered in (
        "Verification of one precision (results/verify/int8.json)",
        "Latency of one precision (results/bench/fp16.json)",
        "on this machine (results/bench/fp32.json, results/bench/fp16.json, results/bench/int8.json)",
        "INT8 calibration ranges (results/calib/ranges.json)",
        "one-page report (results/report.html, self-contained)",
    ):
        assert rendered in text, rendered


def test_each_precision_item_is_labelled_with_its_verdict(report_zip):
    """The verify and bench items of each precision carry its verdict in words, read from its verify JSON."""
    page = report_zip.read("report/report.html").decode()
    labels = [json.loads(found) for found in re.findall(r'"labels": (\{[^}]*\})', page)]
    verdicts = sorted((label["precision"], label["verdict"]) for label in labels if "verdict" in label)
    assert verdicts == sorted(
        2 * [(precision, "passed at network definition") for precision in ("fp32", "fp16", "int8")]
    )
