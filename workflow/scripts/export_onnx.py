import json

from trtflow.artifacts import software_versions
from trtflow.build.export import export_features
from trtflow.common.model import load_detector
from trtflow.workflow import script_logging

with script_logging(snakemake):
    model_cfg, onnx_cfg = snakemake.params.model, snakemake.params.onnx
    info = json.load(open(snakemake.input.info))
    model = load_detector(snakemake.params.detector, snakemake.input.checkpoint)
    export_features(
        model,
        (model_cfg["input"]["height"], model_cfg["input"]["width"]),
        snakemake.output[0],
        opset=onnx_cfg["opset"],
        dynamic_batch=onnx_cfg["dynamic_batch"],
        batch_size=onnx_cfg["batch_size"],
        simplify=onnx_cfg["simplify"],
        metadata={
            "trtflow.checkpoint_sha256": info["sha256"],
            "trtflow.arch": info["arch"],
            "trtflow.software": json.dumps(software_versions()),
        },
    )
