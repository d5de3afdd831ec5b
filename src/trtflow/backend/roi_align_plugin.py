"""MultiLevelRoIAlign as a TensorRT plugin layer (the head's `engine.roi_align: plugin`).

Which plugin path a backend gets:
- TensorRT >= 10.9 (11.x too): a `tensorrt.plugin` decorator plugin whose ahead-of-time
  implementation hands TensorRT our PTX kernel (results/plugins/multilevel_roi_align.ptx) and
  its launch geometry. The kernel is embedded in the plan, which then runs without Python
  (trtexec, C++). One plugin id per level count: its inputs are fixed by its signature.
- TensorRT 10.8: a class-based IPluginV3 whose enqueue calls libtrtflow_plugins.so through
  ctypes; running such a plan needs this Python process and its registered creator. (IPluginV3
  exists from 10.0, but the head gives each RoI its image index with add_cumulative, from 10.8.)
- TensorRT-RTX: no Python plugin path at all; the head uses its built-in-layer RoIAlign.

`unsupported_reason` says where `roi_align: plugin` cannot build (the config check and the engine
job ask it): TensorRT-RTX, TensorRT before 10.8, and the decorator plugins of TensorRT 10.9 - 11.1
with NumPy >= 2.4 (their tensorrt.plugin converts each int attribute with int() of a 1-element
array, which NumPy 2.4 refuses; 11.2 indexes [0]).

Inputs of every path: the pooled maps (finest first, (B, C, H_l, W_l), float32 or float16, all
alike) then the RoIs ((N, 5) float32). Output: (N, C, out_h, out_w) in the maps' dtype, LINEAR.
The maps may come LINEAR (NCHW) or channels last: HWC with float32, HWC8 with float16 (channels
padded to a multiple of 8). Both paths offer TensorRT all three and TensorRT times them, with
the reformatting each needs; the channels-last kernel is the faster one (docs/BENCHMARKS.md).
CI runs this module against the real Python bindings of TensorRT 10.0 - 11.4 (tests/trt_bindings.py:
registration, creation, fields, formats, kernel choice; launch values stay symbolic), never TensorRT's
native library.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from trtflow.common.plugins import (
    DEFAULT_LIBRARY,
    MAX_LEVELS,
    ROI_ALIGN_PTX,
    PluginLibraryError,
    RoIAlignSpec,
    launch,
    load_library,
    ptx_kernels,
)

NAMESPACE = "trtflow"
PLUGIN_NAME = "MultiLevelRoIAlign"  # the IPluginV3 creator's name
PLUGIN_VERSION = "1"
# Launch geometry of plugins/multilevel_roi_align.cu (kThreads, kChannelsPerBlock).
THREADS = 256
CHANNELS_PER_BLOCK = 64
ATTRIBUTES = ("out_h", "out_w", "sampling_ratio", "aligned", "first_level", "canonical_scale", "canonical_level")
AOT_MIN_VERSION = (10, 9)
IPLUGINV3_MIN_VERSION = (10, 0)
# tensorrt.plugin before 11.2 creates plugins with int(<1-element array>), which NumPy 2.4 refuses.
PLUGIN_NUMPY_FIXED_VERSION = (11, 2)
NUMPY_REFUSING_ARRAY_INT = (2, 4)

_registered: dict[str, Path] = {}


class PluginUnavailableError(RuntimeError):
    """This backend cannot take the RoIAlign plugin; the message says what to use instead."""


def plugin_flavour(backend_name: str, version: str) -> str:
    """'aot' (decorator plugin + PTX) or 'ipluginv3' (class plugin calling the library)."""
    if backend_name == "tensorrt_rtx":
        raise PluginUnavailableError(
            f"TensorRT-RTX {version} has no Python plugin path (no tensorrt.plugin, no add_plugin_v3), so the "
            "MultiLevelRoIAlign plugin cannot be used: set engine.roi_align: builtin (the head's RoIAlign from "
            "built-in layers) or use full TensorRT"
        )
    release = _release(version)
    if release >= AOT_MIN_VERSION:
        return "aot"
    if release >= IPLUGINV3_MIN_VERSION:
        return "ipluginv3"
    raise PluginUnavailableError(
        f"TensorRT {version} predates IPluginV3 (10.0): upgrade TensorRT or set engine.roi_align: builtin"
    )


def unsupported_reason(backend, numpy_version: str = np.__version__) -> str | None:
    """Why `engine.roi_align: plugin` cannot build with `backend` (trtflow.backend.Backend) and this NumPy,
    naming both versions and the fix; None where it can."""
    try:
        flavour = plugin_flavour(backend.name, backend.version)
    except PluginUnavailableError as error:
        return str(error)
    if not backend.capabilities.cumulative_layer:
        return (
            f"TensorRT {backend.version} has no INetworkDefinition.add_cumulative (TensorRT >= 10.8), which gives "
            "each RoI its image index for the plugin: upgrade TensorRT to 10.8 or later, or set "
            "engine.roi_align: builtin"
        )
    if (
        flavour == "aot"
        and _release(backend.version) < PLUGIN_NUMPY_FIXED_VERSION
        and _release(numpy_version) >= NUMPY_REFUSING_ARRAY_INT
    ):
        return (
            f"TensorRT {backend.version}'s tensorrt.plugin cannot create plugins under NumPy {numpy_version} "
            "(it converts each int attribute with int() of a 1-element array, which NumPy 2.4 refuses; "
            'TensorRT 11.2 fixed it): pip install "numpy<2.4", or upgrade TensorRT to 11.2 or later, or set '
            "engine.roi_align: builtin"
        )
    return None


def tensorrt_plugin(trt: ModuleType) -> ModuleType:
    """TensorRT's `tensorrt.plugin` package. PyPI's `tensorrt` frontend ships it from 10.14; 10.6 - 10.13
    have it only inside the bindings wheel, as `tensorrt_bindings.plugin`, and earlier bindings not at all (the
    plugin path is refused there for want of add_cumulative anyway)."""
    try:
        return importlib.import_module(f"{trt.__name__}.plugin")
    except ModuleNotFoundError as error:
        if error.name != f"{trt.__name__}.plugin":
            raise
        return importlib.import_module("tensorrt_bindings.plugin")


def _release(version: str) -> tuple[int, int]:
    return tuple(int(part) for part in version.split(".")[:2])


def kernel_name(num_levels: int, dtype: str, layout: str) -> str:
    """The PTX entry for a level count, feature dtype ('float32' / 'float16') and map layout
    (a key of trtflow.common.plugins.LAYOUT_CODES; both channels-last layouts share one entry)."""
    suffix = "nchw" if layout == "nchw" else "nhwc"
    return f"trtflow_multilevel_roi_align_{num_levels}l_{'f16' if dtype == 'float16' else 'f32'}_{suffix}"


def decorator_plugin_name(num_levels: int) -> str:
    return f"multilevel_roi_align_{num_levels}l"


def pixel_stride(channels, layout: str):
    """The kernel's pixel_stride: elements from one channels-last pixel to the next.

    Works on ints and on TensorRT shape expressions alike (+, //, * only); the library's C
    pixel_stride (plugins/multilevel_roi_align.cu) is the same rule for its own launches.
    """
    return (channels + 7) // 8 * 8 if layout == "nhwc8" else channels


def map_layout(trt, tensor_format) -> str:
    """trtflow.common.plugins.LAYOUT_CODES key of a feature map's trt.TensorFormat."""
    layouts = {trt.TensorFormat.LINEAR: "nchw", trt.TensorFormat.HWC: "nhwc", trt.TensorFormat.HWC8: "nhwc8"}
    if tensor_format not in layouts:
        raise ValueError(
            f"{PLUGIN_NAME} got feature maps in {tensor_format}: it offers TensorRT only LINEAR, "
            "HWC (float32) and HWC8 (float16)"
        )
    return layouts[tensor_format]


def kernel_scalar_args(num_rois, batch, channels, stride, sizes: Sequence[tuple], spec_args: Sequence) -> list:
    """The kernel's int32 parameters between its input pointers and its output pointer, in order.

    Works on ints and on TensorRT shape expressions alike; spec_args is RoIAlignSpec.c_args().
    """
    return [num_rois, batch, channels, stride, *(v for hw in sizes for v in hw), *spec_args]


def register_plugins(backend, plugin_library: Path | str = DEFAULT_LIBRARY) -> None:
    """Register the MultiLevelRoIAlign TensorRT plugin for `backend` (trtflow.backend.Backend).

    The PTX the ahead-of-time path embeds is read from beside the library.
    """
    library = Path(plugin_library)
    register_multilevel_roi_align(backend, library, library.with_name(ROI_ALIGN_PTX))


def register_multilevel_roi_align(backend, library: Path, ptx: Path) -> None:
    """Register the plugin for every level count with `backend` (trtflow.backend.Backend)."""
    reason = unsupported_reason(backend)
    if reason:
        raise PluginUnavailableError(reason)
    flavour = plugin_flavour(backend.name, backend.version)
    library = Path(library)
    load_library(library)  # a missing or stale library fails here, not inside TensorRT
    key = f"{backend.name}:{flavour}"
    if key in _registered:
        if _registered[key] != library.resolve():
            raise PluginLibraryError(
                f"the RoIAlign plugin is already registered with {_registered[key]}, "
                f"not {library}: use one plugin library per process"
            )
        return
    if flavour == "aot":
        ptx_text = Path(ptx).read_text() if Path(ptx).is_file() else ""
        wanted = [
            kernel_name(n, d, layout)
            for n in range(1, MAX_LEVELS + 1)
            for d in ("float32", "float16")
            for layout in ("nchw", "nhwc")
        ]
        missing = [name for name in wanted if name not in ptx_kernels(ptx_text)]
        if missing:
            raise PluginLibraryError(f"{ptx} lacks kernels {missing}: rebuild it with the rule `plugins`")
        for num_levels in range(1, MAX_LEVELS + 1):
            _register_decorator_plugin(backend.trt, library, ptx_text, num_levels)
    else:
        creator = _plugin_v3_classes(backend.trt)[1](library)
        backend.trt.get_plugin_registry().register_creator(creator, NAMESPACE)
    _registered[key] = library.resolve()


def add_multilevel_roi_align(backend, network, features: Sequence, rois, spec: RoIAlignSpec):
    """Add the plugin layer to `network`; returns its output ITensor (N, C, out_h, out_w)."""
    flavour = plugin_flavour(backend.name, backend.version)
    if f"{backend.name}:{flavour}" not in _registered:
        raise PluginLibraryError(
            "register the plugin first: trtflow.backend.roi_align_plugin.register_plugins(backend, library)"
        )
    if len(features) != spec.num_levels:
        raise ValueError(f"{len(features)} feature maps for a RoIAlignSpec of {spec.num_levels} levels")
    attrs = dict(zip(ATTRIBUTES, spec.c_args()))
    trt = backend.trt
    if flavour == "aot":
        op = getattr(getattr(tensorrt_plugin(trt).op, NAMESPACE), decorator_plugin_name(spec.num_levels))
        layer = network.add_plugin(op(*features, rois, **attrs), aot=True)
    else:
        creator = trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, NAMESPACE)
        fields = _PluginFields(trt, attrs)  # alive until the plugin has read them
        plugin = creator.create_plugin(PLUGIN_NAME, fields.collection, trt.TensorRTPhase.BUILD)
        layer = network.add_plugin_v3([*features, rois], [], plugin)
    layer.name = f"{PLUGIN_NAME}_{spec.num_levels}l"
    return layer.get_output(0)


