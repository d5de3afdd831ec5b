from trtflow.common.model import load_detector
from trtflow.run.reference import run_reference
from trtflow.workflow import script_logging

with script_logging(snakemake):
    shards = list(snakemake.input.shards)
    metrics = run_reference(
        None if shards else load_detector(snakemake.params.detector, snakemake.input.checkpoint),
        snakemake.input.val,
        snakemake.params.preprocess,
        snakemake.params.postprocess,
        snakemake.output.detections,
        snakemake.output.metrics,
        batch_size=snakemake.params.batch_size,
        subset=snakemake.params.subset,
        shards=shards,
    )
    print(metrics)
