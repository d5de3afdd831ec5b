# Stage `verify`: every precision against the PyTorch reference (rule verify), timed (rule bench), and
# the pipeline's checks on one page (rule report). The engine runs where this machine can run it;
# elsewhere the deployment-form reference (ONNX Runtime + the static head) does, and the JSONs say why.

PRECISIONS = config["engine"]["precisions"]
# verify.parity_* belong to rule onnx_parity, and each precision reads only its own thresholds: editing
# either must not rerun the others
VERIFY = {
    key: value
    for key, value in config["verify"].items()
    if not key.startswith("parity_") and key not in ("thresholds", "enforce")
}
# The features graph each precision's engine is built from (int8: the Q/DQ graph, whatever engine.int8_mode)
VERIFY_ONNX = {
    precision: RESULTS / ("onnx/features.qdq.onnx" if precision == "int8" else "onnx/features.onnx")
    for precision in ("fp32", "fp16", "int8")
}


rule verify:
    input:
        plan=RESULTS / "engine_{precision}.plan",
        metadata=RESULTS / "engine_{precision}.json",
        onnx=lambda wildcards: VERIFY_ONNX[wildcards.precision],
        weights=RESULTS / "weights/head.safetensors",
        manifest=RESULTS / "weights/manifest.json",
        val=RESULTS / "data/val.json",
        reference=RESULTS / "reference/detections.json",
        code=library(
            "verify", "executors", "runtime", "head", "weights", "export", "reference", "preprocess",
            "postprocess", "metrics", "data",
        ),
    output:
        result=report(RESULTS / "verify/{precision}.json", category="verify", labels={"precision": "{precision}"}),
        detections=RESULTS / "verify/{precision}_detections.json",
    wildcard_constraints:
        precision="fp32|fp16|int8",
    params:
        verify=VERIFY,
        thresholds=lambda wildcards: config["verify"]["thresholds"].get(wildcards.precision, {}),
        enforce=lambda wildcards: wildcards.precision in config["verify"]["enforce"],
        preprocess=preprocess_settings(),
        postprocess=config["postprocess"],
    resources:
        gpu=1,
    conda:
        ENV
    log:
        LOGS / "verify/{precision}.log",
    script:
        "../scripts/verify.py"


rule bench:
    input:
        plan=RESULTS / "engine_{precision}.plan",
        metadata=RESULTS / "engine_{precision}.json",
        onnx=lambda wildcards: VERIFY_ONNX[wildcards.precision],
        weights=RESULTS / "weights/head.safetensors",
        manifest=RESULTS / "weights/manifest.json",
        checkpoint=RESULTS / "model/checkpoint.safetensors",
        val=RESULTS / "data/val.json",
        code=library("bench", "executors", "runtime", "verify", "head", "weights", "export", "model", "preprocess"),
    output:
        report(RESULTS / "bench/{precision}.json", category="bench", labels={"precision": "{precision}"}),
    wildcard_constraints:
        precision="fp32|fp16|int8",
    params:
        bench=config_section("bench"),
        model=config["model"],
        preprocess=preprocess_settings(),
    # more than any machine has: Snakemake scales it down to --cores, so no other job runs while it times
    # (cluster profiles: set-threads: bench=N)
    threads: 1024
    resources:
        gpu=1,
    conda:
        ENV
    log:
        LOGS / "bench/{precision}.log",
    script:
        "../scripts/bench.py"


rule report:
    input:
        # calibration checks, shown where an int8 engine is built
        **(
            {"calibration_ranges": RESULTS / "calib/ranges.json", "calibration_accuracy": RESULTS / "calib/accuracy.json"}
            if "int8" in PRECISIONS
            else {}
        ),
        val=RESULTS / "data/val.json",
        reference=RESULTS / "reference/detections.json",
        reference_metrics=RESULTS / "reference/metrics.json",
        parity=RESULTS / "onnx/parity.json",
        engines=expand(RESULTS / "engine_{precision}.json", precision=PRECISIONS),
        verify=expand(RESULTS / "verify/{precision}.json", precision=PRECISIONS),
        detections=expand(RESULTS / "verify/{precision}_detections.json", precision=PRECISIONS),
        bench=expand(RESULTS / "bench/{precision}.json", precision=PRECISIONS),
        code=library("report", "verify", "data"),
    output:
        report(RESULTS / "report.html", category="report"),
    params:
        precisions=PRECISIONS,
        report=config_section("report"),
    conda:
        ENV
    log:
        LOGS / "report/report.log",
    script:
        "../scripts/report.py"
