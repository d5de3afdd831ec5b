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


rule all:
    default_target: True
    input:
        RESULTS / "reference/metrics.json",
        RESULTS / "onnx/parity.json",
        RESULTS / "calib/accuracy.json",
        RESULTS / "plugins/build.json",
        expand(RESULTS / "engine_{precision}.plan", precision=config["engine"]["precisions"]),
        RESULTS / "report.html",
