# trtflow: PyTorch Faster R-CNN -> verified TensorRT engines.
# Every artifact lives under results/; ask for any of them by path.
from snakemake.utils import min_version

from trtflow.config import check_config

min_version("9.0")


configfile: "config.yaml"


# Schema (defaults filled in, unknown keys and bad values refused) and named paths, before any job runs.
check_config(config)


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


# Every model: the one of `model:` under results/, or each `models:` entry under results/<name>/.
rule all:
    default_target: True
    input:
        expand(RESULTS / "{model}reference/metrics.json", model=MODEL_DIRS),
        expand(RESULTS / "{model}onnx/parity.json", model=MODEL_DIRS),
        # calibration only serves the int8 engine
        expand(RESULTS / "{model}calib/accuracy.json", model=MODEL_DIRS) if "int8" in config["engine"]["precisions"] else [],
        RESULTS / "plugins/build.json",
        expand(RESULTS / "{model}engine_{precision}.plan", model=MODEL_DIRS, precision=config["engine"]["precisions"]),
        expand(RESULTS / "{model}report.html", model=MODEL_DIRS),
