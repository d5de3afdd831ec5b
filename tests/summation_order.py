"""The same ONNX graph with only its summation order changed: the control for comparing INT8 runtimes.

Two correct runtimes of one Q/DQ graph sum each convolution in their own order; where a value lies within
float32 rounding of a quantization boundary they round it to neighbouring int8 values, and that one-step
difference grows through the later quantized layers. ONNX Runtime set against itself on this rewrite shows
how far that alone moves the outputs, which is the band any other implementation (trtflow.run.netexec,
TensorRT's INT8 kernels) can be held to.
"""

import numpy as np
import onnx
from onnx import helper, numpy_helper


def convolutions_summed_in_two_halves(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` where every ungrouped Conv with two or more input channels is two Convs, one over each
    half of the input channels, added (the bias in the first): the same function, summed in another order.
    Kernels are initializers or a DequantizeLinear of one (what trtflow's export and Q/DQ insertion write)."""
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    if opset < 13:
        raise ValueError(f"opset {opset}: Split takes its sizes as an input from opset 13; export with opset >= 13")
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}

    def input_channels(weight: str) -> int:
        """The kernel's input channels, of an initializer or of the int8 initializer a DequantizeLinear reads."""
        source = producers[weight].input[0] if weight in producers else weight
        if source not in initializers:
            raise ValueError(f"Conv kernel {weight!r} is neither an initializer nor a DequantizeLinear of one")
        return numpy_helper.to_array(initializers[source]).shape[1]

    nodes = []
    for node in graph.node:
        groups = next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)
        if node.op_type != "Conv" or groups != 1 or (channels := input_channels(node.input[1])) < 2:
            nodes.append(node)
            continue
        out = node.output[0]
        sizes = f"{out}/halves"
        graph.initializer.append(
            numpy_helper.from_array(np.array([channels // 2, channels - channels // 2], np.int64), sizes)
        )
        data, kernel = [f"{out}/data/{h}" for h in "ab"], [f"{out}/kernel/{h}" for h in "ab"]
        first = helper.make_node("Conv", [data[0], kernel[0], *node.input[2:]], [f"{out}/a"])
        second = helper.make_node("Conv", [data[1], kernel[1]], [f"{out}/b"])
        for half in (first, second):
            half.attribute.extend(node.attribute)
        nodes += [
            helper.make_node("Split", [node.input[0], sizes], data, axis=1),
            helper.make_node("Split", [node.input[1], sizes], kernel, axis=1),
            first,
            second,
            helper.make_node("Add", [f"{out}/a", f"{out}/b"], [out]),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten
