from pathlib import Path

from trtflow.common.model import load_detector
from trtflow.run.bench import run_bench
from trtflow.workflow import script_logging

with script_logging(snakemake):
    run_bench(
        snakemake.wildcards.precision,
        plan=snakemake.input.plan,
        onnx=snakemake.input.onnx,
        weights_dir=Path(snakemake.input.manifest).parent,
        model=load_detector(snakemake.params.detector, snakemake.input.checkpoint),
        val_json=snakemake.input.val,
        preprocess=snakemake.params.preprocess,
        settings=snakemake.params.bench,
        out_json=snakemake.output[0],
    )