# -- TensorRT >= 10.9: decorator plugin with an ahead-of-time kernel ---------------------------


def _register_decorator_plugin(trt, library: Path, ptx_text: str, num_levels: int) -> None:
    """register / autotune / impl / aot_impl for one level count.

    tensorrt.plugin reads the plugin's inputs and attributes from the decorated functions'
    signatures (inspect.signature), so the signatures are built for this level count.
    """
    trtp = tensorrt_plugin(trt)

    plugin_id = f"{NAMESPACE}::{decorator_plugin_name(num_levels)}"
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    tensors = [f"feature{l}" for l in range(num_levels)] + ["rois"]

    def signature(tensor_type, extra: Sequence[tuple[str, object]], attrs=ATTRIBUTES, returns=inspect.Signature.empty):
        params = [inspect.Parameter(n, positional, annotation=tensor_type) for n in tensors]
        params += [inspect.Parameter(n, positional, annotation=int) for n in attrs]
        params += [inspect.Parameter(n, positional, annotation=a) for n, a in extra]
        return inspect.Signature(params, return_annotation=returns)

    def with_signature(sig):
        def wrap(function):
            def bound(*args, **kwargs):
                return function(sig.bind(*args, **kwargs).arguments)

            bound.__signature__ = sig
            bound.__name__ = function.__name__
            return bound

        return wrap

    def split(arguments):
        maps = [arguments[n] for n in tensors[:-1]]
        spec = RoIAlignSpec(
            output_size=(arguments["out_h"], arguments["out_w"]),
            sampling_ratio=arguments["sampling_ratio"],
            aligned=bool(arguments["aligned"]),
            first_level=arguments["first_level"],
            num_levels=num_levels,
            canonical_scale=arguments["canonical_scale"],
            canonical_level=arguments["canonical_level"],
        )
        return maps, arguments["rois"], spec

    @with_signature(signature(trtp.TensorDesc, (), returns=trtp.TensorDesc))
    def describe(arguments):
        maps, rois, spec = split(arguments)
        shape = (rois.shape_expr[0], maps[0].shape_expr[1], *spec.output_size)
        return trtp.from_shape_expr(shape, dtype=maps[0].dtype)

    @with_signature(
        signature(
            trtp.TensorDesc, [("outputs", tuple[trtp.TensorDesc])], attrs=(), returns=list[trtp.AutoTuneCombination]
        )
    )
    def autotune(arguments):
        # Maps and output share FP32 or FP16; the RoIs stay FP32. All maps take one layout:
        # LINEAR or channels last (HWC for FP32, HWC8 for FP16); RoIs and output are LINEAR.
        return [
            trtp.AutoTuneCombination(
                ",".join([dtype] * num_levels + ["FP32", dtype]),
                ",".join([f"LINEAR|{channels_last}"] * num_levels + ["LINEAR", "LINEAR"]),
            )
            for dtype, channels_last in (("FP32", "HWC"), ("FP16", "HWC8"))
        ]

    @with_signature(signature(trtp.Tensor, [("outputs", tuple[trtp.Tensor]), ("stream", int)]))
    def run(arguments):
        maps, rois, spec = split(arguments)
        output = arguments["outputs"][0]
        launch(
            load_library(library),
            spec,
            [m.data_ptr for m in maps],
            [(m.shape[2], m.shape[3]) for m in maps],
            maps[0].shape[0],
            maps[0].shape[1],
            rois.data_ptr,
            rois.shape[0],
            output.data_ptr,
            "float16" if maps[0].dtype == trt.float16 else "float32",
            arguments["stream"],
            map_layout(trt, maps[0].format),
        )

    aot_returns = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]

    @with_signature(
        signature(trtp.TensorDesc, [("outputs", tuple[trtp.TensorDesc]), ("tactic", int)], returns=aot_returns)
    )
    def compiled(arguments):
        maps, rois, spec = split(arguments)
        dtype = "float16" if maps[0].dtype == trt.float16 else "float32"
        layout = map_layout(trt, maps[0].format)
        num_rois, channels = rois.shape_expr[0], maps[0].shape_expr[1]
        scalars = kernel_scalar_args(
            num_rois,
            maps[0].shape_expr[0],
            channels,
            pixel_stride(channels, layout),
            [(m.shape_expr[2], m.shape_expr[3]) for m in maps],
            spec.c_args(),
        )
        launch_params = trtp.KernelLaunchParams()
        launch_params.grid_x = trtp.max(num_rois, 1)  # a zero-RoI batch still launches; blocks exit early
        launch_params.grid_y = trtp.cdiv(channels, CHANNELS_PER_BLOCK)
        launch_params.block_x = THREADS
        launch_params.shared_mem = 0  # the kernel's shared memory is static
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in scalars])
        return kernel_name(num_levels, dtype, layout), ptx_text, launch_params, extra_args

    trtp.register(plugin_id)(describe)
    trtp.autotune(plugin_id)(autotune)
    trtp.impl(plugin_id)(run)
    trtp.aot_impl(plugin_id)(compiled)


