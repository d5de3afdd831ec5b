# Shared paths and helpers for the files in workflow/rules/. The Snakefile that includes it sets WORKFLOW_DIR: the
# folder of the workflow's own files (src/, plugins/, models/). This file holds functions only: `snakemake --lint`
# (part of `make test`) takes a line with "rule", a space and a later colon for a rule, and refuses the mix.
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

from trtflow.config import locate, model_settings
from trtflow.common.plugins import PluginBuildError, find_nvcc
from trtflow.precisions import PRECISIONS as PRECISION_TABLE, QDQ_GRAPH, calibrated, features_graph, wildcard_pattern
from trtflow.run.summary import verdict_words
from trtflow.workflow import code_closure

# What the workflow writes, relative to the working directory (--directory); what it reads of its own, from
# WORKFLOW_DIR (the Snakefile's folder).
RESULTS = Path("results")
LOGS = Path("logs")
SRC = WORKFLOW_DIR / "src/trtflow"
PLUGIN_SOURCES = WORKFLOW_DIR / "plugins"
# The software of every rule (relative to the rule files); documents what `make demo` installs.
ENV = "../envs/trtflow.yaml"


def config_section(*keys):
    """A config sub-tree as a plain dict, for `params:` (reruns follow its changes)."""
    node = config
    for key in keys:
        node = node[key]
    return node


def script_code(script):
    """The trtflow modules a rule's script runs, found from its imports and theirs (trtflow.workflow.code_closure):
    inputs of the rule, so that editing any of them reruns it, and editing any other does not."""
    return list(code_closure(WORKFLOW_DIR / "workflow/scripts" / f"{script}.py", SRC))


# The val images the reference and every precision's verify run on: all, or a seeded subset (trtflow.run.subset)
VERIFY_SUBSET = {key: config["verify"][key] for key in ("num_images", "seed")}
# verify.shard_images: the reference and each verify in jobs of that many images (rules reference_shard,
# verify_shard), gathered by rules reference and verify; None: each is one job, which runs its images itself.
SHARD_IMAGES = config["verify"]["shard_images"]
# The checkpoint's file. Where it is still to be made, Snakemake (9.x) defers every rerun check of a job whose input
# function waits on it, and runs the checkpoint only for a job that must run anyway or a target: turning sharding
# on over a finished run would rerun nothing. So rule all asks for it by name, and so must a run that asks for
# verify or reference files alone (README, "Large val sets").
SHARD_PLAN = [RESULTS / "data/verify_shards.json"] if SHARD_IMAGES else []


def shard_files(pattern):
    """Input function: `pattern` for every shard the checkpoint verify_shards counts (none when unsharded)."""

    def files(wildcards):
        if SHARD_IMAGES is None:
            return []
        plan = json.loads(Path(checkpoints.verify_shards.get().output[0]).read_text())
        return expand(pattern, shard=range(plan["shards"]), **wildcards)

    return files


# Several models (config `models:`): every per-model artifact path starts with the {model} wildcard, which is
# "" for the single-model default (results/engine_int8.plan) and "<name>/" for a `models:` entry
# (results/<name>/engine_int8.plan). The data set and the plugins are shared; see model_config for the rest.
MODELS = config.get("models") or {}
# "<name>/" of every model that `all` and `engines` build: the `models:` entries, else the one of `model:`
MODEL_DIRS = [f"{name}/" for name in MODELS] or [""]


wildcard_constraints:
    # only configured names: results/<unknown>/... has no rule rather than a half-configured job
    model="(?:{})?".format("|".join(re.escape(f"{name}/") for name in MODELS)),
    # every rule's {precision}: the names of trtflow.precisions' table; {quantized}: those that are calibrated
    precision=wildcard_pattern(),
    quantized=wildcard_pattern(calibrated_only=True),
    shard=r"\d+",


def model_config(wildcards):
    """The model a job builds: `model:`, merged with the overrides of the `models:` entry its {model} names.

    Rules take the keys they need through params functions of it, so editing one entry reruns only the jobs
    of that model (and editing `model:` those of every model inheriting the edited keys).
    """
    return model_settings(config, wildcards.model.rstrip("/"))


def model_params(*keys):
    """params function: the given keys of the job's model config (the keys its output depends on)."""
    return lambda wildcards: {key: model_config(wildcards)[key] for key in keys}


def model_value(key):
    """params function: one key of the job's model config."""
    return lambda wildcards: model_config(wildcards)[key]


def detector_settings(wildcards, input):
    """The job's whole model config, for scripts that build the torch detector while their output depends only
    on the keys a model_params param tracks (the features network does not depend on model.rpn / model.box).
    A params function that takes `input` is one Snakemake leaves out of its params rerun trigger."""
    return model_config(wildcards)


def preprocess_settings(wildcards):
    """The one preprocessing every stage uses: the model's input size + `preprocess:`."""
    return {"input": model_config(wildcards)["input"], **config["preprocess"]}


def checkpoint_source(wildcards):
    """The checkpoint to validate (the configured file, or a fresh demo training of this model)."""
    source = model_config(wildcards)["checkpoint"]
    if source == "train":
        return RESULTS / f"{wildcards.model}model/trained_demo.safetensors"
    return locate(source, workflow_dir=WORKFLOW_DIR)  # the working directory's file, else the shipped one


def nvcc_found() -> bool:
    """Whether plugins.nvcc is on PATH (or $CUDA_HOME/bin/nvcc exists), as rule `plugins` looks for it."""
    try:
        find_nvcc(config["plugins"]["nvcc"])
    except PluginBuildError:
        return False
    return True


