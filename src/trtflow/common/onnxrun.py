"""ONNX Runtime as an executor of our ONNX graphs (features.onnx and its Q/DQ twin): one image input, named
outputs, Q/DQ graphs run as written. Run side: the deployment form, calibration and the parity gate use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the graph holds Q/DQ nodes (explicit quantization)."""
    return any(node.op_type == "QuantizeLinear" for node in model.graph.node)


def session_options(model: onnx.ModelProto, *, threads: int | None = None):
    """ONNX Runtime options that run `model` as written; for a Q/DQ graph that means simulated quantization.

    Graph optimizations are off for Q/DQ graphs: even onnxruntime's basic level rewrites Q/DQ patterns into
    its own kernels, which moved outputs of the test graph by about 1% of their range. Without them every
    Q/DQ is the float math the scales define, which TensorRT matches up to accumulation order.
    """
    options = ort.SessionOptions()
    if is_quantized(model):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


class OnnxSession:
    """An ONNX Runtime session of a graph with one image input: a (B, 3, H, W) batch -> its outputs by name.

    A graph with a static batch size runs the batch in chunks of that size; a short last chunk is padded
    with copies of its last image, whose outputs are dropped. Q/DQ graphs run as written
    (`session_options`). `extra_outputs` exposes intermediate tensors as outputs too.
    """

    def __init__(
        self,
        model: onnx.ModelProto | str | Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        extra_outputs: Sequence[str] = (),
    ):
        if not isinstance(model, onnx.ModelProto):
            self.source = Path(model)
            if not self.source.is_file():
                raise FileNotFoundError(f"{self.source} does not exist; build it first (snakemake {self.source})")
            model = onnx.load(str(self.source))
        else:
            self.source = None
        existing = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
        if added := [name for name in extra_outputs if name not in existing]:
            augmented = onnx.ModelProto()
            augmented.CopyFrom(model)
            inferred = onnx.shape_inference.infer_shapes(model).graph.value_info  # int8 of Q/DQ graphs, say
            types = {info.name: info.type.tensor_type.elem_type for info in inferred}
            augmented.graph.output.extend(
                onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)
                for name in added
            )
            model = augmented
        self.session = ort.InferenceSession(
            model.SerializeToString(),
            session_options(model, threads=threads),
            providers=list(providers or ["CPUExecutionProvider"]),
        )
        self.input_name = self.session.get_inputs()[0].name
        self.names = [output.name for output in self.session.get_outputs()]
        static_batch = self.session.get_inputs()[0].shape[0]
        self.static_batch = static_batch if isinstance(static_batch, int) else None

    @property
    def providers(self) -> list[str]:
        """The providers the session really uses (ONNX Runtime drops ones it cannot load)."""
        return self.session.get_providers()

    def __call__(self, images: np.ndarray, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """`names` (default: every output) for `images`."""
        names = list(self.names if names is None else names)
        chunk = self.static_batch or len(images)
        runs = []
        for start in range(0, len(images), chunk):
            part = images[start : start + chunk]
            real = len(part)
            if real == chunk:
                runs.append(self.session.run(names, {self.input_name: part}))
                continue
            padded = np.concatenate([part, np.repeat(part[-1:], chunk - real, axis=0)])
            outputs = self.session.run(names, {self.input_name: padded})
            for name, output in zip(names, outputs, strict=True):
                if output.ndim == 0 or output.shape[0] != chunk:
                    raise ValueError(
                        f"{self.source or 'the ONNX graph'}: output {name} of shape {list(output.shape)} "
                        f"has no batch axis first, so a short batch cannot be padded to {chunk}: feed "
                        f"multiples of {chunk} images or export with onnx.dynamic_batch: true"
                    )
            runs.append([output[:real] for output in outputs])
        if len(runs) == 1:
            return dict(zip(names, runs[0], strict=True))
        return {name: np.concatenate([run[k] for run in runs]) for k, name in enumerate(names)}
