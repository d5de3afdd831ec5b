"""TensorRT backends: the one place that knows which TensorRT is installed and what it can do.

`backend: auto | tensorrt | tensorrt_rtx` (config.yaml). Full TensorRT (10.x, 11.x) and
TensorRT-RTX share most of the Python API; what differs is gathered in `Capabilities`
and in the few `Backend` methods below, so the rest of trtflow never asks for a version.

Facts the capabilities encode (TensorRT / TensorRT-RTX documentation, and measured on
TensorRT-RTX 1.7 with no GPU):
- TensorRT-RTX builds ahead of time on a machine without a GPU, for chosen compute
  capabilities (default 8.0, 8.6, 8.9, 12.x; never 9.0); full TensorRT builds for the GPU
  it runs on.
- TensorRT-RTX has no `add_plugin_v3` (no custom plugins from Python), its INMSLayer and
  INonZeroLayer do not build, and it has no activation-INT8 kernels (Q/DQ is honoured
  numerically). Its timing-cache API is a deprecated no-op that forces a GPU query.
- TensorRT 11 and TensorRT-RTX networks are always strongly typed; TensorRT 10 needs the
  STRONGLY_TYPED creation flag (looked up by name: the enum values differ).
- Only TensorRT 10 keeps the implicit-quantization path (BuilderFlag.INT8 + a calibrator).
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Sequence

from trtflow.backend.implicit_int8 import cache_only_calibrator

BACKENDS = ("tensorrt", "tensorrt_rtx")
CHOICES = ("auto", *BACKENDS)

INSTALL_COMMANDS = {
    "tensorrt": "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13",
    "tensorrt_rtx": "pip install tensorrt-rtx-cu13",
}
# the command-line runner of each flavour (TensorRT-RTX's trtexec is called tensorrt_rtx)
COMMAND_LINE_RUNNERS = {"tensorrt": "trtexec", "tensorrt_rtx": "tensorrt_rtx"}
# compute capabilities on which a flavour's plans do not run, whatever targets the plan lists
UNSUPPORTED_GPUS = {"tensorrt_rtx": {"9.0": "Hopper"}}
FLAVOUR_NAMES = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}

log = logging.getLogger(__name__)


class BackendUnavailableError(ImportError):
    """No usable TensorRT module for the requested backend."""


class BuildError(RuntimeError):
    """TensorRT refused to parse or build; the message carries TensorRT's own errors."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can build. Each flag decides a config option or a code path."""

    python_plugins: bool  # custom plugin layers (our RoIAlign plugin, `roi_align: plugin`)
    cumulative_layer: bool  # INetworkDefinition.add_cumulative (TensorRT >= 10.8): the plugin's RoI image index
    plugin_aot: bool  # decorator plugins with an ahead-of-time kernel: the plan runs without Python
    nms_layer: bool  # INMSLayer builds (`nms: builtin_layer`)
    int8_kernels: bool  # Q/DQ convolutions run as INT8 kernels, not only simulated
    implicit_calibrator: bool  # BuilderFlag.INT8 + IInt8EntropyCalibrator2 (`int8_mode: implicit`)
    timing_cache: bool  # the builder reads and writes a timing cache
    compute_capability_targets: bool  # builds for chosen GPUs without one present (CPU AOT)


class _CollectingLogger:
    """A TensorRT ILogger that forwards to `logging` and keeps recent errors for exceptions."""

    def __new__(cls, trt: ModuleType):
        severity = trt.ILogger.Severity
        levels = {
            severity.INTERNAL_ERROR: logging.CRITICAL,
            severity.ERROR: logging.ERROR,
            severity.WARNING: logging.WARNING,
            severity.INFO: logging.DEBUG,
            severity.VERBOSE: logging.DEBUG,
        }

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: deque[str] = deque(maxlen=20)

            def log(self, level, msg):
                log.log(levels.get(level, logging.INFO), "%s", msg)
                if level in (severity.ERROR, severity.INTERNAL_ERROR):
                    self.errors.append(msg)

        return Logger()


class _BuildProgress:
    """A TensorRT IProgressMonitor: a progress bar over the build's top-level steps, and each phase
    one level below it logged with its duration, so a long build shows where it is."""

    def __new__(cls, trt: ModuleType):
        from tqdm import tqdm

        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)
                self.lock = threading.Lock()  # TensorRT calls from its own threads
                self.depth, self.started, self.bars = {}, {}, {}

            def phase_start(self, phase_name, parent_phase, num_steps):
                with self.lock:
                    depth = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
                    self.depth[phase_name], self.started[phase_name] = depth, time.perf_counter()
                    if depth == 0:
                        self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, unit="step")
                    elif depth == 1:
                        log.info("%s: %s (%d steps)", parent_phase, phase_name, num_steps)

            def step_complete(self, phase_name, step):
                with self.lock:
                    bar = self.bars.get(phase_name)
                    if bar is not None:
                        bar.update(step + 1 - bar.n)
                return True  # never cancel the build

            def phase_finish(self, phase_name):
                with self.lock:
                    seconds = time.perf_counter() - self.started.pop(phase_name, time.perf_counter())
                    bar = self.bars.pop(phase_name, None)
                    if bar is not None:
                        bar.close()
                    if self.depth.pop(phase_name, 0) <= 1:
                        log.info("%s done in %.1f s", phase_name, seconds)

        return Monitor()


