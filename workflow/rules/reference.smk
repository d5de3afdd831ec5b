# Stage `reference`: PyTorch detections on the preprocessed val images, and their COCO mAP.


rule reference:
    input:
        checkpoint=RESULTS / "{model}model/checkpoint.safetensors",
        val=RESULTS / "data/val.json",
        code=script_code("reference"),
    output:
        detections=RESULTS / "{model}reference/detections.json",
        metrics=RESULTS / "{model}reference/metrics.json",
    params:
        # model.train does not change the reference: only the keys the detections depend on are tracked
        model=model_params("arch", "num_classes", "input", "rpn", "box"),
        detector=detector_settings,
        preprocess=preprocess_settings,
        postprocess=config["postprocess"],
        batch_size=config["reference"]["batch_size"],
        subset=VERIFY_SUBSET,
    conda:
        ENV
    log:
        LOGS / "reference/{model}reference.log",
    script:
        "../scripts/reference.py"
