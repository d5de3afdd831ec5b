from trtflow.common.model import save_validated_checkpoint
from trtflow.workflow import script_logging

with script_logging(snakemake):
    save_validated_checkpoint(
        snakemake.params.detector, snakemake.input.checkpoint, snakemake.output.checkpoint, snakemake.output.info
    )
