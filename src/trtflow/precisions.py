"""The precisions a plan can be built in, one row each: everything that differs from one precision to another.

Rules (the `{precision}` wildcard constraints, which features graph a plan is built and verified from, whether the
calibration stage runs), the config schema (`engine.precisions`, `verify.enforce`, `verify.thresholds`: YAML that
`tests/test_precisions.py` holds equal to this table) and the code (head dtype, checks, bench dtype, DeepStream's
network mode) read this table; none of them names a precision. docs/ARCHITECTURE.md, "Where to add a precision",
says what a new row needs besides.

Dtypes are names ("float32", "float16", "int8"), as numpy and torch spell them: `trtflow.backend.dtypes` maps them
to torch and TensorRT. This module imports nothing heavy: the Snakefile and `trtflow.config` import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType

# The features graphs a plan can be parsed from, under results/<model>/onnx/: the export, the int8 Q/DQ graph that rule
# calibrate writes beside it (<name>.onnx -> <name>.qdq.onnx), or another quantized precision's Q/DQ graph that rule
# quantized_graph writes from the same calibration (<name>.<precision>.qdq.onnx).
QDQ_SUFFIX = ".qdq.onnx"
EXPORTED_GRAPH = "features.onnx"
QDQ_GRAPH = EXPORTED_GRAPH.removesuffix(".onnx") + QDQ_SUFFIX


def precision_qdq_graph(name: str) -> str:
    """The Q/DQ graph rule quantized_graph writes for precision `name` (a wildcard in the rule)."""
    return f"{EXPORTED_GRAPH.removesuffix('.onnx')}.{name}{QDQ_SUFFIX}"


@dataclass(frozen=True)
class QuantizedType:
    """A quantized dtype and its symmetric scale rule: scale = amax / max_magnitude, values clipped to
    +-max_magnitude (per-tensor activations, per-output-channel weights)."""

    name: str  # "int8", "float8_e4m3fn" (torch's and ml_dtypes' names)
    max_magnitude: float

    def scale_rule(self) -> str:
        return f"amax/{self.max_magnitude:g}"


@dataclass(frozen=True)
class Precision:
    """One precision's row. `quantized` set means the precision needs calibration (rule calibrate: histograms, the
    calibration table, the Q/DQ graph)."""

    name: str
    head_dtype: str  # the dtype of the head's feature sampling and box head (box geometry is float32 always)
    features_graph: str  # EXPORTED_GRAPH or a Q/DQ graph: what the engine parses and verify's deployment form runs
    # the dtype the parsed export's float weights and activations are converted to; a Q/DQ graph's follow
    # config engine.quantized_float instead (trtflow.build.engine.EngineSettings.features_dtype)
    features_dtype: str
    quantized: QuantizedType | None
    # TensorRT 10's implicit calibrator can build it instead from EXPORTED_GRAPH and the calibration table
    # (engine.int8_mode: implicit; a weakly typed network)
    implicit_calibration: bool
    # backend name -> the least compute capability a plan of this precision may target; a backend absent builds
    # it for every GPU it supports. Targets below it are left out of the plan; a config with none left is refused
    # before any job (trtflow.config) and by the engine stage (EngineSettings.check_backend).
    min_compute_capability: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    # the default of config `verify.thresholds.<name>` (the schema holds the same values: tests/test_precisions.py)
    verify_thresholds: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    bench_dtype: str = "float32"  # the dtype the PyTorch executors run at on a CUDA GPU (float32 on the CPU)
    deepstream_network_mode: int | None = None  # nvinfer's `network-mode`; None: DeepStream has none for it
    # in the default of config `engine.precisions` and so in the default target
    built_by_default: bool = True
    # the GPUs that have what min_compute_capability asks for, named in refusals
    gpu_generations: str = ""

    @property
    def calibrated(self) -> bool:
        return self.quantized is not None


def _frozen(mapping: dict) -> MappingProxyType:
    return MappingProxyType(mapping)


INT8 = QuantizedType("int8", 127)
FP8_E4M3 = QuantizedType("float8_e4m3fn", 448)  # E4M3 (no infinities): largest finite magnitude 448

PRECISIONS: MappingProxyType = _frozen(
    {
        row.name: row
        for row in (
            Precision(
                name="fp32",
                head_dtype="float32",
                features_graph=EXPORTED_GRAPH,
                features_dtype="float32",
                quantized=None,
                implicit_calibration=False,
                verify_thresholds=_frozen(
                    {"min_match_recall": 0.995, "min_match_precision": 0.99, "max_abs_dscore": 0.02}
                ),
                bench_dtype="float32",
                deepstream_network_mode=0,
            ),
            Precision(
                name="fp16",
                head_dtype="float16",
                features_graph=EXPORTED_GRAPH,
                features_dtype="float16",
                quantized=None,
                implicit_calibration=False,
                verify_thresholds=_frozen(
                    {"min_match_recall": 0.97, "min_match_precision": 0.97, "max_abs_dscore": 0.05}
                ),
                bench_dtype="float16",
                deepstream_network_mode=2,
            ),
            Precision(
                name="int8",
                head_dtype="float16",
                features_graph=QDQ_GRAPH,
                # the export under engine.int8_mode: implicit, which TensorRT's calibrator types
                features_dtype="float32",
                quantized=INT8,
                implicit_calibration=True,
                verify_thresholds=_frozen({"max_map_drop_points": 0.5}),
                # no PyTorch INT8 path: the engine's head dtype stands in
                bench_dtype="float16",
                deepstream_network_mode=1,
            ),
            Precision(
                name="fp8",
                head_dtype="float16",
                features_graph=precision_qdq_graph("fp8"),
                features_dtype="float32",
                quantized=FP8_E4M3,
                implicit_calibration=False,
                # FP8 tensor cores: Ada (8.9) and Blackwell (12.x), TensorRT-RTX's targets; full TensorRT also Hopper (9.0)
                min_compute_capability=_frozen({"tensorrt_rtx": "8.9", "tensorrt": "8.9"}),
                gpu_generations="Ada 8.9, Hopper 9.0 (full TensorRT), Blackwell 12.x",
                verify_thresholds=_frozen({"max_map_drop_points": 0.3}),
                bench_dtype="float16",
                # nvinfer's network-mode has no FP8
                deepstream_network_mode=None,
                # its plans run on 8.9 and later only, and the default TensorRT-RTX targets start at 8.0
                built_by_default=False,
            ),
        )
    }
)
NAMES = tuple(PRECISIONS)
DEFAULT_NAMES = tuple(name for name, row in PRECISIONS.items() if row.built_by_default)


def precision(name: str) -> Precision:
    """The row of `name`; an unknown name is refused with the known ones."""
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r}: use one of {', '.join(NAMES)}")
    return PRECISIONS[name]


def compute_capability_key(compute_capability: str) -> tuple[int, ...]:
    """ "8.9" -> (8, 9), "12.0" -> (12, 0): compute capabilities in order."""
    return tuple(int(part) for part in compute_capability.split("."))


def runnable_targets(name: str, backend: str, targets) -> tuple[str, ...]:
    """The compute capabilities among `targets` that a plan of precision `name` built by `backend` ("tensorrt_rtx",
    "tensorrt") may target: those from the row's least one on, all where it names none; "current" (the build GPU,
    unknown before the build) is kept and left to the builder."""
    least = PRECISIONS[name].min_compute_capability.get(backend)
    if least is None:
        return tuple(targets)
    return tuple(cc for cc in targets if cc == "current" or compute_capability_key(cc) >= compute_capability_key(least))


def compute_capability_problem(name: str, backend: str, targets) -> str | None:
    """Why no plan of precision `name` can be built by `backend` for any of `targets` (None where one can): the
    least compute capability and the GPUs that have it."""
    if runnable_targets(name, backend, targets):
        return None
    row = PRECISIONS[name]
    least = row.min_compute_capability[backend]
    return f"{name} plans need compute capability {least} or later with backend {backend} ({row.gpu_generations})"


def wildcard_pattern(*, calibrated_only: bool = False) -> str:
    """The Snakemake wildcard constraint of `{precision}`: exactly the table's names (`calibrated_only`: those of the
    quantized precisions, `{quantized}`)."""
    return "|".join(re.escape(name) for name, row in PRECISIONS.items() if row.calibrated or not calibrated_only)


def calibrated(names) -> bool:
    """Whether any of the precisions `names` needs calibration (the calibrate stage runs)."""
    return any(PRECISIONS[name].calibrated for name in names)


def features_graph(name: str, *, implicit: bool = False) -> str:
    """The features graph the engine of `name` is parsed from: with `implicit` (engine.int8_mode: implicit) a
    precision that TensorRT's implicit calibrator can build is parsed from the export instead of its Q/DQ graph."""
    row = PRECISIONS[name]
    return EXPORTED_GRAPH if implicit and row.implicit_calibration else row.features_graph
