"""Minimal reruns: after one complete run, each kind of edit reruns exactly the jobs that depend on it.

Each test asks Snakemake's dry run (`snakemake -n`, what a user would type) which jobs an edit
would start, on the completed run of conftest's `completed_run`; tests that edit files work on a clone.
"""

import json
import time
from importlib import metadata

import onnx

from snakemake_runs import PRECISIONS, clone, config_overlay, planned, snakemake
from test_provenance import code_sha256

# the jobs that follow one engine: its verify and bench, then the report that reads every precision
DOWNSTREAM_OF_ENGINE = ("verify[{p}]", "bench[{p}]")


def per_precision(*templates: str, precisions=PRECISIONS) -> list[str]:
    return [template.format(p=precision) for precision in precisions for template in templates]


def test_a_no_op_run_does_nothing_within_two_seconds(completed_run):
    """Snakemake's own time for an up-to-date workflow: `snakemake --cores 4` timed as a user times it.

    Best of three, so that the other jobs on a shared CI machine do not decide the number.
    """
    seconds = []
    for _ in range(3):
        started = time.monotonic()
        result = snakemake(completed_run, cores=4)
        seconds.append(time.monotonic() - started)
        assert "Nothing to be done" in result.console
    assert min(seconds) <= 2.0, f"no-op runs took {[round(s, 2) for s in seconds]} s"


def test_a_verify_threshold_reruns_only_verify_and_report(completed_run):
    overlay = config_overlay(completed_run, "verify_iou.yaml", "verify:\n  match_iou: 0.8\n")
    assert planned(completed_run, *overlay) == sorted(["all", "report", *per_precision("verify[{p}]")])


def test_one_precisions_threshold_reruns_only_its_verify(completed_run):
    overlay = config_overlay(
        completed_run, "verify_int8.yaml", "verify:\n  thresholds:\n    int8: {max_map_drop_points: 2.0}\n"
    )
    assert planned(completed_run, *overlay) == ["all", "report", "verify[int8]"]


def test_the_float_around_quantized_layers_rebuilds_only_the_quantized_plans(completed_run):
    """engine.quantized_float shapes the int8 network only (fp8 is not in the demo's precisions): the fp32 and fp16
    plans do not depend on it. (Before, the engine rule's params were the whole `engine:` section.)"""
    overlay = config_overlay(completed_run, "quantized_float.yaml", "engine:\n  quantized_float: fp32\n")
    assert planned(completed_run, *overlay) == sorted(
        ["all", "engine[int8]", "report", *per_precision(*DOWNSTREAM_OF_ENGINE, precisions=["int8"])]
    )


def test_the_parity_tolerance_reruns_only_the_parity_gate(completed_run):
    overlay = config_overlay(completed_run, "parity.yaml", "verify:\n  parity_tolerance: 0.001\n")
    assert planned(completed_run, *overlay) == ["all", "onnx_parity", "report"]


def test_calibration_num_images_reruns_only_the_int8_path(completed_run):
    overlay = config_overlay(completed_run, "calibration.yaml", "calibration:\n  num_images: 32\n")
    assert planned(completed_run, *overlay) == sorted(
        [
            "all",
            "calibrate",
            "calibration_accuracy",
            "engine[int8]",
            "report",
            *per_precision(*DOWNSTREAM_OF_ENGINE, precisions=["int8"]),
        ]
    )


def test_a_cuda_edit_reruns_the_plugin_and_what_uses_it(completed_run, tmp_path):
    edited = clone(completed_run, tmp_path / "run")
    source = edited / "plugins/multilevel_roi_align.cu"
    source.write_text(source.read_text() + "\n// an edit\n")
    # roi_align: builtin (every backend) does not use the plugin: only the plugin library is rebuilt
    assert planned(edited) == ["all", "plugins"]
    # roi_align: plugin (full TensorRT) builds it into every engine: the plugin, then the engines and what follows
    overlay = config_overlay(edited, "plugin.yaml", "engine:\n  roi_align: plugin\n")
    assert planned(edited, *overlay) == sorted(
        [
            "all",
            "plugins",
            "report",
            *per_precision("engine[{p}]", *DOWNSTREAM_OF_ENGINE),
        ]
    )


def test_a_tensorrt_upgrade_rebuilds_the_engines_and_only_them(completed_run, tmp_path):
    """A plan runs only on the TensorRT that built it, so a newly installed TensorRT reruns the engine rule.

    The upgrade is a distribution's metadata on PYTHONPATH (what `pip install` leaves), no TensorRT code:
    the engine rule reads installed versions from package metadata, as the rule file does at every run.
    """
    site = tmp_path / "site"
    dist_info = site / "tensorrt_cu13-10.16.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorrt_cu13\nVersion: 10.16.0\n")
    jobs = planned(completed_run, env={"PYTHONPATH": str(site)})
    assert jobs == sorted(["all", "report", *per_precision("engine[{p}]", *DOWNSTREAM_OF_ENGINE)])


def test_artifacts_record_the_software_that_made_them(completed_run):
    """torch / onnxruntime / TensorRT versions and the sha256 of the trtflow code that ran sit in every numeric
    artifact, so an upgrade or an edit shows in a diff."""
    results = completed_run / "results"
    torch_version = metadata.version("torch")
    records = {
        name: json.loads((results / name).read_text())["software"]
        for name in (
            "model/model.json",
            "reference/metrics.json",
            "onnx/parity.json",
            "calib/ranges.json",
            "calib/accuracy.json",
            "weights/manifest.json",
            *(
                name.format(p=p)
                for p in PRECISIONS
                for name in ("engine_{p}.json", "verify/{p}.json", "bench/{p}.json")
            ),
        )
    }
    features = onnx.load(str(results / "onnx/features.onnx"), load_external_data=False)
    onnx_props = {prop.key: prop.value for prop in features.metadata_props}
    records["onnx/features.onnx"] = json.loads(onnx_props["trtflow.software"])
    assert features.producer_version.startswith(torch_version)
    for name, software in records.items():
        assert software["torch"] == torch_version, name
        assert software["onnxruntime"] == metadata.version("onnxruntime"), name
        code = software["trtflow_code"]
        assert code["sha256"] == code_sha256(completed_run / "src/trtflow", code["modules"]), name
    for precision in PRECISIONS:
        engine = json.loads((results / f"engine_{precision}.json").read_text())
        installed = {name: version for name, version in engine["software"].items() if name.startswith("tensorrt")}
        assert engine["backend_version"] in installed.values(), (engine["backend_version"], installed)
