from pathlib import Path

from trtflow.common.plugins import BuildConfig, build_plugins
from trtflow.workflow import script_logging

with script_logging(snakemake):
    record = build_plugins(
        source_dir=Path(snakemake.input.sources[0]).parent,
        out_dir=Path(snakemake.output.library).parent,
        config=BuildConfig.from_config(snakemake.params.plugins),
    )
    print(
        f"built {', '.join(record['outputs'])} with nvcc {record['nvcc']['version']} "
        f"for {', '.join(record['archs'])} + {record['ptx_arch']} in {record['seconds']} s"
    )
