"""The layer-dtype reader: which data type each layer runs in, from the engine inspector where the plan can be
deserialized here, else from the network definition's tensor types.

The two sources differ on purpose and say so: the inspector reports the built engine
(after TensorRT fused Q/DQ into INT8 kernels, for example); the network definition reports
the declared types of a strongly typed network before any fusion.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

from trtflow.backend.dtypes import INSPECTOR_WORDS

# The inspector's field naming a layer output's type: TensorRT 10 "Format/Datatype", TensorRT 11 "Datatype"
# ("DataType" too: keys are matched without case); its words are dtypes.INSPECTOR_WORDS.
_DTYPE_KEYS = ("datatype", "format/datatype")
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
        if word.lower() in INSPECTOR_WORDS:
            return INSPECTOR_WORDS[word.lower()]
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
