"""Engine stage: features.onnx (int8: its Q/DQ twin) + the TensorRT-API head -> a plan and its metadata.

The features network comes from the ONNX parser; the detection head from
`trtflow.build.head_network.add_head`, built with the network API from `results/weights/`. Precision
lives in the graph (strongly typed networks), so one path serves TensorRT 10, 11 and
TensorRT-RTX:
- fp32: the ONNX as exported, fp32 head.
- fp16: the ONNX converted to fp16 weights and activations (input kept fp32, cast inside), fp16 head.
- int8, fp8: the Q/DQ ONNX (explicit quantization), fp16 head; with `quantized_float: fp16` (the default) every
  float tensor of the graph but the image input in fp16, as NVIDIA's ModelOpt writes Q/DQ graphs. On TensorRT 10
  only, `int8_mode: implicit` instead parses features.onnx into a weakly typed network and hands our calibration
  table to TensorRT's implicit calibrator.
Version-specific calls live in `trtflow.backend`; this module decides what to build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import onnx

from trtflow.artifacts import files_sha256, software_versions, write_bytes
from trtflow.backend import Backend, layer_dtypes, load_backend
from trtflow.backend.dtypes import TORCH_DTYPES
from trtflow.backend.roi_align_plugin import register_plugins, unsupported_reason
from trtflow.build.head_network import add_head, check_head_options
from trtflow.common.head import HEAD_OUTPUTS, head_dtype
from trtflow.common.model import RPN_PREFIXES
from trtflow.common.onnxrun import is_quantized
from trtflow.config import batch_problem
from trtflow.formats.head_weights import load_head
from trtflow.formats.network_record import NetworkRecord, read_network
from trtflow.formats.plan_metadata import PlanMetadata, metadata_path
from trtflow.formats.usage import plan_usage
from trtflow.precisions import (
    EXPORTED_GRAPH,
    PRECISIONS,
    QDQ_GRAPH,
    QDQ_SUFFIX,
    Precision,
    compute_capability_problem,
    features_graph,
    runnable_targets,
)

INT8_MODES = ("explicit", "implicit")
# engine.quantized_float: the float precision whose dtype a Q/DQ graph's tensors between its quantized layers take
QUANTIZED_FLOATS = tuple(name for name, row in PRECISIONS.items() if not row.calibrated)
# the first opset whose QuantizeLinear / DequantizeLinear take float16 inputs and scales
FLOAT16_QDQ_OPSET = 19
CHECKPOINT_KEY = "trtflow.checkpoint_sha256"  # written into features.onnx by trtflow.build.export

log = logging.getLogger(__name__)


# -- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile's batch sizes: every batch in [min, max] runs, `opt` runs fastest."""

    min: int = 1
    opt: int = 1
    max: int = 1

    def __post_init__(self):
        problem = batch_problem(asdict(self))
        if problem:
            raise ValueError(problem)


