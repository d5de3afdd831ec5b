from pathlib import Path

from trtflow.run.sensitivity import choose_float_layers
from trtflow.workflow import script_logging

with script_logging(snakemake):
    choose_float_layers(
        snakemake.input.features,
        snakemake.input.ranges,
        snakemake.input.sensitivity,
        Path(snakemake.input.manifest).parent,
        snakemake.input.val,
        snakemake.output[0],
        precision=snakemake.wildcards.quantized,
        keep_float=snakemake.params.keep_float,
        budget_points=snakemake.params.budget["points"],
        budget_key=snakemake.params.budget["key"],
        verify_subset=snakemake.params.verify_subset,
        preprocess=snakemake.params.preprocess,
        postprocess=snakemake.params.postprocess,
    )
