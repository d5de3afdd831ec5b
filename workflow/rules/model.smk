# Stage `model`: a validated checkpoint (shipped demo detector, a user state_dict, or a fresh demo training).



rule train_demo:
    input:
        train=RESULTS / "data/train.json",
        code=script_code("train_demo"),
    output:
        RESULTS / "{model}model/trained_demo.safetensors",
    params:
        model=model_config,
        preprocess=config["preprocess"],
    resources:
        gpu=1,
    conda:
        ENV
    log:
        LOGS / "train_demo/{model}train_demo.log",
    script:
        "../scripts/train_demo.py"


rule model:
    input:
        checkpoint=checkpoint_source,
        code=script_code("validate_model"),
    output:
        checkpoint=RESULTS / "{model}model/checkpoint.safetensors",
        info=RESULTS / "{model}model/model.json",
    params:
        arch=model_value("arch"),
        num_classes=model_value("num_classes"),
        detector=detector_settings,
    conda:
        ENV
    log:
        LOGS / "model/{model}model.log",
    script:
        "../scripts/validate_model.py"
