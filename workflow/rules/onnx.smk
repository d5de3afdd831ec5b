# Stage `onnx`: the features network as ONNX, gated by ONNX Runtime vs PyTorch parity.


rule onnx:
    input:
        checkpoint=RESULTS / "{model}model/checkpoint.safetensors",
        info=RESULTS / "{model}model/model.json",
        code=script_code("export_onnx"),
    output:
        RESULTS / "{model}onnx/features.onnx",
    params:
        model=model_params("arch", "num_classes", "input"),
        detector=detector_settings,
        onnx=config["onnx"],
    conda:
        ENV
    log:
        LOGS / "onnx/{model}onnx.log",
    script:
        "../scripts/export_onnx.py"


rule onnx_parity:
    input:
        onnx=RESULTS / "{model}onnx/features.onnx",
        checkpoint=RESULTS / "{model}model/checkpoint.safetensors",
        val=RESULTS / "data/val.json",
        code=script_code("onnx_parity"),
    output:
        RESULTS / "{model}onnx/parity.json",
    params:
        model=model_params("arch", "num_classes", "input"),
        detector=detector_settings,
        preprocess=preprocess_settings,
        images=config["verify"]["parity_images"],
        tolerance=config["verify"]["parity_tolerance"],
    conda:
        ENV
    log:
        LOGS / "onnx_parity/{model}onnx_parity.log",
    script:
        "../scripts/onnx_parity.py"