@dataclass(frozen=True)
class EngineSettings:
    """One plan's build settings (config.yaml `engine:`, with `precision` picked by the rule)."""

    precision: str
    workspace_mb: int = 2048
    opt_level: int = 3
    batch: BatchProfile = field(default_factory=BatchProfile)
    roi_align: str = "builtin"
    nms: str = "static"
    int8_mode: str = "explicit"
    quantized_float: str = "fp16"
    compute_capabilities: tuple[str, ...] = ()
    debug_outputs: tuple[str, ...] = ()
    tf32: bool = False

    def __post_init__(self):
        for key, value, allowed in (
            ("precision", self.precision, PRECISIONS),
            ("int8_mode", self.int8_mode, INT8_MODES),
            ("quantized_float", self.quantized_float, QUANTIZED_FLOATS),
        ):
            if value not in allowed:
                raise ValueError(f"engine.{key} = {value!r}: use one of {', '.join(allowed)}")
        check_head_options("engine.", roi_align=self.roi_align, nms=self.nms)
        if not 0 <= self.opt_level <= 5:
            raise ValueError(f"engine.opt_level = {self.opt_level}: use 0 (fastest build) to 5 (most tactics)")
        if self.workspace_mb < 1:
            raise ValueError(f"engine.workspace_mb = {self.workspace_mb}: use a positive number of MiB")

    @classmethod
    def from_config(cls, engine: dict, precision: str) -> EngineSettings:
        return cls(
            precision=precision,
            workspace_mb=engine.get("workspace_mb", cls.workspace_mb),
            opt_level=engine.get("opt_level", cls.opt_level),
            batch=BatchProfile(**engine.get("batch", {})),
            roi_align=engine.get("roi_align", cls.roi_align),
            nms=engine.get("nms", cls.nms),
            int8_mode=engine.get("int8_mode", cls.int8_mode),
            quantized_float=engine.get("quantized_float", cls.quantized_float),
            compute_capabilities=tuple(str(cc) for cc in engine.get("rtx", {}).get("compute_capabilities", ())),
            debug_outputs=tuple(engine.get("debug_outputs", ())),
            tf32=bool(engine.get("tf32", cls.tf32)),
        )

    @property
    def row(self) -> Precision:
        """The precision's row of trtflow.precisions."""
        return PRECISIONS[self.precision]

    @property
    def implicit_int8(self) -> bool:
        return self.row.implicit_calibration and self.int8_mode == "implicit"

    @property
    def features_graph(self) -> str:
        """The features graph's file name (trtflow.precisions): the export, or the Q/DQ graph rule calibrate writes."""
        return features_graph(self.precision, implicit=self.implicit_int8)

    @property
    def features_dtype(self) -> str:
        """The dtype the parsed graph's float parts are converted to: the row's, or for a Q/DQ graph
        engine.quantized_float's."""
        if self.features_graph == EXPORTED_GRAPH:
            return self.row.features_dtype
        return PRECISIONS[self.quantized_float].features_dtype

    @property
    def head_dtype(self) -> str:
        return head_dtype(self.precision)

    def check_backend(self, backend: Backend) -> None:
        """Refuse options this backend cannot build, naming the key and what to set instead."""
        caps = backend.capabilities
        reason = unsupported_reason(backend) if self.roi_align == "plugin" else None
        if reason:
            raise ValueError(f"engine.roi_align = plugin: {reason}")
        if self.nms == "builtin_layer" and not caps.nms_layer:
            raise ValueError(
                f"engine.nms = builtin_layer: {backend.describe()} cannot build INMSLayer; set engine.nms: static"
            )
        if self.implicit_int8 and not caps.implicit_calibrator:
            raise ValueError(
                f"engine.int8_mode = implicit needs TensorRT 10's implicit calibrator; {backend.describe()} "
                "builds explicit Q/DQ networks only: set engine.int8_mode: explicit"
            )
        if self.compute_capabilities and not caps.compute_capability_targets:
            raise ValueError(
                f"engine.rtx.compute_capabilities = {list(self.compute_capabilities)}: {backend.describe()} builds "
                "for the GPU it runs on; set it to []"
            )
        if self.compute_capabilities and not self.build_targets(backend):
            raise ValueError(
                f"engine.rtx.compute_capabilities = {list(self.compute_capabilities)}: "
                f"{compute_capability_problem(self.precision, backend.name, self.compute_capabilities)}; add one of "
                f"those GPUs' compute capabilities to it, or take {self.precision} out of engine.precisions"
            )

    def build_targets(self, backend: Backend) -> tuple[str, ...]:
        """engine.rtx.compute_capabilities as the builder gets them: the configured targets from the precision's least
        compute capability on (trtflow.precisions); none configured leaves the backend's defaults, or, where the
        precision needs a least one, names those defaults from it on."""
        if not self.compute_capabilities and self.row.min_compute_capability.get(backend.name) is None:
            return ()
        configured = self.compute_capabilities or backend.default_compute_capabilities()
        return runnable_targets(self.precision, backend.name, configured)


