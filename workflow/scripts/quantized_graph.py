from trtflow.build.calibrate import write_quantized_graph
from trtflow.precisions import precision
from trtflow.workflow import script_logging

with script_logging(snakemake):
    write_quantized_graph(
        snakemake.input.onnx,
        snakemake.input.ranges,
        snakemake.output[0],
        quantized=precision(snakemake.params.precision).quantized,
        keep_float=snakemake.params.keep_float,
        float_layers_path=snakemake.input.float_layers or None,
    )
