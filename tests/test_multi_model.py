"""Several models side by side (config `models:`): each under results/<name>/, the single-model paths unchanged.

Dry runs prove the plans; one real run of two models (a minute on 2 cores) goes through the cluster-generic
executor, tests/submit_local.sh submitting every job to this machine, and proves the outputs and the reruns.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from snakemake_runs import PRECISIONS, ROOT, SMALL_DATA, Job, cluster_generic, jobs_of, snakemake
from trtflow.config import ConfigError, check_config, model_settings

NAMES = ("demo_320", "demo_256x320")
TWO_MODELS = {"models": {"demo_320": {}, "demo_256x320": {"input": {"height": 256, "width": 320}}}}
# the real run (on SMALL_DATA): the int8 engine and the parity gate of each
RUN_TARGETS = tuple(f"results/{name}/{path}" for name in NAMES for path in ("onnx/parity.json", "engine_int8.plan"))
SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
STAGE_FOLDERS = set(SCHEMA["properties"]["models"]["propertyNames"]["not"]["enum"])  # results/<stage>/, never a model
RAW = yaml.safe_load((ROOT / "config.yaml").read_text())


def dry_run(workdir: Path, *targets: str, config: dict | None = None) -> list[Job]:
    """The jobs `snakemake -n TARGETS [--configfile CONFIG]` plans (config: merged over config.yaml)."""
    args = ["-n", *targets]
    if config is not None:
        extra = workdir / f"extra_{hashlib.md5(json.dumps(config, sort_keys=True).encode()).hexdigest()}.yaml"
        extra.write_text(yaml.safe_dump(config))
        args += ["--configfile", str(extra)]
    output = snakemake(workdir, *args).console
    jobs = jobs_of(output)
    assert jobs or "Nothing to be done" in output, output
    return jobs


def model_dir(path: str) -> str | None:
    """The model folder of a results/ path, None for the single-model layout and the shared stages."""
    parts = Path(path).parts
    return parts[1] if len(parts) > 2 and parts[0] == "results" and parts[1] not in STAGE_FOLDERS else None


@pytest.fixture(scope="module")
def scratch(scratch_run):
    """The workflow with nothing built, for dry runs."""
    return scratch_run("multi_dry")


@pytest.fixture(scope="module")
def two_model_run(scratch_run):
    """Two models built through the cluster-generic executor, every job submitted to this machine."""
    workdir = scratch_run("multi_run", extra=("tests/submit_local.sh",))
    (workdir / "two_models.yaml").write_text(yaml.safe_dump({**SMALL_DATA, **TWO_MODELS}))
    submitted = workdir / "submitted.txt"
    log = snakemake(
        workdir,
        *cluster_generic(submitted),
        *RUN_TARGETS,
        "--configfile",
        "two_models.yaml",
    ).console
    return workdir, log, submitted.read_text().split("\n")[:-1]


def edited(change) -> dict:
    """The real run's config (small data, two models) with `change` applied."""
    config = copy.deepcopy({**SMALL_DATA, **TWO_MODELS})
    change(config)
    return config


# --- configuration


def test_an_entry_is_the_base_model_with_its_overrides_merged_key_by_key():
    config = {
        **copy.deepcopy(RAW),
        "models": {"big": {"input": {"height": 640}, "rpn": {"nms_thresh": 0.6}}, "same": {}},
    }
    check_config(config, workdir=ROOT)
    # defaults go into `model:` only; an entry keeps just what it overrides
    assert config["models"] == {"big": {"input": {"height": 640}, "rpn": {"nms_thresh": 0.6}}, "same": {}}
    big = model_settings(config, "big")
    assert big["input"] == {"height": 640, "width": 320} and big["rpn"]["pre_nms_top_n"] == 300
    assert big["rpn"]["nms_thresh"] == 0.6 and big["checkpoint"] == config["model"]["checkpoint"]
    assert model_settings(config, "same") == model_settings(config, "") == config["model"]


@pytest.mark.parametrize(
    "models, message",
    [
        ({"onnx": {}}, r"models: 'onnx' cannot be a name here: model names are folders under results/"),
        ({"my model": {}}, r"models: 'my model' cannot be a name here"),
        ({"big": {"input": {"height": 650}}}, r"models\.big\.input\.height: 650 is not a multiple of 32"),
        (
            {"big": {"precision": "int8"}},
            r"models\.big: Additional properties are not allowed \('precision' was unexpected\)",
        ),
        ({"big": None}, r"models\.big: None is not of type 'object'"),
        ({"big": {"checkpoint": "models/missing.pth"}}, r"models\.big\.checkpoint: models/missing\.pth does not exist"),
        (
            {"big": {"arch": "fasterrcnn_resnet50_fpn", "checkpoint": "train"}},
            r"models\.big\.checkpoint: `train` only trains",
        ),
    ],
    ids=["stage-folder", "space", "input-size", "unknown-key", "empty-entry", "missing-checkpoint", "train-non-demo"],
)
def test_bad_model_entries_are_named_before_any_job(models, message):
    with pytest.raises(ConfigError, match=message):
        check_config({**copy.deepcopy(RAW), "models": models}, workdir=ROOT)


# --- plans (dry runs)


@pytest.mark.parametrize("config", [None, TWO_MODELS], ids=["single-model", "with-models"])
def test_the_single_model_paths_are_unchanged(scratch, config):
    jobs = dry_run(scratch, "results/engine_int8.plan", config=config)
    assert {job.rule for job in jobs} == {"data", "model", "onnx", "weights", "calibrate", "engine"}
    outputs = [path for job in jobs for path in job.output]
    assert "results/engine_int8.plan" in outputs and "results/onnx/features.onnx" in outputs
    assert all(model_dir(path) is None for path in outputs), outputs
    assert next(job.log for job in jobs if job.rule == "engine") == "logs/engine/int8.log"


