# Stage `calibrate`: INT8 ranges of the features network over the calibration images, written as a
# TensorRT calibration cache + ranges.json, and the explicit-quantization (Q/DQ) features ONNX.
# results/data/calib.json is the calibration set whatever `calibration.images` names: rule `data` indexes it.


rule calibrate:
    input:
        onnx=RESULTS / "onnx/features.onnx",
        images=RESULTS / "data/calib.json",
        code=library("calibrate", "qdq", "data", "preprocess"),
    output:
        table=RESULTS / "calib/int8calib.table",
        ranges=RESULTS / "calib/ranges.json",
        qdq=RESULTS / "onnx/features.qdq.onnx",
    params:
        calibration=config_section("calibration"),
        preprocess=preprocess_settings(),
    threads: 4
    conda:
        ENV
    log:
        LOGS / "calibrate/calibrate.log",
    script:
        "../scripts/calibrate.py"
