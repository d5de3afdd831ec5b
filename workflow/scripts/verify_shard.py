from pathlib import Path

from trtflow.run.verify import run_verify_shard
from trtflow.workflow import script_logging

with script_logging(snakemake):
    run_verify_shard(
        snakemake.wildcards.precision,
        int(snakemake.wildcards.shard),
        plan=snakemake.input.plan,
        network=snakemake.input.network,
        onnx=snakemake.input.onnx,
        weights_dir=Path(snakemake.input.manifest).parent,
        val_json=snakemake.input.val,
        preprocess=snakemake.params.preprocess,
        postprocess=snakemake.params.postprocess,
        settings=snakemake.params.verify,
        out_json=snakemake.output[0],
    )