def test_the_default_target_is_unchanged_without_models(scratch):
    outputs = {path for job in dry_run(scratch) for path in job.output}
    assert {f"results/engine_{precision}.plan" for precision in PRECISIONS} | {"results/report.html"} <= outputs
    assert all(model_dir(path) is None for path in outputs), outputs


def test_two_models_plan_every_precision_each_sharing_data_and_plugins(scratch):
    jobs = dry_run(scratch, config=TWO_MODELS)
    by_rule = {}
    for job in jobs:
        by_rule.setdefault(job.rule, []).append(job)
    assert len(by_rule["data"]) == len(by_rule["plugins"]) == 1
    plans = {path for job in by_rule["engine"] for path in job.output if path.endswith(".plan")}
    assert plans == {f"results/{name}/engine_{precision}.plan" for name in NAMES for precision in PRECISIONS}
    for rule in ("model", "onnx", "onnx_parity", "weights", "calibrate", "calibration_accuracy", "reference", "report"):
        assert sorted(model_dir(job.output[0]) for job in by_rule[rule]) == sorted(NAMES), rule
    assert {len(by_rule[rule]) for rule in ("engine", "verify", "bench")} == {6}
    # nothing of the single-model layout, and every model's log apart
    assert all(
        model_dir(path) in NAMES for job in jobs if job.rule not in ("data", "plugins", "all") for path in job.output
    )
    assert "logs/engine/demo_256x320/int8.log" in {job.log for job in by_rule["engine"]}


def test_a_model_that_trains_gets_its_own_training(scratch):
    models = {"models": {"tiny": {"checkpoint": "train", "train": {"epochs": 1}}, "demo_320": {}}}
    jobs = dry_run(scratch, *(f"results/{name}/onnx/features.onnx" for name in ("tiny", "demo_320")), config=models)
    assert [job.output for job in jobs if job.rule == "train_demo"] == [["results/tiny/model/trained_demo.safetensors"]]
    assert len([job for job in jobs if job.rule == "data_train"]) == 1


def test_an_unknown_model_has_no_rule(scratch):
    (scratch / "two_models.yaml").write_text(yaml.safe_dump(TWO_MODELS))
    output = snakemake(
        scratch, "-n", "results/nobody/engine_int8.plan", "--configfile", "two_models.yaml", check=False
    ).console
    assert "No rule to produce results/nobody/engine_int8.plan" in output


# --- a real run through the cluster-generic executor, and its reruns


def test_two_models_run_through_the_cluster_generic_executor(two_model_run):
    workdir, log, submitted = two_model_run
    rules = sorted(line.split()[1] for line in submitted)
    assert rules == sorted(["data", *["model", "onnx", "onnx_parity", "weights", "calibrate", "engine"] * 2]), submitted
    assert "Submitted job" in log and "external jobid" in log
    for name, (height, width) in zip(NAMES, ((320, 320), (256, 320))):
        parity = json.loads((workdir / f"results/{name}/onnx/parity.json").read_text())
        engine = json.loads((workdir / f"results/{name}/engine_int8.json").read_text())
        assert parity["passed"] and engine["precision"] == "int8"
        assert engine["inputs"][0]["shape"] == [1, 3, height, width]
        assert engine["sources"]["onnx"]["path"] == f"results/{name}/onnx/features.qdq.onnx"
        assert (workdir / f"logs/engine/{name}/int8.log").stat().st_size > 0
    assert not (workdir / "results/engine_int8.plan").exists() and not (workdir / "results/onnx").exists()


def test_a_second_run_has_nothing_to_do(two_model_run):
    workdir = two_model_run[0]
    assert dry_run(workdir, *RUN_TARGETS, config=edited(lambda c: None)) == []


def test_editing_one_models_input_size_reruns_only_that_model(two_model_run):
    config = edited(lambda c: c["models"]["demo_256x320"]["input"].update(height=224))
    jobs = dry_run(two_model_run[0], *RUN_TARGETS, config=config)
    assert {model_dir(path) for job in jobs for path in job.output} == {"demo_256x320"}
    assert sorted(job.rule for job in jobs) == ["calibrate", "engine", "onnx", "onnx_parity", "weights"]
    assert all("Params have changed" in job.reason for job in jobs if job.rule in ("onnx", "weights"))


def test_a_head_setting_of_one_model_rebuilds_its_head_not_its_onnx(two_model_run):
    config = edited(lambda c: c["models"]["demo_320"].update(box={"score_thresh": 0.1}))
    jobs = dry_run(two_model_run[0], *RUN_TARGETS, config=config)
    assert sorted((job.rule, model_dir(job.output[0])) for job in jobs) == [
        ("engine", "demo_320"),
        ("weights", "demo_320"),
    ]


def test_a_base_model_edit_reruns_the_models_that_inherit_it(two_model_run):
    def change(config):
        config["model"] = {"box": {"score_thresh": 0.1}}
        config["models"]["demo_320"]["box"] = {"score_thresh": 0.05}  # keeps its value: only the other inherits

    jobs = dry_run(two_model_run[0], *RUN_TARGETS, config=edited(change))
    assert sorted((job.rule, model_dir(job.output[0])) for job in jobs) == [
        ("engine", "demo_256x320"),
        ("weights", "demo_256x320"),
    ]