@dataclass(frozen=True, eq=False)
class Backend:
    """An imported TensorRT flavour: its module, version and capabilities."""

    name: str
    trt: ModuleType
    version: str
    capabilities: Capabilities
    logger: object
    progress: object = None  # IProgressMonitor given to every build; it must outlive them

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def describe(self) -> str:
        return f"{self.name} {self.version}"

    # -- builder and network ------------------------------------------------------------

    def create_builder(self):
        try:
            builder = self.trt.Builder(self.logger)
        except (RuntimeError, TypeError) as error:
            raise BuildError(self._with_errors(f"{self.describe()} could not create a builder: {error}")) from error
        if builder is None:
            raise BuildError(self._with_errors(f"{self.describe()} could not create a builder"))
        return builder

    def create_network(self, builder, strongly_typed: bool = True):
        """A network definition; strongly typed unless the TensorRT-10 implicit INT8 path needs weak typing."""
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly_typed:
            flags = 0 if flag is None else 1 << int(flag)
        elif self.capabilities.implicit_calibrator:
            flags = 0
        else:
            raise ValueError(f"{self.describe()} builds strongly typed networks only")
        return builder.create_network(flags)

    def parse_onnx(self, network, model: bytes, source: str):
        """Parse into `network`; returns the parser, which owns the weights: keep it until the build is done."""
        parser = self.trt.OnnxParser(network, self.logger)
        if not parser.parse(model):
            errors = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
            raise BuildError(f"{self.describe()} could not parse {source}:\n{errors}")
        return parser

    # -- builder config -----------------------------------------------------------------

    def create_config(
        self,
        builder,
        *,
        workspace_mb: int,
        opt_level: int,
        profile_shapes: dict[str, tuple[Sequence[int], Sequence[int], Sequence[int]]],
        compute_capabilities: Sequence[str] = (),
        tf32: bool,
    ):
        """Builder config: workspace limit, optimization level, TF32, the batch profile of dynamic inputs, GPU
        targets."""
        trt = self.trt
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
        config.builder_optimization_level = int(opt_level)
        # TensorRT enables TF32 by default: float32 convolutions and matrix products may then round their inputs to
        # 10 mantissa bits, which the network definition (float32 tensors) does not say and verify's
        # network-definition level cannot see. Off unless asked for (engine.tf32), as Polygraphy builds.
        if not tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        # DETAILED keeps layer types and precisions in the plan for the engine inspector.
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if profile_shapes:
            config.add_optimization_profile(_profile(builder, profile_shapes))
        if compute_capabilities:
            self._set_compute_capabilities(config, compute_capabilities)
        if self.progress is not None:
            config.progress_monitor = self.progress
        return config

    def compute_capability_names(self) -> dict[str, str]:
        """Config spelling ("8.6", "current") -> ComputeCapability member name, for this backend."""
        if not self.capabilities.compute_capability_targets:
            return {}
        names = {"current": "CURRENT"}
        for member in self.trt.ComputeCapability.__members__:
            if member.startswith("SM"):
                digits = member[2:]
                names[f"{digits[:-1]}.{digits[-1]}"] = member
        return names

    def default_compute_capabilities(self) -> list[str]:
        """The GPUs a plan built without explicit targets runs on (TensorRT-RTX: Ampere and later)."""
        return [cc for cc in self.compute_capability_names() if cc != "current" and float(cc) >= 8.0]

    def _set_compute_capabilities(self, config, compute_capabilities: Sequence[str]) -> None:
        names = self.compute_capability_names()
        unknown = [cc for cc in compute_capabilities if str(cc) not in names]
        if unknown or ("current" in compute_capabilities and len(compute_capabilities) > 1):
            raise ValueError(
                f"engine.rtx.compute_capabilities = {list(compute_capabilities)}: use one or more of "
                f"{sorted(set(names) - {'current'})}, or [current] alone"
            )
        config.num_compute_capabilities = len(compute_capabilities)
        for index, cc in enumerate(compute_capabilities):
            member = getattr(self.trt.ComputeCapability, names[str(cc)])
            if not config.set_compute_capability(member, index):
                raise BuildError(self._with_errors(f"{self.describe()} refused compute capability {cc}"))

    # -- timing cache (full TensorRT only) -------------------------------------------------

    def load_timing_cache(self, config, blob: bytes) -> None:
        """Seed the build with `blob`; a cache from another TensorRT version or GPU, or a corrupt one,
        is set aside, not fatal (TensorRT may refuse it by returning False or by raising)."""
        cache = self._timing_cache(config, blob)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("the timing cache on disk does not match %s; starting a fresh cache", self.describe())
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    def merged_timing_cache(self, config, stored: bytes | None) -> bytes:
        """This build's timing cache combined with what another build stored meanwhile."""
        cache = config.get_timing_cache()
        other = self._timing_cache(config, stored) if stored else None
        if stored and (other is None or not self._combined(cache, other)):
            log.warning("the timing cache on disk does not match %s; it is replaced", self.describe())
        return bytes(cache.serialize())

    def _timing_cache(self, config, blob: bytes):
        """config.create_timing_cache(blob), or None where TensorRT refuses the bytes."""
        try:
            return config.create_timing_cache(blob)
        except (RuntimeError, TypeError, ValueError) as error:
            log.warning("%s could not read the timing cache (%s)", self.describe(), error)
            return None

    @staticmethod
    def _combined(cache, other) -> bool:
        try:
            return bool(cache.combine(other, False))
        except (RuntimeError, TypeError, ValueError) as error:
            log.warning("combining timing caches failed (%s)", error)
            return False

    # -- INT8 -----------------------------------------------------------------------------

    def enable_implicit_int8(self, builder, config, calibration_table: Path, profile_shapes, batch_size: int):
        """TensorRT 10 implicit quantization from our calibration table; returns the calibrator to keep alive.

        Only where `capabilities.implicit_calibrator` (EngineSettings.check_backend refuses the rest).
        """
        trt = self.trt
        calibrator = cache_only_calibrator(
            trt, calibration_table.read_bytes(), batch_size=batch_size, source=str(calibration_table)
        )
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
        config.int8_calibrator = calibrator
        if profile_shapes:  # dynamic shapes need a calibration profile even when no batch is ever fed
            config.set_calibration_profile(_profile(builder, profile_shapes))
        return calibrator

    # -- build ----------------------------------------------------------------------------

    def build(self, builder, network, config) -> bytes:
        self.logger.errors.clear()
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BuildError(self._with_errors(f"{self.describe()} failed to build the engine"))
        return bytes(plan)

    def deserialize(self, plan: bytes):
        """The engine, where this machine can run it (a GPU the plan targets); otherwise None."""
        try:
            runtime = self.trt.Runtime(self.logger)
            return runtime.deserialize_cuda_engine(plan)
        except (RuntimeError, TypeError):
            return None

    def _with_errors(self, message: str) -> str:
        errors = list(self.logger.errors)
        return message + ("; TensorRT said:\n  " + "\n  ".join(errors) if errors else "")


