"""trtflow.run.report: the page renders from the stages' JSONs, with its tables and plots, and a headless browser
draws it (skipped, with the reason, where no Chromium is installed)."""

import base64
import json
import re

import cv2
import numpy as np
import pytest

from test_executors import small_coco
from test_plan_metadata import plan_metadata
from trtflow.run.levels import LEVELS
from trtflow.run.matching import match_detections
from trtflow.run.report import FIGURES, build_report, find_browser, level_words, screenshot, tensor_census_words
from trtflow.run.verify import Thresholds

PRECISIONS = ("fp32", "int8")
MODEL = "demo_320"  # a `models:` entry: its artifacts under results/demo_320/


def shifted(detections, dx, dscore):
    return [
        {**d, "bbox": [d["bbox"][0] + dx, *d["bbox"][1:]], "score": round(d["score"] + dscore, 5)} for d in detections
    ]


@pytest.fixture(scope="module")
def stage_layout(tmp_path_factory):
    """The JSONs the report reads, where the stages write them for the model `MODEL` of `models:` (absolute paths
    under a working directory, `workdir`): a 3-image data set, a reference, fp32 deployed exactly, int8 deployed
    shifted (one detection lost), their verify and bench results, engines, parity and calibration files."""
    workdir = tmp_path_factory.mktemp("report")
    coco = small_coco(workdir, ((120, 160), (96, 128), (80, 80)))

    def write(name, payload):
        path = workdir / "results" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))
        return path

    def model_file(name, payload):
        return write(f"{MODEL}/{name}", payload)

    reference = [
        {"image_id": i["id"], "category_id": 1, "bbox": [10.0 * k, 5.0, 30.0, 40.0], "score": 0.9 - 0.1 * k}
        for i in coco["images"]
        for k in range(3)
    ]
    deployed = {"fp32": reference, "int8": shifted(reference[:-1], 1.0, -0.02)}
    files = {
        "val_json": write("data/val.json", coco),
        "reference_detections": model_file("reference/detections.json", reference),
        "reference_metrics": model_file("reference/metrics.json", {"mAP": 0.849}),
        "parity": model_file("onnx/parity.json", {"images": 4, "max_abs": 1.9e-5, "tolerance": 1e-4, "passed": True}),
        "calibration_ranges": model_file(
            "calib/ranges.json",
            {
                "algorithm": "entropy",
                "num_images": 64,
                "tensors": {f"relu_{k}": {"amax": 2.0**k, "scale": 2.0**k / 127} for k in range(6)},
            },
        ),
        "calibration_accuracy": model_file(
            "calib/accuracy.json",
            {"fp32_mAP": 0.849, "int8_sim_mAP": 0.846, "int8_delta": 0.003, "executor": "onnxruntime"},
        ),
        # calibration.keep_float.auto: three layers measured, the costliest left in float
        "sensitivity": {
            "int8": model_file(
                "calib/sensitivity_int8.json",
                {
                    "precision": "int8",
                    "images": {"images": 32, "of": 100, "seed": 0},
                    "layers": [
                        {"name": f"conv_{k}", "weight": f"w{k}", "sqnr_db": 10.0 * (k + 1), "gain_points": 3.0 - k}
                        for k in range(3)
                    ],
                    "fp32_mAP": 0.849,
                    "quantized_mAP": 0.8,
                    "rank_correlation": 1.0,
                },
            )
        },
        "float_layers": {
            "int8": model_file(
                "calib/float_layers_int8.json",
                {
                    "float_layers": ["conv_0"],
                    "of_layers": 3,
                    "fp32_mAP": 0.849,
                    "mAP": 0.846,
                    "drop_points": 0.3,
                    "budget_points": 0.5,
                    "budget_key": "verify.thresholds.int8.max_map_drop_points",
                    "images": {"images": 100, "of": 100, "seed": 0},
                    "steps": [
                        {"change": "none", "float_layers": 0, "mAP": 0.8, "drop_points": 4.9},
                        {"change": "all", "float_layers": 3, "mAP": 0.849, "drop_points": 0.0},
                        {"change": "add", "float_layers": 1, "mAP": 0.846, "drop_points": 0.3},
                    ],
                },
            )
        },
        "verify": {},
        "deployed": {},
        "bench": {},
        "engines": {},
    }
    for precision in PRECISIONS:
        matching = match_detections(reference, deployed[precision])
        failures = Thresholds(min_match_recall=0.99).failures(matching.summary())
        files["deployed"][precision] = model_file(f"verify/{precision}_detections.json", deployed[precision])
        files["verify"][precision] = model_file(
            f"verify/{precision}.json",
            {
                "precision": precision,
                "executor": "onnxruntime+static-head",
                "engine_executed": False,
                "reason": "cannot run engine: no CUDA GPU is visible <here>",
                "executor_details": {"head_dtype": "float32"},
                "images": 3,
                **matching.summary(),
                "match_iou": 0.9,
                "mAP": 0.8,
                "reference_mAP": 0.849,
                "map_drop_points": 4.9,
                "thresholds": {"min_match_recall": 0.99},
                "failures": failures,
                "passed": not failures,
            },
        )
        files["bench"][precision] = model_file(
            f"bench/{precision}.json",
            {
                "precision": precision,
                "hardware": {"cpu": "Test CPU", "gpu": None},
                "results": [
                    {"executor": "tensorrt", "skipped": "no CUDA GPU is visible"},
                    {
                        "executor": "pytorch",
                        "dtype": "float32",
                        "device": "cpu",
                        "batch_size": 1,
                        "p50_ms": 14.0,
                        "p90_ms": 15.0,
                        "p99_ms": 16.0,
                        "throughput_ips": 70.0,
                    },
                    {
                        "executor": "onnxruntime+static-head",
                        "head_dtype": "float32",
                        "batch_size": 1,
                        "p50_ms": 80.0,
                        "p90_ms": 90.0,
                        "p99_ms": 95.0,
                        "throughput_ips": 12.0,
                    },
                ],
            },
        )
        files["engines"][precision] = model_file(
            f"engine_{precision}.json",
            plan_metadata(precision=precision, plan_bytes=19_000_000, build_seconds=2.7).document(),
        )
    return workdir, files


