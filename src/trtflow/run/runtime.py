"""Engine runner: a TensorRT or TensorRT-RTX plan on torch CUDA tensors (no pycuda).

One CUDA context is shared with PyTorch: I/O buffers are torch tensors, the plan runs with
`execute_async_v3` on a torch stream, the batch is set per call within the optimization profile,
and CUDA graphs are optional (TensorRT-RTX captures natively through its runtime config; full
TensorRT is captured with torch.cuda.graph around `execute_async_v3`).

Before touching TensorRT the runner reads the engine metadata JSON (`trtflow.formats.plan_metadata`, which
`trtflow.build.engine` writes next to the plan) and refuses, with every reason at once, a plan this machine
cannot run: no CUDA GPU, a GPU whose compute capability the plan does not target (a TensorRT-RTX plan
never runs on 9.0, Hopper), a plan of another backend or version than the one installed, plan bytes
that are not the ones the metadata describes, a missing RoIAlign plugin library. Those checks need no
TensorRT.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from trtflow.artifacts import files_sha256
from trtflow.backend import FLAVOUR_NAMES, INSTALL_COMMANDS, UNSUPPORTED_GPUS, installed_version, load_backend
from trtflow.backend.dtypes import TORCH_DTYPES
from trtflow.backend.roi_align_plugin import register_plugins
from trtflow.common.model import INPUT_NAME
from trtflow.formats.plan_metadata import PlanMetadata, metadata_path


class EngineRefused(RuntimeError):
    """This machine cannot run the plan; the message says why and what would."""


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "major.minor"


def visible_gpu() -> Gpu | None:
    """The current CUDA device, or None where torch sees no CUDA GPU."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return Gpu(torch.cuda.get_device_name(), f"{major}.{minor}")


def read_metadata(plan: str | Path) -> PlanMetadata:
    """The metadata beside `plan`; EngineRefused where there is none, PlanMetadataError where this trtflow cannot
    read it."""
    path = metadata_path(plan)
    if not path.is_file():
        raise EngineRefused(
            f"{path} not found: the runner needs the engine metadata written beside {plan}; "
            f"rebuild the plan (snakemake -f {plan})"
        )
    return PlanMetadata.read(path)


def refusals(
    metadata: PlanMetadata, gpu: Gpu | None, installed: Mapping[str, str | None], plan: str | Path | None = None
) -> list[str]:
    """Every reason this machine cannot run the plan that `metadata` describes; empty when it can.

    `installed` maps backend module name -> installed version (None: does not import).
    """
    backend, version = metadata.backend, metadata.backend_version
    built = f"{backend} {version}"
    reasons = []
    if gpu is None:
        reasons.append(
            "no CUDA GPU is visible (torch.cuda.is_available() is False); a TensorRT plan runs only on an NVIDIA GPU"
        )
    else:
        targets = [str(cc) for cc in metadata.compute_capabilities]
        unsupported = UNSUPPORTED_GPUS.get(backend, {}).get(gpu.compute_capability)
        if unsupported:
            reasons.append(
                f"{gpu.name} is compute capability {gpu.compute_capability} ({unsupported}), on which "
                f"{FLAVOUR_NAMES[backend]} plans do not run (this plan targets "
                f"{', '.join(targets) or 'none listed'}); build the engine with full TensorRT on this GPU "
                "(backend: tensorrt)"
            )
        elif gpu.compute_capability not in targets:
            reasons.append(
                f"the plan targets compute capabilities {targets} but {gpu.name} is "
                f"{gpu.compute_capability}; rebuild it for this GPU (engine.rtx.compute_capabilities, "
                "or build with full TensorRT on this machine)"
            )
    have = installed.get(backend)
    if have is None:
        reasons.append(
            f"the plan was built with {built} but `import {backend}` fails here; install that version "
            f"({INSTALL_COMMANDS.get(backend, backend)}=={version})"
        )
    elif have != version:
        reasons.append(
            f"the plan was built with {built} but {backend} {have} is installed; a plan runs only on the "
            f"version that built it: rebuild it here (snakemake -f {plan or 'results/engine_<precision>.plan'}) "
            f"or install {backend} {version}"
        )
    if plan is not None:
        if not Path(plan).is_file():
            reasons.append(f"{plan} does not exist; build it (snakemake {plan})")
        elif files_sha256(plan) != metadata.plan_sha256:
            reasons.append(
                f"{plan} is not the plan its metadata describes (sha256 differs); rebuild both (snakemake -f {plan})"
            )
    if metadata.roi_align == "plugin":
        library = (metadata.sources.get("plugin_library") or {}).get("path")
        if not library or not Path(library).is_file():
            reasons.append(
                f"the plan uses the MultiLevelRoIAlign plugin but its library {library} is missing; "
                "build it (snakemake results/plugins/libtrtflow_plugins.so)"
            )
    return reasons


def check_runnable(plan: str | Path, metadata: PlanMetadata) -> None:
    """Raise EngineRefused naming every reason the plan cannot run on this machine's GPU and backend."""
    installed = {metadata.backend: installed_version(metadata.backend)}
    reasons = refusals(metadata, visible_gpu(), installed, plan)
    if reasons:
        raise EngineRefused(
            f"cannot run {plan} ({metadata.backend} {metadata.backend_version}, {metadata.precision}): "
            + "; ".join(reasons)
        )


