from pathlib import Path

from trtflow.run.verify import Thresholds, run_verify
from trtflow.workflow import script_logging

with script_logging(snakemake):
    run_verify(
        snakemake.wildcards.precision,
        plan=snakemake.input.plan,
        network=snakemake.input.network,
        onnx=snakemake.input.onnx,
        weights_dir=Path(snakemake.input.manifest).parent,
        val_json=snakemake.input.val,
        reference_detections=snakemake.input.reference,
        reference_metrics=snakemake.input.reference_metrics,
        preprocess=snakemake.params.preprocess,
        postprocess=snakemake.params.postprocess,
        thresholds=Thresholds.from_config(snakemake.params.thresholds),
        enforce=snakemake.params.enforce,
        settings=snakemake.params.verify,
        out_json=snakemake.output.result,
        detections_out=snakemake.output.detections,
        shards=list(snakemake.input.shards),
    )
