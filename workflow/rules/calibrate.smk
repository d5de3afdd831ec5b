# Stage `calibrate`: INT8 ranges of the features network over the calibration images, written as a
# TensorRT calibration cache + ranges.json, and the explicit-quantization (Q/DQ) features ONNX.
# results/data/calib.json is the calibration set whatever `calibration.images` names: rule `data` indexes it.
from trtflow.artifacts import installed_versions


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


rule calibration_accuracy:
    input:
        features=RESULTS / "{model}onnx/features.onnx",
        qdq=RESULTS / "{model}onnx/features.qdq.onnx",
        weights=RESULTS / "{model}weights/head.safetensors",
        manifest=RESULTS / "{model}weights/manifest.json",
        val=RESULTS / "data/val.json",
        code=script_code("calibration_accuracy"),
    output:
        RESULTS / "{model}calib/accuracy.json",
    params:
        preprocess=preprocess_settings,
        postprocess=config["postprocess"],
    conda:
        ENV
    log:
        LOGS / "calibration_accuracy/{model}calibration_accuracy.log",
    script:
        "../scripts/calibration_accuracy.py"
