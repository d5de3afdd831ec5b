from trtflow.build.train import train_demo
from trtflow.workflow import script_logging

with script_logging(snakemake):
    model_cfg = snakemake.params.model
    train_demo(snakemake.input.train, snakemake.output[0], model_cfg, snakemake.params.preprocess, **model_cfg["train"])