@pytest.fixture(scope="module")
def stage_files(stage_layout):
    return stage_layout[1]


@pytest.fixture(scope="module")
def report(stage_layout):
    """The report of `MODEL`, rendered from the pipeline's working directory as rule report does."""
    workdir, files = stage_layout
    out = workdir / "results" / MODEL / "report.html"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        text = build_report(out, **files, settings={"example_images": 2, "min_score": 0.5})
    return out, text


def stage_table(text: str) -> list[list[str]]:
    """The cells of the "Stages and their checks" table, one list per row."""
    body = re.search(r"<h2>Stages and their checks</h2>\n<table>.*?<tbody>(.*?)</tbody>", text).group(1)
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_report_holds_every_stage_and_precision(report):
    path, text = report
    assert path.read_text() == text
    # each row names the file the report was given, relative to the working directory: the model's own folder
    assert [row[:2] for row in stage_table(text)] == [
        ["onnx", f"results/{MODEL}/onnx/parity.json"],
        ["calibrate", f"results/{MODEL}/calib/ranges.json"],
        ["calibrate", f"results/{MODEL}/calib/accuracy.json"],
        ["calibrate", f"results/{MODEL}/calib/float_layers_int8.json"],
        ["engine", f"results/{MODEL}/engine_fp32.plan"],
        ["engine", f"results/{MODEL}/engine_int8.plan"],
        ["verify", f"results/{MODEL}/verify/fp32.json"],
        ["verify", f"results/{MODEL}/verify/int8.json"],
        ["bench", f"results/{MODEL}/bench/fp32.json"],
        ["bench", f"results/{MODEL}/bench/int8.json"],
    ]
    assert "results/engine_" not in text and "results/onnx/" not in text and "results/verify/" not in text
    assert "<h3>fp32<span" in text and "<h3>int8<span" in text
    # parity and the legend's example; no verify is green: the engine did not run
    assert text.count('class="pass">passed') == 2 and 'class="pass">passed at engine</span> the plan itself' in text
    # fp32 passed on the deployment form: amber in the stage table, its heading and its verdict
    assert text.count('class="partial">passed at deployment form') == 3
    # int8 failed, in words with its level, in the same three places
    assert text.count('class="fail">FAILED at deployment form: match_recall 0.8889 &lt; 0.99') == 3
    assert "match_recall 0.8889 &lt; 0.99" in text  # int8 lost one detection in nine, named and HTML-escaped
    assert "no CUDA GPU is visible &lt;here&gt;" in text
    assert "simulated int8 mAP 0.8460 vs fp32 0.8490 (drop 0.30 points) (onnxruntime)" in text
    assert stage_table(text)[3][2] == (
        "int8: 1 of 3 layers left in float (conv_0); simulated mAP 0.8460 vs float 0.8490 (drop 0.30 points, budget "
        "0.5: verify.thresholds.int8.max_map_drop_points; 100 of 100 val images)"
    )
    assert stage_table(text)[4][2] == "tensorrt_rtx 1.7.1.116, built cpu-aot, 19.0 MB in 2.7 s, RoIAlign builtin"


