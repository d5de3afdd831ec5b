from pathlib import Path

from trtflow.run.sensitivity import measure_sensitivity
from trtflow.workflow import script_logging

with script_logging(snakemake):
    measure_sensitivity(
        snakemake.input.features,
        snakemake.input.ranges,
        Path(snakemake.input.manifest).parent,
        snakemake.input.val,
        snakemake.output[0],
        precision=snakemake.wildcards.quantized,
        keep_float=snakemake.params.keep_float,
        settings=snakemake.params.settings,
        preprocess=snakemake.params.preprocess,
        postprocess=snakemake.params.postprocess,
    )