@dataclass(frozen=True)
class EngineSources:
    """The files a plan is built from. Without head weights the plan is features-only."""

    onnx: Path
    head_weights: Path | None = None  # the weights rule's folder: manifest.json + head.safetensors
    calibration_table: Path | None = None
    plugin_library: Path | None = None
    # calibration.keep_float.auto: rule float_layers' choice, which the Q/DQ graph was written with (recorded)
    float_layers: Path | None = None

    def __post_init__(self):
        for name in ("onnx", "head_weights", "calibration_table", "plugin_library", "float_layers"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))

    def check(self, settings: EngineSettings) -> None:
        """Every file the settings need is there, before anything is parsed."""
        required = [("ONNX", self.onnx, None)]
        if self.head_weights is not None:
            required.append(("head weights manifest", self.head_weights / "manifest.json", None))
        if settings.implicit_int8:
            required.append(
                (
                    "calibration table",
                    self.calibration_table,
                    ("engine.int8_mode = implicit", "calibration_table", "rule calibrate"),
                )
            )
        if settings.roi_align == "plugin":
            required.append(
                (
                    "RoIAlign plugin library",
                    self.plugin_library,
                    ("engine.roi_align = plugin", "plugin_library", "rule plugins"),
                )
            )
        for what, path, needed_by in required:
            if path is None:
                option, field, rule = needed_by
                raise ValueError(
                    f"{option} needs a {what} but none was given; pass the one {rule} writes as "
                    f"EngineSources({field}=...)"
                )
            if not path.is_file():
                raise FileNotFoundError(f"{what} {path} does not exist; build it first (snakemake {path})")


# -- files ------------------------------------------------------------------------------


