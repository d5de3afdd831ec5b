# Shared paths and helpers for every rule file.
# All artifact paths go through RESULTS so that a later multi-model layout
# (results/{model}/...) only changes this file.
import importlib.util
from pathlib import Path

RESULTS = Path("results")
LOGS = Path("logs")
SRC = Path("src/trtflow")
# The software of every rule (relative to the rule files); documents what `make demo` installs.
ENV = "../envs/trtflow.yaml"


def config_section(*keys):
    """A config sub-tree as a plain dict, for `params:` (reruns follow its changes)."""
    node = config
    for key in keys:
        node = node[key]
    return node


def library(*modules):
    """The trtflow modules a rule runs, as inputs, so that editing their code reruns it."""
    return [SRC / f"{module}.py" for module in modules]


def preprocess_settings():
    """The one preprocessing every stage uses: model input size + `preprocess:`."""
    return {"input": config["model"]["input"], **config["preprocess"]}


def checkpoint_source(wildcards):
    """The checkpoint to validate (the configured file, or a fresh demo training)."""
    source = config["model"]["checkpoint"]
    return RESULTS / "model/trained_demo.safetensors" if source == "train" else source


# Stage `engine`
ENGINE = config["engine"]
EXPLICIT_INT8 = ENGINE["int8_mode"] == "explicit"


def engine_onnx(wildcards):
    """int8 explicit: the calibrate stage's Q/DQ ONNX; everything else: the exported features."""
    qdq = wildcards.precision == "int8" and EXPLICIT_INT8
    return RESULTS / ("onnx/features.qdq.onnx" if qdq else "onnx/features.onnx")


def engine_extras(wildcards):
    extras = {}
    if wildcards.precision == "int8":
        # implicit: the table feeds TensorRT's calibrator; explicit: recorded as the Q/DQ scales' source
        extras["table"] = RESULTS / "calib/int8calib.table"
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
