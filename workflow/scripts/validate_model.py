from trtflow.model import save_validated_checkpoint
from trtflow.workflow import script_logging

with script_logging(snakemake):
    model_cfg = {**snakemake.config["model"], "arch": snakemake.params.arch, "num_classes": snakemake.params.num_classes}
    save_validated_checkpoint(model_cfg, snakemake.input.checkpoint, snakemake.output.checkpoint, snakemake.output.info)
