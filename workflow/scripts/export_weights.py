import json
from pathlib import Path

from trtflow.build.weights import export_head
from trtflow.common.model import load_detector
from trtflow.workflow import script_logging

with script_logging(snakemake):
    model_cfg, weights_cfg = snakemake.params.model, snakemake.params.weights
    info = json.loads(Path(snakemake.input.info).read_text())
    model = load_detector(model_cfg, snakemake.input.checkpoint)
    manifest = export_head(
        model,
        (model_cfg["input"]["height"], model_cfg["input"]["width"]),
        Path(snakemake.output.manifest).parent,
        checkpoint_sha256=info["sha256"],
        formats=weights_cfg["format"],
        box_candidates=weights_cfg["box_candidates"],
    )
    print(json.dumps({k: manifest[k] for k in ("files", "roundtrip", "tensors")}, indent=1))
