"""Rule `data`: results/data/val.json and calib.json from the `data:` config."""

from trtflow.build.data import prepare_data
from trtflow.workflow import script_logging

with script_logging(snakemake):
    prepare_data(
        {**snakemake.params.data, "demo": snakemake.params.demo},
        snakemake.output.val,
        snakemake.output.calib,
        snakemake.params.calibration_images,
    )
