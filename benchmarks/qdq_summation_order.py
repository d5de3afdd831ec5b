"""How far INT8 outputs move when only the summation order changes: the demo's Q/DQ features graph under
ONNX Runtime as written (optimisations off) against three other evaluations of the same graph:

- `netexec`: the recorded int8 TensorRT network (results/engine_int8.network.safetensors), layer by layer;
- `netexec, quantize layers fed ONNX Runtime's inputs`: the same, each activation quantize layer starting from
  ONNX Runtime's value of its input (what is left is one layer's float32 summation, no flip carried along);
- `onnxruntime, convolutions in two halves`: ONNX Runtime on the graph with every convolution summed as two
  halves of its input channels (tests/summation_order.py), the same function in another order;
- `onnxruntime, optimised`: ONNX Runtime with all its graph optimisations (its own fused, blocked kernels).

    PYTHONPATH=src:tests python3 benchmarks/qdq_summation_order.py

Needs `make demo`'s results. Prints, per evaluation, the largest difference from ONNX Runtime as written (overall and
per feature map) and the share of elements more than two steps off, in steps of each feature map's own quantizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import yaml

from summation_order import convolutions_summed_in_two_halves  # tests/summation_order.py
from trtflow.common.onnxrun import OnnxSession
from trtflow.common.preprocess import preprocess_split
from trtflow.formats.network_record import NetworkRecord
from trtflow.run.netexec import NetworkExecutor


def quantizer_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Per-tensor scale of each tensor a QuantizeLinear reads (the feature maps' own steps)."""
    constants = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    return {
        node.input[0]: float(constants[node.input[1]])
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and node.input[1] in constants and constants[node.input[1]].size == 1
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()

    config = yaml.safe_load(args.config.read_text())
    qdq_path, record_path = args.results / "onnx/features.qdq.onnx", args.results / "engine_int8.network.safetensors"
    for needed in (qdq_path, record_path):
        if not needed.is_file():
            raise SystemExit(f"{needed} does not exist: run `make demo` first (or pass --results)")
    model = onnx.load(str(qdq_path))
    graph_outputs = {output.name for output in model.graph.output}
    steps = {name: scale for name, scale in quantizer_scales(model).items() if name in graph_outputs}
    record = NetworkRecord.load(record_path)
    network = NetworkExecutor(record)
    graph_tensors = {name for node in model.graph.node for name in node.output}
    # every quantize layer's input but the compared outputs themselves
    feeds = sorted({layer["inputs"][0] for layer in record.layers if layer["type"] == "QUANTIZE"} & graph_tensors)
    feeds = [name for name in feeds if name not in steps]
    as_written = OnnxSession(qdq_path, extra_outputs=feeds)
    halves = OnnxSession(convolutions_summed_in_two_halves(model))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    optimised = ort.InferenceSession(str(qdq_path), options, providers=["CPUExecutionProvider"])

    def netexec(batch: np.ndarray, forced: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        forced = {name: torch.from_numpy(value) for name, value in forced.items()}
        # the features part's outputs, read inside the whole network
        outputs = network({"images": torch.from_numpy(batch)}, forced=forced, names=list(steps))
        return {name: value.numpy() for name, value in outputs.items()}

    evaluations = {
        "netexec": lambda batch, _: netexec(batch, {}),
        "netexec, quantize layers fed ONNX Runtime's inputs": lambda batch, reference: netexec(
            batch, {name: reference[name] for name in feeds}
        ),
        "onnxruntime, convolutions in two halves": lambda batch, _: halves(batch),
        "onnxruntime, optimised": lambda batch, _: dict(
            zip([o.name for o in optimised.get_outputs()], optimised.run(None, {"images": batch}))
        ),
    }
    images = preprocess_split(
        args.results / "data/val.json", {"input": config["model"]["input"], **config["preprocess"]}, args.images
    )
    worst = {name: dict.fromkeys(steps, 0.0) for name in evaluations}
    beyond_two = {name: 0 for name in evaluations}
    elements = 0
    for index in range(len(images)):
        batch = images[index : index + 1]
        reference = as_written(batch)
        elements += sum(reference[name].size for name in steps)
        for evaluation, run in evaluations.items():
            outputs = run(batch, reference)
            for name, scale in steps.items():
                off = np.abs(outputs[name] - reference[name]) / scale
                worst[evaluation][name] = max(worst[evaluation][name], float(off.max()))
                beyond_two[evaluation] += int((off > 2).sum())
    for evaluation in evaluations:
        print(
            json.dumps(
                {
                    "evaluation": evaluation,
                    "images": len(images),
                    "max_steps": float(f"{max(worst[evaluation].values()):.3g}"),
                    "beyond_two_steps_percent": round(100 * beyond_two[evaluation] / elements, 4),
                    "max_steps_per_map": {name: float(f"{steps:.3g}") for name, steps in worst[evaluation].items()},
                }
            )
        )


if __name__ == "__main__":
    main()