def test_the_levels_read_as_words_of_the_one_ladder():
    """The report shows each of trtflow.run.levels.LEVELS in words."""
    assert {level: level_words(level) for level in LEVELS} == {
        "deployment-form": "deployment form",
        "network-definition": "network definition",
        "engine": "engine",
    }


def test_report_embeds_five_decodable_plots(report):
    _, text = report
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', text)
    assert [alt for alt, _ in images] == [
        "latency bars",
        "Δscore histogram",
        "calibration ranges",
        "layer sensitivity",
        "example images",
    ]
    for alt, data in images:
        picture = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        assert picture is not None and min(picture.shape[:2]) >= 200 and picture.std() > 10, alt


def test_report_writes_its_plots_and_summary_for_snakemake_report(stage_files, tmp_path):
    figures = {name: tmp_path / f"{name}.png" for name in FIGURES}
    build_report(
        tmp_path / "report.html",
        **stage_files,
        settings={"example_images": 2},
        figures=figures,
        summary_tsv=tmp_path / "summary.tsv",
    )
    for name, path in figures.items():
        picture = cv2.imread(str(path))
        assert picture is not None and min(picture.shape[:2]) >= 200 and picture.std() > 10, name
    rows = [line.split("\t") for line in (tmp_path / "summary.tsv").read_text().splitlines()]
    assert rows[0][:4] == ["precision", "verified", "passed", "executor"]
    assert [row[:5] for row in rows[1:]] == [
        ["fp32", "deployment-form", "True", "onnxruntime+static-head", "1"],
        ["int8", "deployment-form", "False", "onnxruntime+static-head", "0.8889"],
    ]
    # the fastest timed executor per image, and why the engine did not run
    assert rows[1][9:] == [
        "pytorch float32 bs 1",
        "14",
        "cannot run engine: no CUDA GPU is visible <here>",
        "tensorrt (no CUDA GPU is visible)",
    ]


def test_the_bench_summary_times_only_the_executors_that_ran_the_precision(stage_files, tmp_path):
    """fp16 on a CPU: the plan is skipped and PyTorch runs float32 (faster, with a note); only the float16 head
    counts as fp16, and a line names the other two with why."""
    timed = {"batch_size": 1, "p90_ms": 90.0, "p99_ms": 95.0, "throughput_ips": 1.0}
    fp16 = {
        "precision": "fp16",
        "hardware": {"cpu": "Test CPU", "gpu": None},
        "results": [
            {"executor": "tensorrt", "skipped": "no CUDA GPU is visible"},
            {"executor": "onnxruntime+static-head", "head_dtype": "float16", "providers": ["CPU"], "p50_ms": 80.0}
            | timed,
            {"executor": "pytorch", "dtype": "float32", "note": "fp16: PyTorch float16 needs a CUDA GPU; ran float32"}
            | {"p50_ms": 14.0}
            | timed,
        ],
    }
    (tmp_path / "fp16.json").write_text(json.dumps(fp16))
    text = build_report(
        tmp_path / "report.html",
        **{**stage_files, "verify": {}, "bench": {"fp16": tmp_path / "fp16.json"}},
        summary_tsv=tmp_path / "summary.tsv",
    )
    row = dict(zip(*[line.split("\t") for line in (tmp_path / "summary.tsv").read_text().splitlines()], strict=True))
    assert (row["fastest"], row["p50_ms"]) == ("onnxruntime+static-head float16 bs 1", "80")
    assert row["not_timed_here"] == (
        "tensorrt (no CUDA GPU is visible); pytorch float32 (fp16: PyTorch float16 needs a CUDA GPU; ran float32)"
    )
    bench_table = re.search(r"<h3>fp16</h3>\n<table>.*?</table>\n(.*)", text).group(0)
    assert [
        cells[0]
        for cells in map(lambda r: re.findall(r"<td>(.*?)</td>", r), re.findall(r"<tr>(.*?)</tr>", bench_table))
        if cells
    ] == ["onnxruntime+static-head float16"]
    assert "<td>providers CPU</td>" in bench_table
    assert (
        "<p class=note>Not timed as fp16 here: tensorrt (no CUDA GPU is visible); pytorch float32 (fp16: PyTorch "
        "float16 needs a CUDA GPU; ran float32).</p>" in text
    )


