from pathlib import Path

from trtflow.build.engine import EngineSettings, EngineSources, build_engine
from trtflow.workflow import script_logging

with script_logging(snakemake):
    build_engine(
        EngineSources(
            onnx=snakemake.input.onnx,
            head_weights=Path(snakemake.input.manifest).parent,
            calibration_table=snakemake.input.get("table"),
            plugin_library=snakemake.input.get("plugin"),
            float_layers=snakemake.input.get("float_layers"),
        ),
        EngineSettings.from_config(snakemake.params.engine, snakemake.wildcards.precision),
        snakemake.output.plan,
        network_record_path=snakemake.output.network,
        backend=snakemake.params.backend,
        timing_cache=Path(snakemake.params.timing_cache),
        usage=snakemake.params.usage,
    )
