"""Rule `data_train`: the demo training split, results/data/train.json + images."""

from trtflow.build.demo_data import make_demo_split
from trtflow.workflow import script_logging

with script_logging(snakemake):
    make_demo_split("train", snakemake.params.num_train, snakemake.params.seed, snakemake.output.train)