def torch_dtype(dtype) -> torch.dtype:
    if dtype.name not in TORCH_DTYPES:
        raise EngineRefused(f"engine tensor type {dtype.name} has no torch buffer type")
    return TORCH_DTYPES[dtype.name]


class EngineRunner:
    """A deserialized plan and one execution context; call it with a (B, 3, H, W) CUDA tensor.

    Batches outside the optimization profile's [min, max] run in chunks of at most max (a short last chunk
    padded to min). Returns the engine outputs by name, on the input's device.
    """

    def __init__(self, plan: str | Path, metadata: PlanMetadata | None = None, *, cuda_graph: bool = False):
        self.plan = Path(plan)
        self.metadata = metadata if metadata is not None else read_metadata(plan)
        check_runnable(self.plan, self.metadata)
        self.backend = load_backend(self.metadata.backend)
        trt = self.backend.trt
        if self.metadata.roi_align == "plugin":
            register_plugins(self.backend, self.metadata.sources["plugin_library"]["path"])
        self.runtime = trt.Runtime(self.backend.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:  # every check passed, so this is a fault, not a refusal: fail loudly
            raise RuntimeError(
                self.backend._with_errors(f"{self.backend.describe()} could not deserialize {self.plan}")
            )
        self.native_graphs = cuda_graph and hasattr(trt, "CudaGraphStrategy")
        self.cuda_graph = cuda_graph
        self.context = self._create_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if self.inputs != [INPUT_NAME]:
            raise EngineRefused(f"{self.plan} has inputs {self.inputs}; trtflow plans take one input '{INPUT_NAME}'")
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream()
        self.graphs: dict[int, tuple] = {}  # batch -> (CUDAGraph, input buffer, output buffers)

    def _create_context(self):
        """TensorRT-RTX captures CUDA graphs itself when its runtime config asks for it."""
        if not self.native_graphs:
            return self.engine.create_execution_context()
        trt = self.backend.trt
        config = self.engine.create_runtime_config()
        config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        return self.engine.create_execution_context(config)

    @property
    def batch_range(self) -> tuple[int, int]:
        shape = list(self.engine.get_tensor_shape(INPUT_NAME))
        if shape[0] >= 0:
            return shape[0], shape[0]
        low, _, high = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        return low[0], high[0]

    def describe(self) -> dict:
        return {
            "plan": str(self.plan),
            "backend": self.backend.describe(),
            "precision": self.metadata.precision,
            "gpu": torch.cuda.get_device_name(),
            "batch_range": list(self.batch_range),
            "cuda_graph": (
                "native (TensorRT-RTX runtime config)"
                if self.native_graphs
                else "torch.cuda.graph capture"
                if self.cuda_graph
                else False
            ),
        }

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not images.is_cuda:
            raise ValueError("EngineRunner takes CUDA tensors; move the batch with .cuda() first")
        low, high = self.batch_range
        parts = [self._run_padded(images[i : i + high], low) for i in range(0, len(images), high)]
        return {name: torch.cat([part[name] for part in parts]) for name in self.outputs}

    def _run_padded(self, images: torch.Tensor, low: int) -> dict[str, torch.Tensor]:
        count = len(images)
        if count < low:
            images = torch.cat([images, images.new_zeros(low - count, *images.shape[1:])])
        outputs = self._run(images.to(self.dtypes[INPUT_NAME]).contiguous())
        return {name: value[:count] for name, value in outputs.items()}

    def _bind(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Set the batch shape and every tensor address; outputs are fresh torch buffers on the caller's stream."""
        context = self.context
        if not context.set_input_shape(INPUT_NAME, tuple(images.shape)):
            raise RuntimeError(f"{self.plan}: input shape {tuple(images.shape)} is outside the optimization profile")
        context.set_tensor_address(INPUT_NAME, images.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=images.device)
            context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def _execute(self) -> None:
        """Enqueue on the runner's own stream: TensorRT adds synchronizations on the legacy default stream."""
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(self.backend._with_errors(f"{self.plan}: execute_async_v3 failed"))

    def _run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cuda_graph and not self.native_graphs:
            return self._replay(images)
        outputs = self._bind(images)
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)
        self._execute()
        caller.wait_stream(self.stream)
        for tensor in (images, *outputs.values()):
            tensor.record_stream(self.stream)  # the allocator must not reuse them before the engine is done
        return outputs

    def _replay(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full TensorRT: one graph per batch size over fixed buffers, replayed on the caller's stream;
        the outputs are copied out of them."""
        batch = len(images)
        if batch not in self.graphs:
            static_input = images.clone()
            static_outputs = self._bind(static_input)
            self.stream.wait_stream(torch.cuda.current_stream())
            self._execute()  # TensorRT updates its internal state on the first run, outside the capture
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    self._execute()
            except RuntimeError as error:
                raise RuntimeError(
                    f"{self.plan}: CUDA graph capture failed ({error}); run without cuda_graph"
                ) from error
            self.graphs[batch] = (graph, static_input, static_outputs)
        graph, static_input, static_outputs = self.graphs[batch]
        static_input.copy_(images)
        graph.replay()
        return {name: value.clone() for name, value in static_outputs.items()}
