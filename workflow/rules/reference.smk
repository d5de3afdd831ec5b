# Stage `reference`: PyTorch detections on the preprocessed val images verification runs on (all, or the seeded
# verify.num_images subset), and their COCO mAP. With verify.shard_images, one reference_shard job per shard of
# images (as many as the checkpoint verify_shards counts) and rule reference gathers them.


checkpoint verify_shards:
    input:
        val=RESULTS / "data/val.json",
        code=script_code("verify_shards"),
    output:
        RESULTS / "data/verify_shards.json",
    params:
        subset={**VERIFY_SUBSET, "shard_images": SHARD_IMAGES},
    conda:
        ENV
    log:
        LOGS / "verify_shards/verify_shards.log",
    script:
        "../scripts/verify_shards.py"


rule reference_shard:
    input:
        checkpoint=RESULTS / "{model}model/checkpoint.safetensors",
        val=RESULTS / "data/val.json",
        shards=RESULTS / "data/verify_shards.json",
        code=script_code("reference_shard"),
    output:
        RESULTS / "{model}reference/shards/{shard}.json",
    params:
        model=model_params("arch", "num_classes", "input", "rpn", "box"),
        detector=detector_settings,
        preprocess=preprocess_settings,
        postprocess=config["postprocess"],
        batch_size=config["reference"]["batch_size"],
        subset={**VERIFY_SUBSET, "shard_images": SHARD_IMAGES},
    conda:
        ENV
    log:
        LOGS / "reference/{model}shard_{shard}.log",
    script:
        "../scripts/reference_shard.py"


rule reference:
    input:
        checkpoint=RESULTS / "{model}model/checkpoint.safetensors",
        val=RESULTS / "data/val.json",
        shards=shard_files(RESULTS / "{model}reference/shards/{shard}.json"),
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
