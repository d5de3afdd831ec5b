# Stage `onnx`: the features network as ONNX, gated by ONNX Runtime vs PyTorch parity.


rule onnx:
    input:
        checkpoint=RESULTS / "model/checkpoint.safetensors",
        info=RESULTS / "model/model.json",
        code=library("export", "model"),
    output:
        RESULTS / "onnx/features.onnx",
    params:
        model={key: config["model"][key] for key in ("arch", "num_classes", "input")},
        onnx=config["onnx"],
    conda:
        ENV
    log:
        LOGS / "onnx/onnx.log",
    script:
        "../scripts/export_onnx.py"


rule onnx_parity:
    input:
        onnx=RESULTS / "onnx/features.onnx",
        checkpoint=RESULTS / "model/checkpoint.safetensors",
        val=RESULTS / "data/val.json",
        code=library("export", "model", "preprocess", "data"),
    output:
        RESULTS / "onnx/parity.json",
    params:
        model={key: config["model"][key] for key in ("arch", "num_classes", "input")},
        preprocess=preprocess_settings(),
        images=config["verify"]["parity_images"],
        tolerance=config["verify"]["parity_tolerance"],
    conda:
        ENV
    log:
        LOGS / "onnx_parity/onnx_parity.log",
    script:
        "../scripts/onnx_parity.py"
