# Stage `calibrate`: INT8 ranges of the features network over the calibration images, written as a
# TensorRT calibration cache + ranges.json, and the explicit-quantization (Q/DQ) features ONNX.
# results/data/calib.json is the calibration set whatever `calibration.images` names: rule `data` indexes it.
from trtflow.artifacts import installed_versions

# the quantized precisions that engine.precisions builds, whose Q/DQ graphs rule calibration_accuracy measures
QUANTIZED = [name for name in config["engine"]["precisions"] if PRECISION_TABLE[name].calibrated]
# what rule calibrate measures with: `calibration:` but the float-layer choice's keys, so that a new budget or
# sensitivity subset reruns only the choice
CALIBRATION = {**{key: value for key, value in config["calibration"].items() if key != "sensitivity"}, "keep_float": KEEP_FLOAT_PATTERNS}
# the Q/DQ graphs rule quantized_graph writes (file name -> precision): every quantized precision's but the one rule
# calibrate writes
QUANTIZED_GRAPHS = {
    row.features_graph: name
    for name, row in PRECISION_TABLE.items()
    if row.calibrated and (AUTO_FLOAT or row.features_graph != QDQ_GRAPH)
}


rule calibrate:
    input:
        onnx=RESULTS / "{model}onnx/features.onnx",
        images=RESULTS / "data/calib.json",
        code=script_code("calibrate"),
    output:
        table=RESULTS / "{model}calib/int8calib.table",
        ranges=RESULTS / "{model}calib/ranges.json",
        **({} if AUTO_FLOAT else {"qdq": RESULTS / "{model}onnx" / QDQ_GRAPH}),
    params:
        calibration=CALIBRATION,
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
# are not touched when it is asked for. With keep_float.auto, every quantized precision's, int8's too, with the
# layers rule float_layers chose left in float.
rule quantized_graph:
    input:
        onnx=RESULTS / "{model}onnx/features.onnx",
        ranges=RESULTS / "{model}calib/ranges.json",
        float_layers=lambda wildcards: float_layers_file(wildcards.model, QUANTIZED_GRAPHS[wildcards.graph]) if AUTO_FLOAT else [],
        code=script_code("quantized_graph"),
    output:
        RESULTS / "{model}onnx/{graph}",
    wildcard_constraints:
        graph="|".join(map(re.escape, QUANTIZED_GRAPHS)),
    params:
        precision=lambda wildcards: QUANTIZED_GRAPHS[wildcards.graph],
        keep_float=KEEP_FLOAT_PATTERNS,
    conda:
        ENV
    log:
        LOGS / "quantized_graph/{model}{graph}.log",
    script:
        "../scripts/quantized_graph.py"


# calibration.keep_float.auto (trtflow.run.sensitivity): what each quantized layer costs, then the fewest layers left
# in float that meet the budget. A new budget reruns rule float_layers and what follows, not rule sensitivity.
rule sensitivity:
    input:
        features=RESULTS / "{model}onnx/features.onnx",
        ranges=RESULTS / "{model}calib/ranges.json",
        weights=RESULTS / "{model}weights/head.safetensors",
        manifest=RESULTS / "{model}weights/manifest.json",
        val=RESULTS / "data/val.json",
        code=script_code("sensitivity"),
    output:
        RESULTS / "{model}calib/sensitivity_{quantized}.json",
    params:
        keep_float=KEEP_FLOAT_PATTERNS,
        settings=config_section("calibration", "sensitivity"),
        preprocess=preprocess_settings,
        postprocess=config["postprocess"],
    conda:
        ENV
    log:
        LOGS / "sensitivity/{model}{quantized}.log",
    script:
        "../scripts/sensitivity.py"


rule float_layers:
    input:
        features=RESULTS / "{model}onnx/features.onnx",
        ranges=RESULTS / "{model}calib/ranges.json",
        sensitivity=RESULTS / "{model}calib/sensitivity_{quantized}.json",
        weights=RESULTS / "{model}weights/head.safetensors",
        manifest=RESULTS / "{model}weights/manifest.json",
        val=RESULTS / "data/val.json",
        code=script_code("float_layers"),
    output:
        float_layers_file("{model}", "{quantized}"),
    params:
        keep_float=KEEP_FLOAT_PATTERNS,
        budget=lambda wildcards: float_layer_budget(wildcards.quantized),
        verify_subset=VERIFY_SUBSET,
        preprocess=preprocess_settings,
        postprocess=config["postprocess"],
    conda:
        ENV
    log:
        LOGS / "float_layers/{model}{quantized}.log",
    script:
        "../scripts/float_layers.py"


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
