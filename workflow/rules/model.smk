# Stage `model`: a validated checkpoint (shipped demo detector, a user state_dict, or a fresh demo training).



rule train_demo:
    input:
        train=RESULTS / "data/train.json",
        code=library("train", "model", "preprocess"),
    output:
        RESULTS / "model/trained_demo.safetensors",
    params:
        model=config["model"],
        preprocess=config["preprocess"],
    resources:
        gpu=1,
    conda:
        ENV
    log:
        LOGS / "train_demo/train_demo.log",
    script:
        "../scripts/train_demo.py"


rule model:
    input:
        checkpoint=checkpoint_source,
        code=library("model"),
    output:
        checkpoint=RESULTS / "model/checkpoint.safetensors",
        info=RESULTS / "model/model.json",
    params:
        arch=config["model"]["arch"],
        num_classes=config["model"]["num_classes"],
    conda:
        ENV
    log:
        LOGS / "model/model.log",
    script:
        "../scripts/validate_model.py"