def test_executor_details_read_as_words_not_python(stage_files, tmp_path):
    """The recorded network's executor details hold a mapping (built_by), ONNX Runtime's a list (providers): shown
    as their values, and whether the engine ran as yes / no."""
    result = json.loads(stage_files["verify"]["fp32"].read_text())
    result["executor_details"] = {"built_by": {"module": "tensorrt_rtx", "version": "1.7.1.116"}, "layers": 1246}
    (tmp_path / "fp32.json").write_text(json.dumps(result))
    text = build_report(tmp_path / "report.html", **{**stage_files, "verify": {"fp32": tmp_path / "fp32.json"}})
    assert "(built_by tensorrt_rtx 1.7.1.116, layers 1246)" in text
    assert "<td>engine executed</td><td>no</td>" in text
    assert "{" not in re.sub(r"<style>.*?</style>", "", text, flags=re.S) and "[&#x27;" not in text


def test_an_empty_plot_is_written_as_a_note(stage_files, tmp_path):
    build_report(tmp_path / "report.html", **{**stage_files, "bench": {}}, figures={"latency": tmp_path / "l.png"})
    assert cv2.imread(str(tmp_path / "l.png")).shape[:2] == (150, 600)


@pytest.mark.parametrize(
    ("fields", "badge"),
    [
        ({"verified_level": "engine", "engine_executed": True}, 'class="pass">passed at engine'),
        (
            {
                "verified_level": "network-definition",
                "engine_executed": False,
                "unverified": "the engine's kernels did not run",
            },
            'class="partial">passed at network definition',
        ),
        ({"engine_executed": True}, 'class="pass">passed at engine'),  # a JSON from before verified_level
        (
            {"verified_level": "network-definition", "passed": False, "failures": ["match_recall 0.5 < 0.99"]},
            'class="fail">FAILED at network definition: match_recall 0.5 &lt; 0.99',
        ),
    ],
)
def test_each_precision_shows_what_its_verification_ran(fields, badge, stage_files, tmp_path):
    result = {**json.loads(stage_files["verify"]["fp32"].read_text()), **fields}
    (tmp_path / "fp32.json").write_text(json.dumps(result))
    text = build_report(
        tmp_path / "report.html", **{**stage_files, "verify": {"fp32": tmp_path / "fp32.json"}, "bench": {}}
    )
    heading = re.search(r"<h3>fp32(.*?)</h3>", text).group(1)
    assert badge in heading
    if "unverified" in fields:
        assert "<td>not verified</td><td>the engine&#x27;s kernels did not run</td>" in text
    assert heading.count("<span") == 1  # the verdict alone: no second, generic "passed" badge beside it


def test_a_file_outside_the_working_directory_is_named_as_given(stage_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = build_report(tmp_path / "report.html", **stage_files, settings={"example_images": 0})
    assert ["onnx", str(stage_files["parity"])] in [row[:2] for row in stage_table(text)]


def test_report_without_optional_inputs(stage_files, tmp_path):
    minimal = {
        **stage_files,
        "parity": None,
        "calibration_ranges": None,
        "calibration_accuracy": None,
        "sensitivity": None,
        "float_layers": None,
        "engines": None,
        "reference_metrics": tmp_path / "absent.json",
    }
    text = build_report(tmp_path / "report.html", **minimal, settings={"example_images": 0})
    assert "Calibration ranges" not in text and "Layer sensitivity" not in text
    assert [row[0] for row in stage_table(text)] == ["verify", "verify", "bench", "bench"]
    assert "example images: nothing to plot." in text


@pytest.mark.skipif(find_browser() is None, reason="no headless Chromium installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    path, _ = report
    shot = cv2.imread(str(screenshot(path, tmp_path / "report.png", width=1000, height=1600)))
    assert shot.shape[:2] == (1600, 1000)
    ink = (shot < 200).any(axis=2)  # anything darker than near-white: text, table lines, plots
    assert ink.mean() > 0.02, "the page rendered (almost) blank"
    assert ink[:200].mean() > 0.005 and ink[-400:].mean() > 0.005, "content should fill the page top to bottom"


def test_the_engine_row_names_the_activation_dtypes_largest_first():
    census = {
        "activations": {"FLOAT": {"tensors": 3, "bytes": 1_228_800}, "HALF": {"tensors": 200, "bytes": 9_000_000}},
        "constants": {"INT8": {"tensors": 24, "bytes": 500_000}},
    }
    assert tensor_census_words({"tensor_dtypes": census}) == (
        "; activation tensors at batch 1: HALF 200 (9.0 MB), FLOAT 3 (1.2 MB)"
    )
    assert tensor_census_words(None) == tensor_census_words({"path": "x", "layers": 3}) == ""