def _profile(builder, profile_shapes):
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes.items():
        profile.set_shape(name, tuple(low), tuple(opt), tuple(high))
    return profile


def _capabilities(name: str, trt: ModuleType) -> Capabilities:
    version = tuple(int(part) for part in trt.__version__.split(".")[:2])
    full = name == "tensorrt"
    return Capabilities(
        python_plugins=hasattr(trt.INetworkDefinition, "add_plugin_v3"),
        cumulative_layer=hasattr(trt.INetworkDefinition, "add_cumulative"),
        plugin_aot=full and version >= (10, 9),
        nms_layer=full,
        int8_kernels=full,
        implicit_calibrator=hasattr(trt, "IInt8EntropyCalibrator2") and hasattr(trt.BuilderFlag, "INT8"),
        timing_cache=full,
        compute_capability_targets=hasattr(trt, "ComputeCapability"),
    )


def installed_version(name: str) -> str | None:
    """`__version__` of a flavour's Python module (tensorrt / tensorrt_rtx), None where it does not import."""
    module = _import(name)
    return module.__version__ if module is not None else None


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _unavailable(requested: str) -> BackendUnavailableError:
    wanted = BACKENDS if requested == "auto" else (requested,)
    # one line, as every error the console shows (README, Troubleshooting)
    commands = "; ".join(f"{name}: {INSTALL_COMMANDS[name]}" for name in wanted)
    return BackendUnavailableError(
        f"backend: {requested} -- no TensorRT Python module imports ({', '.join(wanted)}); install one ({commands}). "
        "TensorRT-RTX builds engines on a CPU (ahead of time); full TensorRT needs a CUDA GPU to build."
    )


@functools.cache
def load_backend(requested: str = "auto") -> Backend:
    """The backend for config's `backend:`; `auto` prefers full TensorRT, then TensorRT-RTX."""
    if requested not in CHOICES:
        raise ValueError(f"backend: {requested!r} is not supported; use one of {', '.join(CHOICES)} (config.yaml)")
    for name in BACKENDS if requested == "auto" else (requested,):
        trt = _import(name)
        if trt is not None:
            return Backend(
                name=name,
                trt=trt,
                version=trt.__version__,
                capabilities=_capabilities(name, trt),
                logger=_CollectingLogger(trt),
                progress=_BuildProgress(trt) if hasattr(trt, "IProgressMonitor") else None,
            )
    raise _unavailable(requested)


__all__ = [
    "BACKENDS",
    "CHOICES",
    "COMMAND_LINE_RUNNERS",
    "FLAVOUR_NAMES",
    "INSTALL_COMMANDS",
    "UNSUPPORTED_GPUS",
    "Backend",
    "BackendUnavailableError",
    "BuildError",
    "Capabilities",
    "installed_version",
    "load_backend",
]
