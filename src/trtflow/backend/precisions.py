"""Which precision each layer runs in: from the engine inspector where the plan can be
deserialized here, else from the network definition's tensor types.

The two sources differ on purpose and say so: the inspector reports the built engine
(after TensorRT fused Q/DQ into INT8 kernels, for example); the network definition reports
the declared types of a strongly typed network before any fusion.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

# Inspector spellings: TensorRT 10 "Format/Datatype" ("Row major linear FP32", "Channel major
# FP16 format ..."); TensorRT 11 splits it into "Format" and "Datatype" ("Float", "Half", "Int8").
# Keys are matched without case ("DataType" too).
_DTYPE_KEYS = ("datatype", "format/datatype")
_DTYPE_WORDS = {
    "fp32": "FLOAT",
    "float": "FLOAT",
    "fp16": "HALF",
    "half": "HALF",
    "bf16": "BF16",
    "int8": "INT8",
    "uint8": "UINT8",
    "int32": "INT32",
    "int64": "INT64",
    "bool": "BOOL",
    "fp8": "FP8",
    "int4": "INT4",
    "fp4": "FP4",
}
_WORD = re.compile(r"[A-Za-z]+\d*")


def _summary(source: str, layers: list[tuple[str, str]], note: str) -> dict:
    by_type: dict[str, Counter] = defaultdict(Counter)
    for layer_type, dtype in layers:
        by_type[layer_type][dtype] += 1
    return {
        "source": source,
        "note": note,
        "layers": len(layers),
        "output_dtypes": dict(Counter(dtype for _, dtype in layers)),
        "by_layer_type": {layer_type: dict(counts) for layer_type, counts in sorted(by_type.items())},
    }


def dtype_from_inspector(text: str) -> str:
    """TensorRT DataType name for an inspector format/type string; UNKNOWN when none is named."""
    for word in _WORD.findall(text):
        if word.lower() in _DTYPE_WORDS:
            return _DTYPE_WORDS[word.lower()]
    return "UNKNOWN"


def from_inspector(engine_information: str) -> dict:
    """Summary of `EngineInspector.get_engine_information(LayerInformationFormat.JSON)`."""
    layers = []
    for layer in json.loads(engine_information).get("Layers", []):
        if not isinstance(layer, dict):  # LAYER_NAMES_ONLY verbosity: names, no types
            continue
        outputs = layer.get("Outputs") or [{}]
        described = next((str(value) for key, value in outputs[0].items() if key.lower() in _DTYPE_KEYS), "")
        layers.append((str(layer.get("LayerType", "Unknown")), dtype_from_inspector(described)))
    return _summary("engine_inspector", layers, "precisions of the built engine's layers (after fusion)")


def from_network(network, reason: str) -> dict:
    """Summary of a network definition: each layer's first output type, as declared."""
    layers = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.num_outputs:  # loop trip limits, assertions, ... produce no tensor
            layers.append((layer.type.name, layer.get_output(0).dtype.name))
    return _summary("network_definition", layers, f"declared types before TensorRT's fusions; {reason}")
