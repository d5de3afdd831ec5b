from pathlib import Path

from trtflow.run.qdq_accuracy import simulated_accuracy
from trtflow.workflow import script_logging

with script_logging(snakemake):
    report = simulated_accuracy(
        snakemake.input.features,
        dict(zip(snakemake.params.quantized, snakemake.input.qdq)),
        Path(snakemake.input.manifest).parent,
        snakemake.input.val,
        snakemake.output[0],
        preprocess=snakemake.params.preprocess,
        postprocess=snakemake.params.postprocess,
    )
    print(report)
