# Stage `weights`: the tensors and metadata the API-built head reads (results/weights/), each file
# read back and compared bit for bit before it is kept.

WEIGHTS = config["weights"]


rule weights:
    input:
        checkpoint=RESULTS / "{model}model/checkpoint.safetensors",
        info=RESULTS / "{model}model/model.json",
        code=script_code("export_weights"),
    output:
        tensors=RESULTS / "{model}weights/head.safetensors",
        manifest=RESULTS / "{model}weights/manifest.json",
        **({"wts": RESULTS / "{model}weights/head.wts"} if "wts" in WEIGHTS["format"] else {}),
    params:
        # the head's budgets and thresholds live in model.rpn / model.box: edits there re-export
        model=model_params("arch", "num_classes", "input", "rpn", "box"),
        weights=WEIGHTS,
    conda:
        ENV
    log:
        LOGS / "weights/{model}weights.log",
    script:
        "../scripts/export_weights.py"
