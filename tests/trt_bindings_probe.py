"""Run inside one TensorRT version's interpreter by tests/trt_bindings.py; prints one JSON line of facts.

`import tensorrt` here is the version's real Python bindings (PyPI wheel) over a library shim that
answers their C entry points with NULL: every class, enum, method signature and the whole
`tensorrt.plugin` package is TensorRT's own code, but nothing is built or run. Two stand-ins fill
what only the native library gives, and they are named as such: `StandInRegistry` (TensorRT's plugin
registry, a dict here) and the memory churn that reuses freed buffers. Each check records its value
or the exception it raised; tests/test_trt_bindings_matrix.py asserts on them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import tensorrt as trt

from trtflow.backend import load_backend
from trtflow.backend import roi_align_plugin as rap
from trtflow.backend.implicit_int8 import cache_only_calibrator
from trtflow.common.plugins import MAX_LEVELS, RoIAlignSpec
from trtflow.config import environment_problems
from trtflow.formats.calibration_table import (
    ALGORITHMS,
    TENSORRT_ALGORITHM,
    CalibrationTable,
    format_calibration_table,
    version_tag,
)
from trtflow.formats.network_record import STORED_AS_BYTES, interface_attributes

LEVELS = 4
SPEC = RoIAlignSpec(output_size=(7, 5), sampling_ratio=2, num_levels=LEVELS)
ATTRS = dict(zip(rap.ATTRIBUTES, SPEC.c_args()))
LIBRARY = Path("/nonexistent/libtrtflow_plugins.so")  # stored by the plugins, loaded only at enqueue
PTX = "".join(
    f".visible .entry {rap.kernel_name(n, d, l)}(\n"
    for n in range(1, MAX_LEVELS + 1)
    for d in ("float32", "float16")
    for l in ("nchw", "nhwc")
)
FORMATS = [
    name
    for name in ("LINEAR", "CHW2", "HWC8", "CHW4", "CHW32", "DHWC8", "HWC", "DLA_HWC4", "HWC16")
    if hasattr(trt.TensorFormat, name)
]
TYPES = ("FLOAT", "HALF", "INT8", "INT32")


class StandInRegistry:
    """Stand-in for TensorRT's native plugin registry (the shim has none): creators by name, version, namespace."""

    def __init__(self):
        self.creators = {}

    def register_creator(self, creator, namespace):
        self.creators[(creator.name, creator.plugin_version, namespace)] = creator
        return True

    def get_creator(self, name, version, namespace):
        return self.creators.get((name, version, namespace))


REGISTRY = StandInRegistry()
trt.get_plugin_registry = lambda: REGISTRY


def attempt(check):
    try:
        return {"value": check()}
    except Exception as error:  # the report carries every failure; the tests decide what it means
        return {"error": f"{type(error).__name__}: {error}"}


def churn():
    """Reuse freed memory, as TensorRT's allocations between two calls would."""
    return [np.full(1, 4, dtype=np.int32) for _ in range(20000)]


def tensor_desc(dtype, fmt, rank=4):
    desc = trt.DynamicPluginTensorDesc()
    plain = trt.PluginTensorDesc()
    plain.type, plain.format = dtype, fmt
    plain.dims = trt.Dims([1] * rank)
    desc.desc = plain
    return desc


def binding_facts():
    network, config = trt.INetworkDefinition, trt.IBuilderConfig
    return {
        "add_cumulative": hasattr(network, "add_cumulative"),
        "add_plugin_v3": hasattr(network, "add_plugin_v3"),
        # add_multilevel_roi_align calls network.add_plugin(..., aot=True) from 10.9
        "add_plugin_aot": "aot" in (getattr(network, "add_plugin", None).__doc__ or "")
        if hasattr(network, "add_plugin")
        else None,
        "add_nms": hasattr(network, "add_nms") and hasattr(trt.BoundingBoxFormat, "CORNER_PAIRS"),
        "entropy_calibrator2": hasattr(trt, "IInt8EntropyCalibrator2"),
        "builder_flag_int8": hasattr(trt.BuilderFlag, "INT8"),
        "strongly_typed_flag": hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
        # fp8: FP8 Q/DQ in a strongly typed network, the DataType the network record stores as bytes
        "fp8_data_type": all(hasattr(trt.DataType, name) for name in STORED_AS_BYTES),
        "add_quantize_output_type": "output_type" in (network.add_quantize.__doc__ or ""),
        "builder_flag_fp8": hasattr(trt.BuilderFlag, "FP8"),  # weakly typed networks only; ours are strongly typed
        # the keyword our timing-cache code passes, from the bindings' own signatures
        "set_timing_cache_ignore_mismatch": "ignore_mismatch" in (config.set_timing_cache.__doc__ or ""),
        "timing_cache_combine": hasattr(trt.ITimingCache, "combine"),
        "inspector_json": hasattr(trt, "LayerInformationFormat") and hasattr(trt.LayerInformationFormat, "JSON"),
        "progress_monitor": hasattr(trt, "IProgressMonitor"),
    }


