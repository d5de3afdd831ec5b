# Stage `reference`: PyTorch detections on the preprocessed val images, and their COCO mAP.


rule reference:
    input:
        checkpoint=RESULTS / "model/checkpoint.safetensors",
        val=RESULTS / "data/val.json",
        code=library("reference", "model", "preprocess", "postprocess", "metrics", "data"),
    output:
        detections=RESULTS / "reference/detections.json",
        metrics=RESULTS / "reference/metrics.json",
    params:
        model=config["model"],
        preprocess=preprocess_settings(),
        postprocess=config["postprocess"],
        batch_size=config["reference"]["batch_size"],
    conda:
        ENV
    log:
        LOGS / "reference/reference.log",
    script:
        "../scripts/reference.py"