def merge_into_file(path: Path, merge: Callable[[bytes | None], bytes], timeout_s: float = 600) -> None:
    """Read-merge-write `path` under a file lock, so concurrent writers each keep the others' entries."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=timeout_s):
        current = path.read_bytes() if path.exists() else None
        write_bytes(path, merge(current))


@contextmanager
def shared_timing_cache(backend: Backend, config, path: Path | None) -> Iterator[dict]:
    """Seed the build from the timing cache on disk; afterwards merge this build's timings back.

    Builds run concurrently (snakemake --cores N), so the cache is re-read under the lock and
    combined, never overwritten with one build's view. Replaced atomically, it is read unlocked.
    """
    if path is None:
        yield {"used": False, "reason": "no timing cache path given"}
        return
    if not backend.capabilities.timing_cache:
        # TensorRT-RTX: the API is a deprecated no-op that would force a GPU query during CPU AOT builds.
        yield {"used": False, "reason": f"{backend.describe()} does not use timing caches"}
        return
    path = Path(path)
    backend.load_timing_cache(config, path.read_bytes() if path.exists() else b"")
    info = {"used": True, "path": str(path)}
    yield info
    merge_into_file(path, lambda stored: backend.merged_timing_cache(config, stored))
    info["bytes"] = path.stat().st_size


# -- the features network -----------------------------------------------------------------


def read_features_onnx(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as error:  # onnx raises DecodeError, OSError, ... for a damaged file
        raise ValueError(
            f"{path} is not a readable ONNX model ({error}); re-run its rule (snakemake -f {path})"
        ) from error


def export_of(onnx_path: Path) -> Path:
    """The exported features ONNX a graph comes from: itself, or for a Q/DQ graph (features.qdq.onnx,
    features.<precision>.qdq.onnx) the ONNX calibrated into it."""
    if onnx_path.name.endswith(QDQ_SUFFIX):
        return onnx_path.with_name(onnx_path.name.removesuffix(QDQ_SUFFIX).split(".")[0] + ".onnx")
    return onnx_path


def check_features_onnx(model: onnx.ModelProto, path: Path, settings: EngineSettings) -> None:
    """The ONNX suits the precision: Q/DQ exactly when the precision's features graph is a Q/DQ one (explicit
    quantization)."""
    quantized = is_quantized(model)
    qdq_expected = settings.features_graph != EXPORTED_GRAPH
    if qdq_expected and not quantized:
        mode = " (engine.int8_mode: explicit)" if settings.row.implicit_calibration else ""
        qdq_graph = path.with_name(settings.features_graph)
        rule = "calibrate" if settings.features_graph == QDQ_GRAPH else "quantized_graph"
        raise ValueError(
            f"{path} has no Q/DQ nodes: {settings.precision}{mode} is built from its Q/DQ graph "
            f"{qdq_graph} (rule {rule}: snakemake {qdq_graph})"
        )
    if quantized and not qdq_expected:
        raise ValueError(
            f"{path} is quantized (Q/DQ nodes) but the {settings.precision} "
            f"{'implicit-INT8 ' if settings.implicit_int8 else ''}plan is built from the unquantized features ONNX"
            + (f" {export_of(path)}" if export_of(path) != path else " (rule onnx)")
        )


def checkpoint_of(model: onnx.ModelProto) -> str | None:
    return next((prop.value for prop in model.metadata_props if prop.key == CHECKPOINT_KEY), None)


def check_same_checkpoint(model: onnx.ModelProto, onnx_path: Path, checkpoint_sha256: str, manifest_path: Path) -> None:
    """The features and the head weights must come from one checkpoint, or detections are garbage."""
    onnx_checkpoint = checkpoint_of(model)
    if onnx_checkpoint is None:
        raise ValueError(
            f"{onnx_path} has no '{CHECKPOINT_KEY}' metadata, so it cannot be matched to the head weights; "
            f"re-export it with the pipeline ({reexport_command(onnx_path)})"
        )
    if onnx_checkpoint != checkpoint_sha256:
        raise ValueError(
            f"{onnx_path} was exported from checkpoint {onnx_checkpoint[:12]}... but {manifest_path} holds head "
            f"weights of checkpoint {checkpoint_sha256[:12]}...; rebuild both from the current checkpoint "
            f"({reexport_command(onnx_path, manifest_path)})"
        )


def reexport_command(onnx_path: Path, *others: Path) -> str:
    """`snakemake -f` of a features graph (a Q/DQ graph after the export it is calibrated from) and `others`."""
    return "snakemake -f " + " ".join(str(path) for path in dict.fromkeys([export_of(onnx_path), onnx_path, *others]))


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations; the image input stays fp32 and is cast inside the graph."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    inputs = [tensor.name for tensor in model.graph.input]
    # keep_io_types names the tensors left in fp32: only the inputs, so the feature maps reach the head as fp16.
    return convert_float_to_float16(model, keep_io_types=inputs, disable_shape_infer=False)


def qdq_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A Q/DQ graph with every float tensor in fp16 but the image input, which is cast to fp16 before its first
    QuantizeLinear: the weights left in float, biases, scales and the activations between quantized layers (the
    FPN's additions and upsampling included). No op is kept in fp32 (onnxruntime's converter would keep Min, Max, Upsample
    and a few more for its own kernels' sake: TensorRT has fp16 ones). Raised to opset 19, whose Q/DQ take fp16
    scales; the converter's input casts, which it appends, moved to the front (topological order, as ONNX Runtime
    needs)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    raised = onnx.ModelProto()
    raised.CopyFrom(model)
    for opset in raised.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < FLOAT16_QDQ_OPSET:
            opset.version = FLOAT16_QDQ_OPSET
    inputs = [tensor.name for tensor in model.graph.input]
    converted = convert_float_to_float16(raised, keep_io_types=inputs, disable_shape_infer=False, op_block_list=[])
    nodes = list(converted.graph.node)
    input_casts = [node for node in nodes if node.op_type == "Cast" and set(node.input) <= set(inputs)]
    del converted.graph.node[:]
    converted.graph.node.extend(input_casts + [node for node in nodes if node not in input_casts])
    return converted


def network_model(model: onnx.ModelProto, settings: EngineSettings) -> onnx.ModelProto:
    """The ONNX the parser gets for this precision."""
    if settings.features_dtype == "float32":
        return model
    return to_fp16(model) if settings.features_graph == EXPORTED_GRAPH else qdq_to_fp16(model)


@dataclass
class FeatureOutputs:
    """The parsed features network's outputs by role, keyed by their ONNX names (p2, objectness_p2,
    deltas_p2, ...) in export order: the mapping form `trtflow.common.head` / `trtflow.build.head_network` take."""

    features: dict
    objectness: dict
    deltas: dict
    all: dict  # every output, in export order

    @classmethod
    def of(cls, network, source: Path) -> FeatureOutputs:
        outputs = {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)}
        role = {prefix: {n: t for n, t in outputs.items() if n.startswith(prefix)} for prefix in RPN_PREFIXES}
        features = {n: t for n, t in outputs.items() if not n.startswith(RPN_PREFIXES)}
        levels = [{n.removeprefix(prefix) for n in role[prefix]} for prefix in RPN_PREFIXES]
        if not (levels[0] and levels[0] == levels[1] <= set(features)):
            raise ValueError(
                f"{source} outputs {list(outputs)} do not follow the features contract (every FPN map, then "
                "objectness_<level> and deltas_<level> per level); re-export it with trtflow.build.export"
            )
        return cls(features, *role.values(), outputs)


# -- the network ------------------------------------------------------------------------


def profile_shapes(network, batch: BatchProfile, source: Path) -> dict:
    """Optimization-profile shapes of the dynamic-batch inputs; a static batch must match engine.batch."""
    shapes = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        dims = list(tensor.shape)
        if any(d < 0 for d in dims[1:]):
            raise ValueError(
                f"{source} input '{tensor.name}' has shape {dims}: only the batch axis may be dynamic "
                "(export with the static model.input size)"
            )
        if dims[0] >= 0:
            if (batch.min, batch.opt, batch.max) != (dims[0],) * 3:
                raise ValueError(
                    f"{source} has a static batch of {dims[0]} but engine.batch = {asdict(batch)}: set engine.batch "
                    f"to {{min: {dims[0]}, opt: {dims[0]}, max: {dims[0]}}}, or export a dynamic batch "
                    "(onnx.dynamic_batch)"
                )
            continue
        shapes[tensor.name] = tuple([b, *dims[1:]] for b in (batch.min, batch.opt, batch.max))
    return shapes


def all_tensors(network) -> dict:
    tensors = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        for output in range(layer.num_outputs):
            tensor = layer.get_output(output)
            tensors[tensor.name] = tensor
    return tensors


def set_engine_outputs(network, outputs: dict, debug_outputs: tuple[str, ...]) -> None:
    """Exactly `outputs` (name -> ITensor) plus the requested debug tensors become engine outputs.

    Intermediate tensors left marked would cost memory and block fusions (TensorRT keeps marked
    tensors materialized), so everything else is unmarked.
    """
    marked = [network.get_output(i) for i in range(network.num_outputs)]
    available = all_tensors(network)
    unknown = [name for name in debug_outputs if name not in available]
    if unknown:
        hints = [t.name for t in marked] + list(outputs)
        raise ValueError(f"engine.debug_outputs {unknown} are not tensors of the network; e.g. {hints}")
    for tensor in marked:
        network.unmark_output(tensor)
    for name, tensor in outputs.items():
        tensor.name = name
        network.mark_output(tensor)
    for name in debug_outputs:
        if name not in outputs:
            network.mark_output(available[name])


def describe_io(network, shapes: dict) -> tuple[list, list]:
    def entry(tensor):
        item = {"name": tensor.name, "dtype": tensor.dtype.name, "shape": list(tensor.shape)}
        if tensor.name in shapes:
            item["profile"] = dict(zip(("min", "opt", "max"), (list(s) for s in shapes[tensor.name])))
        return item

    inputs = [entry(network.get_input(i)) for i in range(network.num_inputs)]
    outputs = [entry(network.get_output(i)) for i in range(network.num_outputs)]
    return inputs, outputs


def add_detection_head(
    backend: Backend, network, outputs: FeatureOutputs, manifest: dict, tensors: dict, settings: EngineSettings
) -> dict:
    return add_head(
        network,
        backend.trt,
        manifest,
        tensors,
        outputs.features,
        outputs.objectness,
        outputs.deltas,
        dtype=settings.head_dtype,
        roi_align=settings.roi_align,
        nms=settings.nms,
    )


# -- the build --------------------------------------------------------------------------


def build_gpu() -> dict | None:
    """The CUDA GPU this process builds on, if any."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def target_compute_capabilities(backend: Backend, settings: EngineSettings, gpu: dict | None) -> list[str]:
    """The GPUs the plan runs on: what the runner checks before deserializing."""
    if backend.capabilities.compute_capability_targets:
        if settings.compute_capabilities == ("current",):
            if gpu is None:
                raise ValueError("engine.rtx.compute_capabilities = [current] needs a GPU; name the targets instead")
            return [gpu["compute_capability"]]
        return list(settings.build_targets(backend) or backend.default_compute_capabilities())
    if gpu is None:
        raise ValueError(
            f"{backend.describe()} builds only on a CUDA GPU and none is visible; use backend: tensorrt_rtx for "
            "a CPU ahead-of-time build"
        )
    if problem := compute_capability_problem(settings.precision, backend.name, [gpu["compute_capability"]]):
        raise ValueError(
            f"{gpu['name']} (compute capability {gpu['compute_capability']}) cannot run it: {problem}; build on one of "
            "those GPUs, or with backend: tensorrt_rtx ahead of time for them (engine.rtx.compute_capabilities)"
        )
    return [gpu["compute_capability"]]