def plugin_import():
    try:
        __import__("tensorrt.plugin")
        direct = "ok"
    except ImportError as error:
        direct = f"{type(error).__name__}: {error}"
    return {"import tensorrt.plugin": direct, "ours": rap.tensorrt_plugin(trt).__name__}


def decorator_plugin():
    """register / autotune / impl / aot_impl through the real tensorrt.plugin, then what TensorRT calls."""
    trtp = rap.tensorrt_plugin(trt)
    from tensorrt_bindings.plugin._lib import QDP_REGISTRY

    for levels in range(1, MAX_LEVELS + 1):
        rap._register_decorator_plugin(trt, LIBRARY, PTX, levels)
    name = rap.decorator_plugin_name(LEVELS)
    desc = QDP_REGISTRY[f"{rap.NAMESPACE}::{name}"]
    facts = {
        "registered": sorted(key for key in QDP_REGISTRY if key.startswith(rap.NAMESPACE)),
        "input_attrs": {k: v.__name__ for k, v in desc.input_attrs.items()},
        "aot_impl": desc.aot_impl_func is not None,
        "impl": desc.impl_func is not None,
    }

    # autotune: our combinations, expanded by TensorRT's own AutoTuneCombination
    inputs = [trtp.TensorDesc() for _ in range(LEVELS + 1)]
    combinations = desc.autotune_func(*inputs, [trtp.TensorDesc()])
    facts["autotune"] = sorted(
        {
            (tuple(t.name for t in c.types), tuple(f.name for f in c.layouts))
            for comb in combinations
            for c in comb._get_combinations()
        }
    )

    # creation the way TensorRT's op() builds fields (np.array([value]) per int attribute)
    # register() registered the creator: every tensorrt.plugin from 10.9 does unless told lazy_register
    creator = trt.get_plugin_registry().get_creator(name, "1", rap.NAMESPACE)
    facts["creator_registered"] = creator is not None
    if creator is None:
        facts["create_plugin"] = "no creator registered"
        return facts
    arrays = {key: np.array([value]) for key, value in ATTRS.items()}
    fields = trt.PluginFieldCollection([trt.PluginField(key, arrays[key], trt.PluginFieldType.INT32) for key in ATTRS])
    request = getattr(trt, "QuickPluginCreationRequest", None)
    args = (name, rap.NAMESPACE, fields, trt.TensorRTPhase.BUILD) + ((request.STRICT_AOT,) if request else ())
    created = attempt(lambda: creator.create_plugin(*args))
    facts["create_plugin"] = created.get("error", "ok")
    if "error" in created:
        return facts
    plugin = created["value"]
    facts["plugin_class"] = type(plugin).__name__
    facts["attrs"] = {k: int(v) for k, v in plugin.attrs.items()}
    ranks = [4] * LEVELS + [2]
    facts["output_types"] = [
        t.name for t in plugin.get_output_data_types([trt.DataType.HALF] * LEVELS + [trt.DataType.FLOAT], ranks)
    ]
    facts["kernels"] = aot_kernels(plugin, trtp) if hasattr(plugin, "get_launch_params") else None
    return facts


def aot_kernels(plugin, trtp):
    """aot_impl through TensorRT's get_launch_params / get_kernel, per dtype and layout. The launch
    values stay symbolic: only the native IExprBuilder evaluates them; counts and types are checked."""
    kernels = {}
    for dtype, layout in (("HALF", "LINEAR"), ("FLOAT", "LINEAR"), ("FLOAT", "HWC"), ("HALF", "HWC8")):
        dtype_, layout_ = getattr(trt.DataType, dtype), getattr(trt.TensorFormat, layout)
        in_out = [tensor_desc(dtype_, layout_) for _ in range(LEVELS)]
        in_out += [
            tensor_desc(trt.DataType.FLOAT, trt.TensorFormat.LINEAR, 2),
            tensor_desc(dtype_, trt.TensorFormat.LINEAR),
        ]
        plugin.input_descs = [trtp.TensorDesc() for _ in range(LEVELS + 1)]  # what get_output_shapes sets
        plugin.output_descs = (trtp.TensorDesc(),)
        for d, rank in zip(plugin.input_descs + list(plugin.output_descs), [4] * LEVELS + [2, 4]):
            d.shape_expr = trtp.ShapeExprs(rank, _is_dummy=True)
        plugin.set_tactic(0)
        launch = type("LaunchParams", (), {})()
        setter = type("SymExprSetter", (dict,), {})()
        plugin.get_launch_params([], in_out, LEVELS + 1, launch, setter, None)
        name, ptx = plugin.get_kernel([d.desc for d in in_out[:-1]], [in_out[-1].desc])
        kernels[f"{dtype}/{layout}"] = {
            "kernel": name if isinstance(name, str) else name.decode(),
            "ptx_is_ours": ptx == PTX.encode(),
            "scalar_args": setter.nbSymExprs,
            "launch": sorted(vars(launch)),
        }
    return kernels


