from trtflow.build.export import check_parity
from trtflow.common.model import load_detector
from trtflow.workflow import script_logging

with script_logging(snakemake):
    model = load_detector(snakemake.params.detector, snakemake.input.checkpoint)
    check_parity(
        model,
        snakemake.input.onnx,
        snakemake.input.val,
        snakemake.params.preprocess,
        snakemake.params.images,
        snakemake.params.tolerance,
        snakemake.output[0],
    )
