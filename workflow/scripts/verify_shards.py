from trtflow.run.subset import write_shard_plan
from trtflow.workflow import script_logging

with script_logging(snakemake):
    print(write_shard_plan(snakemake.input.val, snakemake.params.subset, snakemake.output[0]))
