"""config.yaml checks that run before any job: one clear line per problem, naming the key and the fix."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import math
from collections.abc import Mapping
from pathlib import Path

import yaml

from trtflow.artifacts import files_sha256
from trtflow.backend import BackendUnavailableError, load_backend
from trtflow.backend.roi_align_plugin import unsupported_reason
from trtflow.common.plugins import ptx_arch_problem
from trtflow.precisions import PRECISIONS, QDQ_GRAPH, calibrated, compute_capability_problem

SCHEMA_NAME = "config.schema.yaml"


def find_schema() -> Path:
    """The config schema of this trtflow. Installed (pip install <clone>, the Docker image; pip install -e maps it
    to the clone's folder), the package holds it as trtflow.schemas, which pyproject maps to workflow/schemas/;
    run from a source checkout with src/ on PYTHONPATH, that package is absent and the checkout's folder is read
    directly. The Snakefile passes the schema beside it, as it may run a clone other than the installed trtflow."""
    if importlib.util.find_spec("trtflow.schemas") is not None:
        return Path(str(importlib.resources.files("trtflow.schemas") / SCHEMA_NAME))
    return Path(__file__).resolve().parents[2] / "workflow/schemas" / SCHEMA_NAME


SCHEMA = find_schema()


class ConfigError(ValueError):
    """config.yaml holds a value the pipeline cannot use."""


def holds_keys(config_file: str | Path) -> bool:
    """Whether `config_file` exists and holds keys. Snakemake refuses an empty file (or one of comments only) as a
    config file; here it means what no file means: every key at its schema default."""
    path = Path(config_file)
    return path.is_file() and yaml.safe_load(path.read_text()) is not None


def key_path(parts) -> str:
    return ".".join(str(part) for part in parts) or "(top level)"


def schema_problems(config: dict, schema_path: str | Path = SCHEMA) -> list[str]:
    """Every schema violation as `key: problem`, most specific first."""
    import jsonschema

    if not Path(schema_path).is_file():
        raise ConfigError(
            f"the config schema {schema_path} does not exist: this trtflow is neither an installed "
            "package with its schema nor a source checkout; reinstall it (pip install <clone>) or pass "
            "the workflow's workflow/schemas/config.schema.yaml"
        )
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (-len(e.absolute_path), e.message))
    return [f"{key_path(e.absolute_path)}: {schema_message(e)}" for e in errors]


def schema_message(error) -> str:
    """The validator's message; for a bad name in a mapping whose names the schema restricts (`models:`), the rule."""
    if "propertyNames" in error.relative_schema_path:
        return f"{error.instance!r} cannot be a name here: {error.schema['description']}"
    return error.message


def model_settings(config: dict, name: str = "") -> dict:
    """The model `name` of `models:`: `model:` with that entry's overrides (input, rpn, box and train merged key
    by key). "" is `model:` itself, the single-model default."""
    merged = dict(config["model"])
    for key, value in ((config.get("models") or {})[name] if name else {}).items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
    return merged


def locate(path: str | Path, workdir: str | Path = ".", workflow_dir: str | Path | None = None) -> Path:
    """A configured file: absolute as given; relative, in the working directory where it exists there, else in
    the workflow's own folder (beside the Snakefile: the shipped models/demo_detector.safetensors), so that the
    default checkpoint works from any working directory. Found nowhere: the working-directory path."""
    path = Path(path)
    if path.is_absolute() or (Path(workdir) / path).exists() or workflow_dir is None:
        return path
    shipped = Path(workflow_dir) / path
    return shipped if shipped.exists() else path


def path_problems(config: dict, workdir: str | Path = ".", workflow_dir: str | Path | None = None) -> list[str]:
    """Files and folders named in config that do not exist (after defaults are filled in); model checkpoints are
    also looked up in `workflow_dir` (see `locate`)."""
    workdir = Path(workdir)
    problems = []
    # `model:`, and each `models:` entry that sets its own checkpoint or arch (the others inherit the verdict)
    models = [("model", config["model"])] + [
        (f"models.{name}", model_settings(config, name))
        for name, overrides in (config.get("models") or {}).items()
        if {"checkpoint", "arch"} & set(overrides)
    ]
    for key, model in models:
        checkpoint = model["checkpoint"]
        if checkpoint != "train" and not (workdir / locate(checkpoint, workdir, workflow_dir)).is_file():
            problems.append(
                f"{key}.checkpoint: {checkpoint} does not exist in {workdir.resolve()}"
                + (f" nor in the workflow's folder {workflow_dir}" if workflow_dir else "")
                + "; point it at a state_dict file (.safetensors/.pt/.pth) or set it to `train` "
                "(demo detector only)"
            )
        if checkpoint == "train" and model["arch"] != "demo":
            problems.append(
                f"{key}.checkpoint: `train` only trains the demo detector, not {model['arch']}; give a state_dict path"
            )
    data = config["data"]
    if data["source"] == "coco":
        if not data["images"] or not (workdir / data["images"]).is_dir():
            problems.append(
                f"data.images: {data['images']} is not a folder; with data.source: coco it must hold your images"
            )
        if data["annotations"] and not (workdir / data["annotations"]).is_file():
            problems.append(
                f"data.annotations: {data['annotations']} does not exist; give a COCO instances JSON or null"
            )
    calibration_images = config["calibration"]["images"]
    if calibration_images and not _names_files(workdir, calibration_images):
        problems.append(
            f"calibration.images: {calibration_images} matches nothing; give a folder, a glob pattern "
            "(e.g. images/*.jpg) or a COCO JSON, relative to the working directory, or null"
        )
    return problems


def _names_files(workdir: Path, spec: str) -> bool:
    if any(char in spec for char in "*?["):
        return any(path.is_file() for path in workdir.glob(spec))
    return (workdir / spec).exists()


def batch_problem(batch: dict) -> str | None:
    """engine.batch's rule, asked by the config check and by trtflow.build.engine.BatchProfile."""
    if not 1 <= batch["min"] <= batch["opt"] <= batch["max"]:
        return f"engine.batch: {batch} needs 1 <= min <= opt <= max"
    return None


def consistency_problems(config: dict) -> list[str]:
    """Values each valid on their own that cannot work together; caught here rather than minutes into a build."""
    problems = []
    batch, onnx = config["engine"]["batch"], config["onnx"]
    if problem := batch_problem(batch):
        problems.append(problem)
    elif not onnx["dynamic_batch"] and set(batch.values()) != {onnx["batch_size"]}:
        size = onnx["batch_size"]
        problems.append(
            f"engine.batch: {batch} but the features ONNX has the static batch onnx.batch_size: {size}; "
            f"set engine.batch to {{min: {size}, opt: {size}, max: {size}}} or onnx.dynamic_batch: true"
        )
    calibration = config["calibration"]
    if (
        not onnx["dynamic_batch"]
        and calibrated(config["engine"]["precisions"])
        and (calibration["batch_size"] % onnx["batch_size"] or calibration["num_images"] % onnx["batch_size"])
    ):
        problems.append(
            f"calibration.batch_size: {calibration['batch_size']} and calibration.num_images: "
            f"{calibration['num_images']} must be multiples of the features ONNX's static batch "
            f"onnx.batch_size: {onnx['batch_size']}; change them or set onnx.dynamic_batch: true"
        )
    targets = config["engine"]["rtx"]["compute_capabilities"]
    for name in config["engine"]["precisions"] if targets else ():
        if problem := compute_capability_problem(name, "tensorrt_rtx", [str(cc) for cc in targets]):
            problems.append(
                f"engine.rtx.compute_capabilities: {targets} -- {problem}; add one of those GPUs' compute "
                f"capabilities to it (e.g. 8.9, 12.0), leave it [] (every target from the least on), or take {name} "
                "out of engine.precisions"
            )
    shard_images, batch_sizes = (
        config["verify"]["shard_images"],
        {
            "verify.batch_size": config["verify"]["batch_size"],
            "reference.batch_size": config["reference"]["batch_size"],
        },
    )
    if shard_images is not None and any(shard_images % size for size in batch_sizes.values()):
        problems.append(
            f"verify.shard_images: {shard_images} is not a multiple of {in_words(batch_sizes)}: a shard must batch its "
            "images as one job over all of them does, so that a sharded verdict is the unsharded one byte for byte; "
            f"use a multiple of {math.lcm(*batch_sizes.values())}"
        )
    if calibration["sensitivity"]["rank_by"] == "map" and not calibration["sensitivity"]["measure_map"]:
        problems.append(
            "calibration.sensitivity.rank_by: map orders layers by the mAP that measure_map measures, and "
            "calibration.sensitivity.measure_map is false: set measure_map: true or rank_by: sqnr"
        )
    if calibration["keep_float"]["auto"] and calibrated(config["engine"]["precisions"]):
        if calibration["qdq_placement"] == "modelopt":
            problems.append(
                "calibration.keep_float.auto chooses float layers of trtflow's Q/DQ placement, and "
                "calibration.qdq_placement is modelopt: set qdq_placement: trtflow, or list ModelOpt's float layers "
                "in calibration.keep_float.nodes instead of auto"
            )
        implicit = [name for name in config["engine"]["precisions"] if PRECISIONS[name].implicit_calibration]
        if config["engine"]["int8_mode"] == "implicit" and implicit:
            problems.append(
                "calibration.keep_float.auto leaves layers of the Q/DQ graph in float, and engine.int8_mode: implicit "
                f"builds {' and '.join(implicit)} without it: set engine.int8_mode: explicit, or keep_float.auto: false"
            )
    if calibration["qdq_placement"] == "modelopt":
        # imported here: the ModelOpt adapter loads onnx (about 0.5 s), which every Snakemake start would pay
        from trtflow.build.modelopt_qdq import missing_modelopt, modelopt_method

        try:
            modelopt_method(calibration["algorithm"])
        except ValueError as error:
            problems.append(str(error))
        if importlib.util.find_spec("modelopt") is None:
            problems.append(missing_modelopt("is not installed"))
        for name in config["engine"]["precisions"]:
            if PRECISIONS[name].calibrated and PRECISIONS[name].features_graph != QDQ_GRAPH:
                problems.append(
                    f"calibration.qdq_placement: modelopt writes the {QDQ_GRAPH} graph only, and {name} is written "
                    f"from trtflow's placement: set calibration.qdq_placement: trtflow, or take {name} out of "
                    "engine.precisions"
                )
    num_train = config["data"]["demo"]["num_train"]
    for name in ("", *(config.get("models") or {})):
        model = model_settings(config, name)
        if model["checkpoint"] == "train" and num_train < model["train"]["batch_size"]:
            key = f"models.{name}" if name else "model"
            problems.append(
                f"data.demo.num_train: {num_train} training images make no batch of {key}.train.batch_size "
                f"{model['train']['batch_size']}; raise num_train or lower the batch size"
            )
    if problem := ptx_arch_problem(config["plugins"]["archs"], config["plugins"]["ptx_arch"]):
        problems.append(problem)
    return problems


def environment_problems(config: dict) -> list[str]:
    """Options the TensorRT and NumPy installed here cannot build (`engine.roi_align: plugin`). Where this
    process has no full TensorRT under `backend: auto` (a cluster's submit host), the engine job checks."""
    if config["engine"]["roi_align"] != "plugin":
        return []
    try:
        backend = load_backend(config["backend"])
    except BackendUnavailableError:
        return []
    if config["backend"] == "auto" and backend.name != "tensorrt":
        return []
    reason = unsupported_reason(backend)
    return [f"engine.roi_align: plugin -- {reason}"] if reason else []


def with_defaults(config: dict, schema: str | Path = SCHEMA) -> list[str]:
    """The schema problems of `config`; where it has none, the schema's defaults are filled into it. The shorthand
    `calibration.keep_float: auto` becomes `{auto: true}` first."""
    calibration = config.get("calibration")
    if isinstance(calibration, dict) and calibration.get("keep_float") == "auto":
        calibration["keep_float"] = {"auto": True}
    problems = schema_problems(config, schema)
    if not problems:
        from snakemake.utils import validate

        validate(config, str(schema))  # fills in the defaults
    return problems


def check_config(
    config: dict,
    config_file: str = "config.yaml",
    workdir: str | Path = ".",
    *,
    schema: str | Path = SCHEMA,
    workflow_dir: str | Path | None = None,
) -> None:
    """Raise one ConfigError listing every problem of `config` (schema first, then missing paths)."""
    problems = with_defaults(config, schema)
    if not problems:
        problems = (
            consistency_problems(config) + path_problems(config, workdir, workflow_dir) + environment_problems(config)
        )
    if problems:
        raise ConfigError(f"{config_file}: " + ("\n  ".join(["invalid configuration:", *problems])))


def run_folder(plan: Path) -> tuple[Path, str] | None:
    """(working directory, model name) of the run that wrote `plan` (<dir>/results/engine_*.plan: name "";
    <dir>/results/<name>/engine_*.plan: a `models:` entry); None for a plan outside a results/ folder."""
    plan = Path(plan).resolve()
    for parent in plan.parents:
        if parent.name == "results":
            return parent.parent, str(plan.parent.relative_to(parent)).removeprefix(".")
    return None


def in_words(value) -> str:
    """A config value for a one-line message: {"height": 320, "width": 320} -> "height 320, width 320"."""
    if isinstance(value, Mapping):
        return ", ".join(f"{key} {in_words(item)}" for key, item in value.items())
    return json.dumps(value) if isinstance(value, list) else str(value)


def plan_config_differences(plan: str | Path, recorded: Mapping) -> list[str]:
    """What the plan's JSON (`recorded`) says it was built for and the config.yaml of its run's folder does not, one
    `key: the plan X, config.yaml Y` each: the model, its input, pre- and postprocessing and backend. Nothing where
    the plan lies outside a results/ folder, the folder has no config.yaml, or that file is invalid (the pipeline
    refuses it; detect uses what the plan records either way)."""
    found = run_folder(Path(plan))
    if found is None or not (found[0] / "config.yaml").is_file():
        return []
    workdir, name = found
    config = yaml.safe_load((workdir / "config.yaml").read_text()) or {}
    if with_defaults(config) or name not in {"", *(config.get("models") or {})}:
        return []
    model = model_settings(config, name)
    pairs = {
        # `auto` takes whichever backend imports: the plan records which one it was
        **({"backend": (recorded["backend"], config["backend"])} if config["backend"] != "auto" else {}),
        "model.num_classes": (len(recorded["classes"] or []) + 1, model["num_classes"]),
        "model.input": (recorded["preprocess"]["input"], model["input"]),
        **{f"preprocess.{key}": (recorded["preprocess"][key], value) for key, value in config["preprocess"].items()},
        **{f"postprocess.{key}": (recorded["postprocess"][key], value) for key, value in config["postprocess"].items()},
    }
    differences = [
        f"{key}: the plan {in_words(mine)}, config.yaml {in_words(theirs)}"
        for key, (mine, theirs) in pairs.items()
        if mine != theirs
    ]
    # the checkpoint by content (the shipped demo checkpoint lies beside the workflow's own schema)
    checkpoint = locate(model["checkpoint"], workdir, SCHEMA.parents[2])
    built_from, configured = recorded["sources"]["checkpoint_sha256"], checkpoint.is_file() and files_sha256(checkpoint)
    if configured and configured != built_from:
        differences.append(
            f"model.checkpoint: the plan sha256 {built_from[:12]}, config.yaml {model['checkpoint']} "
            f"(sha256 {configured[:12]})"
        )
    return differences
