from pathlib import Path

from trtflow.build.deploy import deploy
from trtflow.workflow import script_logging

with script_logging(snakemake):
    deploy(
        snakemake.input.plan,
        triton_model_dir=Path(snakemake.output.triton_config).parent,
        deepstream_config_path=snakemake.output.deepstream_config,
    )
