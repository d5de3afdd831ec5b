# Stage `model`: a validated checkpoint (shipped demo detector, a user state_dict, or a fresh demo training).


def checkpoint_source(wildcards):
    source = config["model"]["checkpoint"]
    return RESULTS / "model/trained_demo.safetensors" if source == "train" else source


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
    log:
        LOGS / "train_demo.log",
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
    log:
        LOGS / "model.log",
    script:
        "../scripts/validate_model.py"
