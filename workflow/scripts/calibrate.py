from trtflow.build.calibrate import calibrate_features
from trtflow.workflow import script_logging

with script_logging(snakemake):
    calibrate_features(
        snakemake.input.onnx,
        snakemake.input.images,
        table_path=snakemake.output.table,
        ranges_path=snakemake.output.ranges,
        qdq_path=snakemake.output.get("qdq"),
        calibration=snakemake.params.calibration,
        preprocess=snakemake.params.preprocess,
        threads=snakemake.threads,
    )
