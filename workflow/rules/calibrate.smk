# Stage `calibrate`: INT8 ranges of the features network over the calibration images, written as a
# TensorRT calibration cache + ranges.json, and the explicit-quantization (Q/DQ) features ONNX.
# results/data/calib.json is the calibration set whatever `calibration.images` names: rule `data` indexes it.
from trtflow.artifacts import installed_versions

# the quantized precisions that engine.precisions builds, whose Q/DQ graphs rule calibration_accuracy measures
QUANTIZED = [name for name in config["engine"]["precisions"] if PRECISION_TABLE[name].calibrated]


rule calibrate:
    input:
        onnx=RESULTS / "{model}onnx/features.onnx",
        images=RESULTS / "data/calib.json",
        code=script_code("calibrate"),
    output:
        table=RESULTS / "{model}calib/int8calib.table",
        ranges=RESULTS / "{model}calib/ranges.json",
        qdq=RESULTS / "{model}onnx/features.qdq.onnx",
    params:
        calibration=config_section("calibration"),
        preprocess=preprocess_settings,
        # a ModelOpt upgrade may place or calibrate differently: it reruns the stage (only when ModelOpt places)
        modelopt=installed_versions(("nvidia_modelopt",)) if config["calibration"]["qdq_placement"] == "modelopt" else {},
    threads: 4
    conda:
        ENV
    log:
        LOGS / "calibrate/{model}calibrate.log",
    script:
        "../scripts/calibrate.py"


# The Q/DQ graph of each other quantized precision (trtflow.precisions: fp8), from the same amax: int8's artifacts
# are not touched when it is asked for.
rule quantized_graph:
    input:
        onnx=RESULTS / "{model}onnx/features.onnx",
        ranges=RESULTS / "{model}calib/ranges.json",
        code=script_code("quantized_graph"),
    output:
        RESULTS / "{model}onnx" / precision_qdq_graph("{precision}"),
    params:
        keep_float=config_section("calibration", "keep_float"),
    conda:
        ENV
    log:
        LOGS / "quantized_graph/{model}{precision}.log",
    script:
        "../scripts/quantized_graph.py"


rule calibration_accuracy:
    input:
        features=RESULTS / "{model}onnx/features.onnx",
        # the Q/DQ graph of each quantized precision engine.precisions builds
        qdq=lambda wildcards: [RESULTS / wildcards.model / "onnx" / PRECISION_TABLE[name].features_graph for name in QUANTIZED],
        weights=RESULTS / "{model}weights/head.safetensors",
        manifest=RESULTS / "{model}weights/manifest.json",
        val=RESULTS / "data/val.json",
        code=script_code("calibration_accuracy"),
    output:
        RESULTS / "{model}calib/accuracy.json",
    params:
        quantized=QUANTIZED,
        preprocess=preprocess_settings,
        postprocess=config["postprocess"],
    conda:
        ENV
    log:
        LOGS / "calibration_accuracy/{model}calibration_accuracy.log",
    script:
        "../scripts/calibration_accuracy.py"
