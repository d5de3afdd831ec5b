from trtflow.common.model import load_detector
from trtflow.run.reference import run_reference_shard
from trtflow.workflow import script_logging

with script_logging(snakemake):
    run_reference_shard(
        load_detector(snakemake.params.detector, snakemake.input.checkpoint),
        snakemake.input.val,
        snakemake.params.preprocess,
        snakemake.params.postprocess,
        snakemake.output[0],
        subset=snakemake.params.subset,
        shard=int(snakemake.wildcards.shard),
        batch_size=snakemake.params.batch_size,
    )
