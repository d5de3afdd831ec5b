"""The plan stands on its own: results/engine_<precision>.json says how to use the plan (trtflow.formats.usage)."""

import json

import yaml

from snakemake_runs import ROOT
from trtflow.formats.plan_metadata import FORMAT, VERSION, PlanMetadata
from trtflow.formats.usage import plan_usage

CONFIG = yaml.safe_load((ROOT / "config.yaml").read_text())


def test_the_plans_json_says_how_to_use_the_plan(completed_run):
    metadata = json.loads((completed_run / "results/engine_fp32.json").read_text())
    (image,) = metadata["inputs"]
    assert {key: image[key] for key in ("name", "shape", "dtype", "layout")} == {
        "name": "images",
        "shape": [1, 3, 320, 320],
        "dtype": "FLOAT",
        "layout": "NCHW",
    }
    preprocess = {key: value for key, value in metadata["preprocess"].items() if key != "steps"}
    assert preprocess == {"input": CONFIG["model"]["input"], **CONFIG["preprocess"]}
    assert any("top-left" in step and "pad_value" in step for step in metadata["preprocess"]["steps"])
    assert metadata["classes"] == [
        {"label": label, "category_id": label, "name": name}
        for label, name in enumerate(("circle", "rectangle", "triangle", "star"), 1)
    ]
    assert [(o["name"], o["shape"]) for o in metadata["outputs"]] == [
        ("num_detections", [1]),
        ("boxes", [1, 100, 4]),
        ("scores", [1, 100]),
        ("classes", [1, 100]),
    ]
    assert all(output["meaning"] for output in metadata["outputs"])
    assert metadata["postprocess"]["score_thresh"] == CONFIG["postprocess"]["score_thresh"] == 0.05
    runtime = metadata["runtime"]
    assert runtime["backend"] == metadata["backend"] and runtime["version"] == metadata["backend_version"]
    assert runtime["compute_capabilities"] == metadata["compute_capabilities"]
    runner = {"tensorrt": "trtexec", "tensorrt_rtx": "tensorrt_rtx"}[metadata["backend"]]
    assert runtime["command"] == f"{runner} --loadEngine=engine_fp32.plan --shapes=images:1x3x320x320"
    # the same JSON, as trtflow reads it: the format first, every field an attribute
    assert next(iter(metadata)) == "format" and metadata["format"] == f"{FORMAT}/{VERSION}"
    assert PlanMetadata.read(completed_run / "results/engine_fp32.json").document() == metadata


def test_a_plan_built_outside_the_pipeline_says_what_it_does_not_know():
    inputs = [
        {
            "name": "images",
            "dtype": "FLOAT",
            "shape": [-1, 3, 320, 320],
            "profile": {"min": [1, 3, 320, 320], "opt": [4, 3, 320, 320], "max": [8, 3, 320, 320]},
        }
    ]
    outputs = [{"name": "p2", "dtype": "FLOAT", "shape": [-1, 64, 80, 80]}]
    usage = plan_usage(
        inputs,
        outputs,
        backend="tensorrt",
        backend_version="10.16.0",
        compute_capabilities=["8.6"],
        plan_path="out/features.plan",
        usage=None,
    )
    assert usage["preprocess"] is usage["postprocess"] is usage["classes"] is None
    assert usage["outputs"][0]["meaning"] == "a debug output (engine.debug_outputs)"
    assert usage["runtime"]["command"] == "trtexec --loadEngine=features.plan --shapes=images:4x3x320x320"
