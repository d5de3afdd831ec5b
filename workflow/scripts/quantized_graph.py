from trtflow.build.calibrate import write_quantized_graph
from trtflow.precisions import precision
from trtflow.workflow import script_logging

with script_logging(snakemake):
    write_quantized_graph(
        snakemake.input.onnx,
        snakemake.input.ranges,
        snakemake.output[0],
        quantized=precision(snakemake.wildcards.precision).quantized,
        keep_float=snakemake.params.keep_float,
    )
