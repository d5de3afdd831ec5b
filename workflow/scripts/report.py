from trtflow.run.report import build_report
from trtflow.workflow import script_logging

with script_logging(snakemake):
    by_precision = lambda files: dict(zip(snakemake.params.precisions, files))  # noqa: E731
    build_report(
        snakemake.output.html,
        val_json=snakemake.input.val,
        reference_detections=snakemake.input.reference,
        reference_metrics=snakemake.input.reference_metrics,
        parity=snakemake.input.parity,
        verify=by_precision(snakemake.input.verify),
        deployed=by_precision(snakemake.input.detections),
        bench=by_precision(snakemake.input.bench),
        engines=by_precision(snakemake.input.engines),
        calibration_ranges=snakemake.input.get("calibration_ranges"),
        calibration_accuracy=snakemake.input.get("calibration_accuracy"),
        sensitivity=dict(zip(snakemake.params.quantized, snakemake.input.get("sensitivity", []))),
        float_layers=dict(zip(snakemake.params.quantized, snakemake.input.get("float_layers", []))),
        settings=snakemake.params.report,
        figures={name: path for name, path in snakemake.output.items() if name not in ("html", "summary")},
        summary_tsv=snakemake.output.summary,
    )
