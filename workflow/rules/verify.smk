# Stage `verify`: every precision against the PyTorch reference (rule verify), timed (rule bench), and
# the pipeline's checks on one page (rule report). The engine runs where this machine can run it;
# elsewhere its recorded TensorRT network definition is evaluated layer by layer (trtflow.run.netexec), and the
# JSONs say which level ran and why nothing stronger did.
PRECISIONS = config["engine"]["precisions"]
# bench.threads, else every core of a local run (--cores), so that no other job runs while bench times; a
# cluster run gives no --cores: 1, or what its profile's set-threads says (bounded by the profile's max-threads)
BENCH_THREADS = config["bench"]["threads"] or workflow.resource_settings.cores or 1
# verify.parity_* belong to rule onnx_parity, and each precision reads only its own thresholds: editing
# either must not rerun the others
VERIFY = {
    key: value
    for key, value in config["verify"].items()
    if not key.startswith("parity_") and key not in ("thresholds", "enforce", "shard_images")
}


# With verify.shard_images: one job per precision and shard of images (reference.smk's checkpoint counts them),
# gathered by rule verify into the verdict one job would write.
rule verify_shard:
    input:
        plan=RESULTS / "{model}engine_{precision}.plan",
        network=RESULTS / "{model}engine_{precision}.network.safetensors",
        metadata=RESULTS / "{model}engine_{precision}.json",
        onnx=verify_onnx,
        weights=RESULTS / "{model}weights/head.safetensors",
        manifest=RESULTS / "{model}weights/manifest.json",
        val=RESULTS / "data/val.json",
        shards=RESULTS / "data/verify_shards.json",
        code=script_code("verify_shard"),
    output:
        RESULTS / "{model}verify/shards/{precision}_{shard}.json",
    params:
        verify={**VERIFY, "shard_images": SHARD_IMAGES},
        preprocess=preprocess_settings,
        postprocess=config["postprocess"],
    resources:
        gpu=1,
    conda:
        ENV
    log:
        LOGS / "verify/{model}{precision}_shard_{shard}.log",
    script:
        "../scripts/verify_shard.py"


rule verify:
    input:
        plan=RESULTS / "{model}engine_{precision}.plan",
        network=RESULTS / "{model}engine_{precision}.network.safetensors",
        metadata=RESULTS / "{model}engine_{precision}.json",
        onnx=verify_onnx,
        weights=RESULTS / "{model}weights/head.safetensors",
        manifest=RESULTS / "{model}weights/manifest.json",
        val=RESULTS / "data/val.json",
        reference=RESULTS / "{model}reference/detections.json",
        reference_metrics=RESULTS / "{model}reference/metrics.json",
        shards=shard_files(RESULTS / "{model}verify/shards/{precision}_{shard}.json"),
        code=script_code("verify"),
    output:
        result=report(RESULTS / "{model}verify/{precision}.json", caption="../report/verify.rst", category="verify",
                      labels=report_labels()),
        detections=RESULTS / "{model}verify/{precision}_detections.json",
    params:
        verify=VERIFY,
        thresholds=lambda wildcards: config["verify"]["thresholds"].get(wildcards.precision, {}),
        enforce=lambda wildcards: wildcards.precision in config["verify"]["enforce"],
        preprocess=preprocess_settings,
        postprocess=config["postprocess"],
    resources:
        # a gather runs no executor
        gpu=0 if SHARD_IMAGES else 1,
    conda:
        ENV
    log:
        LOGS / "verify/{model}{precision}.log",
    script:
        "../scripts/verify.py"


rule bench:
    input:
        plan=RESULTS / "{model}engine_{precision}.plan",
        metadata=RESULTS / "{model}engine_{precision}.json",
        onnx=verify_onnx,
        weights=RESULTS / "{model}weights/head.safetensors",
        manifest=RESULTS / "{model}weights/manifest.json",
        checkpoint=RESULTS / "{model}model/checkpoint.safetensors",
        val=RESULTS / "data/val.json",
        code=script_code("bench"),
    output:
        report(RESULTS / "{model}bench/{precision}.json", caption="../report/bench.rst", category="bench",
               labels=report_labels()),
    params:
        # bench.threads is the job's size, not what it measures
        bench={key: value for key, value in config_section("bench").items() if key != "threads"},
        model=model_params("arch", "num_classes", "input", "rpn", "box"),
        detector=detector_settings,
        preprocess=preprocess_settings,
    threads: BENCH_THREADS
    resources:
        gpu=1,
    conda:
        ENV
    log:
        LOGS / "bench/{model}{precision}.log",
    script:
        "../scripts/bench.py"


rule report:
    input:
        # calibration checks, shown where a calibrated (int8) engine is built
        **(
            {"calibration_ranges": RESULTS / "{model}calib/ranges.json", "calibration_accuracy": RESULTS / "{model}calib/accuracy.json"}
            if calibrated(PRECISIONS)
            else {}
        ),
        # calibration.keep_float.auto: each quantized precision's layer sensitivity and float-layer choice
        **(
            {"sensitivity": expand(RESULTS / "{model}calib/sensitivity_{quantized}.json", quantized=QUANTIZED, allow_missing=True),
             "float_layers": expand(float_layers_file("{model}", "{quantized}"), quantized=QUANTIZED, allow_missing=True)}
            if AUTO_FLOAT and QUANTIZED
            else {}
        ),
        val=RESULTS / "data/val.json",
        reference=RESULTS / "{model}reference/detections.json",
        reference_metrics=RESULTS / "{model}reference/metrics.json",
        parity=RESULTS / "{model}onnx/parity.json",
        engines=expand(RESULTS / "{model}engine_{precision}.json", precision=PRECISIONS, allow_missing=True),
        verify=expand(RESULTS / "{model}verify/{precision}.json", precision=PRECISIONS, allow_missing=True),
        detections=expand(RESULTS / "{model}verify/{precision}_detections.json", precision=PRECISIONS, allow_missing=True),
        bench=expand(RESULTS / "{model}bench/{precision}.json", precision=PRECISIONS, allow_missing=True),
        code=script_code("report"),
    output:
        html=report(RESULTS / "{model}report.html", caption="../report/report_html.rst", category="report",
                    labels=report_labels(page="report.html")),
        summary=report(RESULTS / "{model}report/summary.tsv", caption="../report/summary.rst", category="verify",
                       labels=report_labels(table="summary")),
        latency=report_figure("latency", "bench"),
        dscore=report_figure("dscore", "verify"),
        examples=report_figure("examples", "verify"),
        # calibration checks, shown where a calibrated (int8) engine is built
        **({"calibration": report_figure("calibration", "calibrate")} if calibrated(PRECISIONS) else {}),
        **({"sensitivity": report_figure("sensitivity", "calibrate")} if AUTO_FLOAT and QUANTIZED else {}),
    params:
        precisions=PRECISIONS,
        quantized=QUANTIZED,
        report=config_section("report"),
    conda:
        ENV
    log:
        LOGS / "report/{model}report.log",
    script:
        "../scripts/report.py"