def define_network(
    backend: Backend,
    builder,
    model: onnx.ModelProto,
    sources: EngineSources,
    settings: EngineSettings,
    head: tuple[dict, dict] | None,
):
    """The network to build: parsed features, then the head (or none), with exactly the engine's outputs.

    Returns (network, parser): the parser owns the features' weights and must outlive the build.
    """
    network = backend.create_network(builder, strongly_typed=not settings.implicit_int8)
    log.info("parsing %s for %s", sources.onnx, settings.precision)
    parser = backend.parse_onnx(network, network_model(model, settings).SerializeToString(), str(sources.onnx))
    features = FeatureOutputs.of(network, sources.onnx)
    if head is None:  # a features-only plan: the ONNX outputs as exported
        set_engine_outputs(network, features.all, settings.debug_outputs)
    else:
        log.info("adding the head (roi_align %s, nms %s, %s)", settings.roi_align, settings.nms, settings.head_dtype)
        outputs = add_detection_head(backend, network, features, *head, settings)
        set_engine_outputs(network, {name: outputs[name] for name in HEAD_OUTPUTS}, settings.debug_outputs)
    return network, parser


def build_plan(
    backend: Backend,
    builder,
    network,
    shapes: dict,
    settings: EngineSettings,
    sources: EngineSources,
    timing_cache: Path | None,
) -> tuple[bytes, dict]:
    """Serialize the network under the configured builder settings; returns the plan and timing-cache info."""
    config = backend.create_config(
        builder,
        workspace_mb=settings.workspace_mb,
        opt_level=settings.opt_level,
        profile_shapes=shapes,
        compute_capabilities=settings.build_targets(backend),
        tf32=settings.tf32,
    )
    # TensorRT keeps only a borrowed pointer to the calibrator: it must outlive the build.
    calibrator = (
        backend.enable_implicit_int8(builder, config, sources.calibration_table, shapes, batch_size=settings.batch.opt)
        if settings.implicit_int8
        else None
    )
    log.info("building the %s plan with %s", settings.precision, backend.describe())
    with shared_timing_cache(backend, config, timing_cache) as cache_info:
        plan = backend.build(builder, network, config)
    del calibrator
    return plan, cache_info


