# trtflow: PyTorch Faster R-CNN -> verified TensorRT engines.
# Every artifact lives under results/; ask for any of them by path.
# Runs from anywhere: `snakemake -s <clone>/Snakefile --directory <dir> --configfile <file>`, or as a `module`.
# The workflow's own files (trtflow code, schema, envs, scripts, plugin sources, the shipped demo checkpoint)
# are found beside this file; the config's paths and results/ are relative to the working directory.
import os
import signal
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")

# This file's folder, also where a `module` statement includes it from (workflow.basedir is the main Snakefile's);
# relative where the run is in it (the usual clone), so that a run's records do not depend on where it sits.
WORKFLOW_DIR = Path(str(workflow.current_basedir)).resolve()
# The trtflow beside this file is the code the rules' rerun triggers track (common.smk's script_code), so it is
# the one this process and every job import, whatever else the Python environment has installed: its src/ goes
# first on sys.path here and on PYTHONPATH for the jobs (trtflow.workflow.use_workflow_source). A trtflow imported
# before this file ran cannot be replaced: refused before any of its code runs.
IMPORTED = sys.modules.get("trtflow")
if IMPORTED is not None and Path(IMPORTED.__file__).resolve().parent != WORKFLOW_DIR / "src/trtflow":
    raise WorkflowError(
        f"this Python process imported trtflow from {Path(IMPORTED.__file__).parent} before the workflow could put "
        f"its own code first, but the workflow's rerun triggers track {WORKFLOW_DIR / 'src/trtflow'}: jobs would run "
        "other code than the code that decides their reruns. Start snakemake in a fresh process and import nothing of "
        "trtflow before the workflow (an including Snakefile: declare the module before any `from trtflow ...`)"
    )
sys.path.insert(0, str(WORKFLOW_DIR / "src"))
from trtflow import end_quietly

# Ctrl-C while Snakemake reads the rest of this file (its imports, the code triggers): exit 130 without a traceback,
# as its jobs do (trtflow's __init__); the end of this file gives Snakemake back its own handling.
signal.signal(signal.SIGINT, end_quietly)
from trtflow.workflow import exit_with_message, print_failures, use_workflow_source

use_workflow_source(WORKFLOW_DIR / "src")
from trtflow.config import ConfigError, check_config, holds_keys
from trtflow.precisions import calibrated
from trtflow.run.summary import print_verdicts

if WORKFLOW_DIR.is_relative_to(Path.cwd().resolve()):
    WORKFLOW_DIR = WORKFLOW_DIR.relative_to(Path.cwd().resolve())


# The working directory's config.yaml, where it holds keys; none, or an empty one, leaves every key at its default.
if holds_keys("config.yaml"):

    configfile: "config.yaml"


# `snakemake --report report.zip`: this description, then each rule's report() items with their captions
report: "workflow/report/workflow.rst"


# Schema (defaults filled in, unknown keys and bad values refused) and named paths, before any job runs.
with exit_with_message(ConfigError):
    check_config(
        config,
        # named by the files it came from; with none, by --config (the rest are defaults)
        " + ".join({os.path.abspath(path): str(path) for path in workflow.configfiles}.values()) or "--config",
        schema=WORKFLOW_DIR / "workflow/schemas/config.schema.yaml",
        workflow_dir=WORKFLOW_DIR,
    )


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/reference.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/onnx.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/plugins.smk"
include: "workflow/rules/engine.smk"
include: "workflow/rules/verify.smk"
include: "workflow/rules/deploy.smk"


# Each precision's verdict, level and key numbers at the end of the console, read from the verify JSONs there are
# (nothing where none is); after a failure, each failed job's one-line error. Snakemake calls neither handler where
# it has nothing to do, nor for a dry run.
onsuccess:
    print_verdicts(RESULTS)


onerror:
    print_verdicts(RESULTS)
    print_failures(log)


# Every model: the one of `model:` under results/, or each `models:` entry under results/<name>/.
rule all:
    default_target: True
    input:
        report_scope(
            [
                *expand(RESULTS / "{model}reference/metrics.json", model=MODEL_DIRS),
                # verify.shard_images: the checkpoint that counts the shards, asked for by name (see common.smk's SHARD_PLAN)
                *SHARD_PLAN,
                *expand(RESULTS / "{model}onnx/parity.json", model=MODEL_DIRS),
                # calibration only serves the calibrated (int8) engines
                *(expand(RESULTS / "{model}calib/accuracy.json", model=MODEL_DIRS) if calibrated(config["engine"]["precisions"]) else []),
                # the CUDA plugin: where the engines use it, or where nvcc is there to build it
                *([RESULTS / "plugins/build.json"] if PLUGIN_WANTED else []),
                *expand(RESULTS / "{model}engine_{precision}.plan", model=MODEL_DIRS, precision=config["engine"]["precisions"]),
                *expand(RESULTS / "{model}report.html", model=MODEL_DIRS),
                # the plots and table of `snakemake --report` come with it (asked for, so that a run from before them adds them)
                *expand(RESULTS / "{model}report/summary.tsv", model=MODEL_DIRS),
            ]
        ),


signal.signal(signal.SIGINT, signal.default_int_handler)