def plugin_v3():
    """The class-based IPluginV3 on the real base classes: creation, field round-trip, formats."""
    plugin_class, creator_class = rap._plugin_v3_classes(trt)
    creator = creator_class(LIBRARY)
    trt.get_plugin_registry().register_creator(creator, rap.NAMESPACE)
    facts = {"creator_fields": [f.name for f in creator.field_names]}
    fields = rap._PluginFields(trt, ATTRS)
    plugin = creator.create_plugin(rap.PLUGIN_NAME, fields.collection, trt.TensorRTPhase.BUILD)
    facts["attrs"] = plugin.attrs
    serialized = plugin.get_fields_to_serialize()
    churn()
    restored = creator.create_plugin(rap.PLUGIN_NAME, serialized, trt.TensorRTPhase.RUNTIME)
    facts["round_trip"] = restored.attrs
    facts["clone"] = plugin.clone().attrs
    facts["output_types"] = [
        t.name for t in plugin.get_output_data_types([trt.DataType.HALF] * LEVELS + [trt.DataType.FLOAT])
    ]
    formats = {}
    for first_type, first_format in (("HALF", "HWC8"), ("FLOAT", "LINEAR")):
        in_out = [tensor_desc(getattr(trt.DataType, first_type), getattr(trt.TensorFormat, first_format))]
        in_out += [tensor_desc(trt.DataType.FLOAT, trt.TensorFormat.LINEAR) for _ in range(LEVELS + 1)]
        accepted = {}
        for pos in range(LEVELS + 2):
            accepted[pos] = []
            for type_name in TYPES:
                for format_name in FORMATS:
                    probe = tensor_desc(getattr(trt.DataType, type_name), getattr(trt.TensorFormat, format_name))
                    trial = in_out[:pos] + [probe] + in_out[pos + 1 :] if pos else [probe] + in_out[1:]
                    if plugin.supports_format_combination(pos, trial, LEVELS + 1):
                        accepted[pos].append(f"{type_name}/{format_name}")
        formats[f"{first_type}/{first_format}"] = accepted
    facts["formats"] = formats
    return facts


def calibrator():
    """Per calibration.algorithm: the table rule calibrate writes under this version, and the calibrator serving it."""
    facts = {}
    for algorithm in ALGORITHMS:
        header = (version_tag(trt.__version__), TENSORRT_ALGORITHM[algorithm])
        table = format_calibration_table(CalibrationTable(*header, {"images": 2.0 / 127}))
        instance = cache_only_calibrator(trt, table.encode(), batch_size=2)
        churn()
        facts[algorithm] = {
            "header": table.splitlines()[0],
            "cache_is_the_table": instance.read_calibration_cache().decode() == table,
            "batch_size": instance.get_batch_size(),
            "batch": instance.get_batch(["images"]),
            "algorithm": instance.get_algorithm().name,
            "is_calibrator": isinstance(instance, trt.IInt8Calibrator),
        }
    return facts


def backend_facts():
    backend = load_backend("tensorrt")
    return {
        "name": backend.name,
        "version": backend.version,
        "capabilities": dataclasses.asdict(backend.capabilities),
        "flavour": attempt(lambda: rap.plugin_flavour(backend.name, backend.version)),
        "roi_align_plugin_refused": rap.unsupported_reason(backend),
        "config_check": environment_problems({"backend": "tensorrt", "engine": {"roi_align": "plugin"}}),
        "numpy": np.__version__,
    }


def layer_attributes():
    """The attributes of ILayer and of each layer class the network record reads, by the record's own rule."""
    return interface_attributes(trt)


def main():
    report = {
        "version": trt.__version__,
        "module": trt.__file__,
        "bindings": binding_facts(),
        "backend": attempt(backend_facts),
        "plugin_import": attempt(plugin_import),
        "layer_attributes": attempt(layer_attributes),
    }
    backend = report["backend"].get("value", {})
    flavour = backend.get("flavour", {}).get("value")
    # only where trtflow uses it (10.8: 10.0 - 10.7 lack add_cumulative; 10.0.1's bindings crash
    # when Python drops a clone, which TensorRT never asks of a refused version)
    usable = backend.get("capabilities", {}).get("cumulative_layer")
    report["ipluginv3"] = attempt(plugin_v3) if flavour == "ipluginv3" and usable else None
    report["calibrator"] = attempt(calibrator) if hasattr(trt, "IInt8EntropyCalibrator2") else None
    report["decorator"] = attempt(decorator_plugin) if flavour == "aot" else None
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    sys.exit(main())