def plan_precisions(backend: Backend, plan: bytes, network, gpu: dict | None) -> dict:
    engine = backend.deserialize(plan) if gpu is not None else None
    if engine is None:
        reason = "no GPU here to deserialize the plan" if gpu is None else f"{gpu['name']} cannot deserialize the plan"
        return layer_dtypes.from_network(network, reason)
    inspector = engine.create_engine_inspector()
    return layer_dtypes.from_inspector(inspector.get_engine_information(backend.trt.LayerInformationFormat.JSON))


def tensor_census(record: NetworkRecord) -> dict:
    """The recorded network's tensors per DataType name: how many and their bytes at batch 1 (a dimension of -1
    counted as 1), activations (the inputs and every layer's outputs) apart from constants (weights, scales)."""
    census: dict[str, dict] = {"activations": {}, "constants": {}}
    tensors = [("activations", tensor) for tensor in record.inputs] + [
        ("constants" if layer["type"] == "CONSTANT" else "activations", tensor)
        for layer in record.layers
        for tensor in layer["outputs"]
    ]
    for kind, tensor in tensors:
        elements = math.prod(1 if size == -1 else size for size in tensor["shape"])
        counts = census[kind].setdefault(tensor["dtype"], {"tensors": 0, "bytes": 0})
        counts["tensors"] += 1
        counts["bytes"] += elements * TORCH_DTYPES[tensor["dtype"]].itemsize
    return census


def file_record(path: Path | None) -> dict | None:
    return None if path is None else {"path": str(path), "sha256": files_sha256(path)}