# Stage `engine`
ENGINE = config["engine"]
EXPLICIT_INT8 = ENGINE["int8_mode"] == "explicit"
# The default target builds the plugin where the engines need it, or where nvcc is there to build it anyway
# (the plugin's own checks); without nvcc and with roi_align: builtin, nothing asks for it.
PLUGIN_WANTED = ENGINE["roi_align"] == "plugin" or nvcc_found()


def engine_params(wildcards):
    """The `engine:` keys a plan of this precision depends on, so that editing a key reruns only the plans it changes:
    not `precisions` (which plans `engines` asks for), `quantized_float` only for a quantized precision, `int8_mode`
    only for one TensorRT's implicit calibrator can build."""
    row = PRECISION_TABLE[wildcards.precision]
    applies = {"precisions": False, "quantized_float": row.calibrated, "int8_mode": row.implicit_calibration}
    return {key: value for key, value in ENGINE.items() if applies.get(key, True)}


def engine_onnx(wildcards):
    """The precision's features graph (trtflow.precisions): the calibrate stage's Q/DQ ONNX for int8 (but the
    exported features under engine.int8_mode: implicit), the exported features for the others."""
    return RESULTS / wildcards.model / "onnx" / features_graph(wildcards.precision, implicit=not EXPLICIT_INT8)


# calibration.keep_float.auto: rule float_layers chooses each quantized precision's float layers after calibration, so
# rule quantized_graph writes int8's Q/DQ graph too (else rule calibrate does), and the engine records the choice
AUTO_FLOAT = config["calibration"]["keep_float"]["auto"]
# keep_float's patterns: what the Q/DQ plan leaves in float before calibration
KEEP_FLOAT_PATTERNS = {key: config["calibration"]["keep_float"][key] for key in ("nodes", "op_types")}


def float_layers_file(model, precision):
    """Rule float_layers' choice for a model ("" or "<name>/", as the {model} wildcard) and a quantized precision."""
    return RESULTS / f"{model}calib/float_layers_{precision}.json"


def float_layer_budget(precision):
    """The budget (mAP points, and its config key) that float_layers meets: calibration.keep_float.max_map_drop_points,
    else verify's threshold for the precision."""
    own = config["calibration"]["keep_float"]["max_map_drop_points"]
    if own is not None:
        return {"points": own, "key": "calibration.keep_float.max_map_drop_points"}
    return {"points": config["verify"]["thresholds"][precision]["max_map_drop_points"],
            "key": f"verify.thresholds.{precision}.max_map_drop_points"}


def engine_extras(wildcards):
    extras = {}
    if PRECISION_TABLE[wildcards.precision].calibrated:
        # implicit: the table feeds TensorRT's calibrator; explicit: recorded as the Q/DQ scales' source
        extras["table"] = RESULTS / wildcards.model / "calib/int8calib.table"
        if AUTO_FLOAT:
            extras["float_layers"] = float_layers_file(wildcards.model, wildcards.precision)
    if ENGINE["roi_align"] == "plugin":
        extras["plugin"] = RESULTS / "plugins/libtrtflow_plugins.so"
        extras["plugin_ptx"] = RESULTS / "plugins/multilevel_roi_align.ptx"
    return extras


def engine_gpus():
    """Full TensorRT builds on a GPU; TensorRT-RTX does not need one."""
    full = config["backend"] == "tensorrt" or (
        config["backend"] == "auto" and importlib.util.find_spec("tensorrt") is not None
    )
    return 1 if full else 0


# Stage `verify`
def verify_onnx(wildcards):
    """The features graph each precision's engine is built from (int8: the Q/DQ graph, whatever engine.int8_mode)."""
    return RESULTS / wildcards.model / "onnx" / PRECISION_TABLE[wildcards.precision].features_graph


def report_labels(**fixed):
    """`snakemake --report` labels of an output: its model where there are several, its precision where it has
    one with its verdict ("passed at network definition", read from its verify JSON when the report is made), and
    `fixed` (e.g. figure="latency")."""

    def labels(wildcards):
        precision = {}
        if "precision" in wildcards.keys():
            result = RESULTS / f"{wildcards.model}verify/{wildcards.precision}.json"
            verdict = verdict_words(json.loads(result.read_text())) if result.is_file() else "not verified"
            precision = {"precision": wildcards.precision, "verdict": verdict}
        return ({"model": wildcards.model.rstrip("/")} if MODELS else {}) | precision | fixed or None

    return labels


def report_figure(name, category):
    """A PNG of rule report, as a `snakemake --report` item with its caption (workflow/report/<name>.rst)."""
    return report(RESULTS / f"{{model}}report/{name}.png", caption=f"../report/{name}.rst", category=category,
                  labels=report_labels(figure=name))


# `snakemake --report` stops at the first report item of the default target not built yet (after `make demo`, which
# builds only results/engine_int8.plan). Before the report pages exist, rule all asks only for the files that do
# (report_scope), so that the report covers what is built, and the console says what it lacks. Snakemake tells a
# Snakefile nothing of --report but its command line.
REPORT_PAGES = [str(RESULTS / f"{model}report.html") for model in MODEL_DIRS]
PARTIAL_REPORT = any(arg.split("=")[0] == "--report" for arg in sys.argv) and not all(map(os.path.isfile, REPORT_PAGES))
if PARTIAL_REPORT:
    print(
        f"snakemake --report: {', '.join(REPORT_PAGES)} is not built yet (`make demo` builds only "
        "results/engine_int8.plan), so the report holds the jobs that ran and no verification: run `snakemake "
        "--cores 2` first for the verdicts, plots and tables",
        file=sys.stderr,
    )


def report_scope(targets):
    """The default target's files; for a --report before the report pages exist, those built (see above)."""
    return [path for path in targets if os.path.exists(path)] if PARTIAL_REPORT else targets