# -- TensorRT 10.8: class-based IPluginV3 ------------------------------------------------------


class _PluginFields:
    """The plugin's attributes as a PluginFieldCollection, with the int32 arrays it points at.

    A PluginField keeps only a pointer to its array's memory, not the array: TensorRT reads freed
    memory unless the arrays outlive its reads. Keep this object (not only `.collection`) alive.
    """

    def __init__(self, trt, attrs: dict):
        self.arrays = {name: np.array([attrs[name]], dtype=np.int32) for name in ATTRIBUTES}
        self.collection = trt.PluginFieldCollection(
            [trt.PluginField(name, self.arrays[name], trt.PluginFieldType.INT32) for name in ATTRIBUTES]
        )


def _plugin_v3_classes(trt):
    """The IPluginV3 plugin and its creator, built on the imported TensorRT module's bases."""

    class MultiLevelRoIAlignPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, library: Path, attrs: dict):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.num_outputs = 1
            self.plugin_namespace = NAMESPACE
            self.plugin_name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.library = library
            self.attrs = dict(attrs)
            self.fields = _PluginFields(trt, self.attrs)  # what get_fields_to_serialize hands TensorRT

        def get_capability_interface(self, type):
            return self

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            shape = trt.DimsExprs(4)
            shape[0] = inputs[-1][0]
            shape[1] = inputs[0][1]
            shape[2] = expr_builder.constant(self.attrs["out_h"])
            shape[3] = expr_builder.constant(self.attrs["out_w"])
            return [shape]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if pos == num_inputs - 1:  # RoIs
                return desc.type == trt.DataType.FLOAT and desc.format == trt.TensorFormat.LINEAR
            if pos == num_inputs:  # output: the maps' type, always LINEAR
                return desc.type == in_out[0].desc.type and desc.format == trt.TensorFormat.LINEAR
            if pos == 0:
                return (desc.type, desc.format) in {
                    (trt.DataType.FLOAT, trt.TensorFormat.LINEAR),
                    (trt.DataType.HALF, trt.TensorFormat.LINEAR),
                    (trt.DataType.FLOAT, trt.TensorFormat.HWC),
                    (trt.DataType.HALF, trt.TensorFormat.HWC8),
                }
            return desc.type == in_out[0].desc.type and desc.format == in_out[0].desc.format

        def configure_plugin(self, inputs, outputs):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            levels = len(inputs) - 1
            spec = RoIAlignSpec(
                output_size=(self.attrs["out_h"], self.attrs["out_w"]),
                sampling_ratio=self.attrs["sampling_ratio"],
                aligned=bool(self.attrs["aligned"]),
                first_level=self.attrs["first_level"],
                num_levels=levels,
                canonical_scale=self.attrs["canonical_scale"],
                canonical_level=self.attrs["canonical_level"],
            )
            dims = [input_desc[l].dims for l in range(levels)]
            launch(
                load_library(self.library),
                spec,
                list(inputs[:levels]),
                [(d[2], d[3]) for d in dims],
                dims[0][0],
                dims[0][1],
                inputs[levels],
                input_desc[levels].dims[0],
                outputs[0],
                "float16" if input_desc[0].type == trt.DataType.HALF else "float32",
                stream,
                map_layout(trt, input_desc[0].format),
            )
            return 0

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            return self.fields.collection

        def clone(self):
            return MultiLevelRoIAlignPlugin(self.library, self.attrs)

    class MultiLevelRoIAlignCreator(trt.IPluginCreatorV3One):
        def __init__(self, library: Path):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_namespace = NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.library = library
            self.fields = _PluginFields(trt, dict.fromkeys(ATTRIBUTES, 0))
            self.field_names = self.fields.collection

        def create_plugin(self, name, fc, phase):
            attrs = {field.name: int(field.data[0]) for field in fc}
            missing = [a for a in ATTRIBUTES if a not in attrs]
            if missing:
                raise ValueError(f"{PLUGIN_NAME} plugin fields {missing} are missing")
            return MultiLevelRoIAlignPlugin(self.library, attrs)

    return MultiLevelRoIAlignPlugin, MultiLevelRoIAlignCreator