def float_layers_record(path: Path | None) -> dict | None:
    """The float-layer choice's file and the layers it left in float, with the budget and the simulated drop."""
    if path is None:
        return None
    choice = json.loads(path.read_text())
    return {
        **file_record(path),
        "layers": choice["float_layers"],
        "of_layers": choice["of_layers"],
        "budget_points": choice["budget_points"],
        "simulated_drop_points": choice["drop_points"],
    }


def build_engine(
    sources: EngineSources,
    settings: EngineSettings,
    plan_path: Path,
    *,
    backend: str | Backend = "auto",
    timing_cache: Path | None = None,
    network_record_path: Path | None = None,
    usage: dict | None = None,
) -> PlanMetadata:
    """Build one plan from the sources; write plan + metadata (`trtflow.formats.plan_metadata`; and, given
    `network_record_path`, the record of the network definition handed to the builder, for `trtflow.run.netexec`)
    atomically; return the metadata as a reader of its JSON gets it.

    `usage` (preprocess, postprocess, categories) goes into the metadata for runtimes: see `trtflow.formats.usage`.

    Everything is checked before TensorRT starts: options against the backend, files, the
    ONNX against the precision, and the ONNX and head weights against one checkpoint.
    """
    backend = backend if isinstance(backend, Backend) else load_backend(backend)
    settings.check_backend(backend)
    sources.check(settings)
    model = read_features_onnx(sources.onnx)
    check_features_onnx(model, sources.onnx, settings)
    head = None
    if sources.head_weights is not None:
        head = load_head(sources.head_weights)
        check_same_checkpoint(
            model, sources.onnx, head[0]["source_checkpoint_sha256"], sources.head_weights / "manifest.json"
        )
    gpu = build_gpu()
    compute_capabilities = target_compute_capabilities(backend, settings, gpu)
    if settings.roi_align == "plugin":
        register_plugins(backend, sources.plugin_library)

    started = time.perf_counter()
    builder = backend.create_builder()
    network, parser = define_network(backend, builder, model, sources, settings, head)
    shapes = profile_shapes(network, settings.batch, sources.onnx)
    record = read_network(network, backend.trt) if network_record_path is not None else None
    plan, cache_info = build_plan(backend, builder, network, shapes, settings, sources, timing_cache)
    build_seconds = time.perf_counter() - started
    del parser
    if record is not None:  # written first, so that the metadata can name its sha256
        record.save(network_record_path)

    inputs, outputs = describe_io(network, shapes)
    uses_gpu = not backend.capabilities.compute_capability_targets or settings.compute_capabilities == ("current",)
    metadata = PlanMetadata(
        backend=backend.name,
        backend_version=backend.version,
        software=software_versions(),
        precision=settings.precision,
        built_on="gpu" if uses_gpu else "cpu-aot",
        gpu=gpu,
        compute_capabilities=compute_capabilities,
        build_seconds=round(build_seconds, 3),
        plan_bytes=len(plan),
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        head=head is not None,
        roi_align=settings.roi_align if head is not None else None,
        nms=settings.nms if head is not None else None,
        int8_mode=settings.int8_mode if settings.row.implicit_calibration else None,
        layer_precisions=plan_precisions(backend, plan, network, gpu),
        network_record=None
        if record is None
        else {**file_record(network_record_path), "layers": len(record.layers), "tensor_dtypes": tensor_census(record)},
        timing_cache=cache_info,
        settings={**asdict(settings), "batch": asdict(settings.batch)},
        sources={
            "onnx": file_record(sources.onnx),
            "checkpoint_sha256": checkpoint_of(model),
            "head_weights": file_record(sources.head_weights / "manifest.json") if head is not None else None,
            "calibration_table": file_record(sources.calibration_table),
            "plugin_library": file_record(sources.plugin_library),
            "float_layers": float_layers_record(sources.float_layers),
        },
        **plan_usage(
            inputs,
            outputs,
            backend=backend.name,
            backend_version=backend.version,
            compute_capabilities=compute_capabilities,
            plan_path=plan_path,
            usage=usage,
        ),
    )
    write_bytes(plan_path, plan)
    metadata.write(metadata_path(plan_path))
    log.info("wrote %s (%d bytes, %.1f s)", plan_path, len(plan), build_seconds)
    return PlanMetadata.read(metadata_path(plan_path))  # as a reader gets it: the settings' tuples as JSON lists
