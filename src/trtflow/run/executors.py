"""Executors: the `detect` callables that verification and benchmarks plug into
`trtflow.run.detection_loop.detect_dataset`, each carrying its name and exactly what it runs.

- ``pytorch``: torchvision's own detector, eager (the reference).
- ``pytorch+static-head``: the deployment form in PyTorch: the features network (backbone, FPN, RPN head
  convolutions) + `trtflow.common.head.StaticHead`, on one device, fp32 or fp16, optionally in CUDA graphs.
- ``onnxruntime+static-head``: ONNX Runtime runs features.onnx (or the Q/DQ features.qdq.onnx), the
  StaticHead finishes detection from its outputs by name. The executor wherever no engine can run.
- ``tensorrt``: a plan through `trtflow.run.runtime.EngineRunner`.
- ``tensorrt-network``: the network definition the plan was built from (its record beside the plan),
  evaluated layer by layer by `trtflow.run.netexec` on the CPU or any torch device.

`detect(batch: np.ndarray (B, 3, H, W) float32) -> [(boxes, scores, classes)]` per image, in input
pixels; head outputs are cut at `num_detections`. What no head can give (more detections than rows here; labels
outside the model's classes and non-finite boxes or scores, checked by `check_detections` in the detection loop)
raises `trtflow.run.detection_loop.ImpossibleOutput`, which verify turns into a failed verdict and `trtflow detect` into a refusal.
Nothing substitutes one executor for another: a constructor that cannot build what it was asked for raises, and
`details` records what really runs (device, dtypes, ONNX Runtime's active providers, CUDA graph mode).

Which of them can run a plan here is `choose_executor`'s answer, the one ladder verify and `trtflow detect` ask (bench
times the executors it is given by name; the report shows the levels); each rung is a level (`trtflow.run.levels`)
of what a run there proves, strongest first:
- ``engine``: the plan ran (`trtflow.run.runtime`, a GPU it was built for);
- ``network-definition``: the exact TensorRT network the plan was built from, evaluated layer by layer
  (`trtflow.run.netexec`, from the record beside the plan): what remains unverified is TensorRT's own
  compilation of that network;
- ``deployment-form``: only the algorithm's twin (ONNX Runtime + StaticHead, the engine's inputs and head
  dtype): neither the plan nor the TensorRT network ran.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from trtflow.backend.dtypes import HEAD_DTYPES, TORCH_DTYPES
from trtflow.common.head import HEAD_OUTPUTS, StaticHead, head_dtype
from trtflow.common.model import FeaturesNetwork, output_names, run_detector
from trtflow.common.onnxrun import OnnxSession
from trtflow.formats.head_weights import load_head
from trtflow.formats.network_record import NetworkRecord
from trtflow.formats.plan_metadata import PlanMetadata
from trtflow.precisions import PRECISIONS
from trtflow.run.detection_loop import ImpossibleOutput
from trtflow.run.levels import LEVELS, UNVERIFIED
from trtflow.run.netexec import NetworkExecutionError, NetworkExecutor
from trtflow.run.runtime import EngineRefused, EngineRunner

log = logging.getLogger(__name__)

CUDA_GRAPH_MODES = ("none", "features", "whole")


@dataclass(frozen=True)
class Executor:
    """A named `detect` callable; `details` says what exactly it runs."""

    name: str
    detect: Callable[[np.ndarray], list]
    details: Mapping = field(default_factory=dict)

    def __call__(self, batch: np.ndarray) -> list:
        return self.detect(batch)

    def describe(self) -> dict:
        return {"executor": self.name, **self.details}

    def with_note(self, note: str | None) -> Executor:
        """The same executor, its details saying `note` (where it runs otherwise than asked, and why)."""
        return self if note is None else replace(self, details={**self.details, "note": note})


class CaptureError(RuntimeError):
    """A computation cannot be captured into a CUDA graph (host syncs, data-dependent shapes ...)."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def head_detections(outputs: Mapping) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Head outputs (num_detections, boxes, scores, classes; zero-padded) -> per image the first
    num_detections (boxes, scores, classes) as numpy; ImpossibleOutput where an image declares more
    detections than the outputs have rows (or fewer than none)."""
    arrays = {
        name: np.asarray(outputs[name].cpu() if isinstance(outputs[name], torch.Tensor) else outputs[name])
        for name in HEAD_OUTPUTS
    }
    rows = arrays["scores"].shape[1]
    for position, declared in enumerate(arrays["num_detections"].tolist()):
        if not 0 <= declared <= rows:
            expected = f"0..{rows} (the rows of boxes, scores and classes)"
            raise ImpossibleOutput(position, "num_detections", declared, expected)
    return [
        (arrays["boxes"][i, :n], arrays["scores"][i, :n], arrays["classes"][i, :n])
        for i, n in enumerate(arrays["num_detections"].astype(int))
    ]


# --------------------------------------------------------------------------- CUDA graphs


def capture_cuda_graph(fn: Callable, example: torch.Tensor, warmup: int = 3) -> Callable[[torch.Tensor], object]:
    """`fn` captured once into a CUDA graph over a static copy of `example`; the returned callable copies
    its input in and replays. Its outputs are the graph's static tensors: overwritten by the next call."""
    static_input = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph requires
        for _ in range(warmup):
            fn(static_input)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static_output = fn(static_input)
    except Exception as error:  # torch raises RuntimeError or AcceleratorError, with the CUDA reason
        torch.cuda.synchronize()
        what = getattr(fn, "__qualname__", None) or type(fn).__name__
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise CaptureError(f"{what} cannot be captured into a CUDA graph: {reason}") from error

    def replay(images: torch.Tensor):
        static_input.copy_(images)
        graph.replay()
        return static_output

    return replay


class GraphPerShape:
    """`fn` through one CUDA graph per input shape, captured at the first call with that shape."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.graphs: dict[tuple, Callable] = {}

    def __call__(self, images: torch.Tensor):
        key = (tuple(images.shape), images.dtype)
        if key not in self.graphs:
            self.graphs[key] = capture_cuda_graph(self.fn, images)
        return self.graphs[key](images)


# --------------------------------------------------------------------------- torchvision


def pytorch_executor(model, *, dtype: str = "float32") -> Executor:
    """torchvision's detector, eager, on the model's device; float16 runs under CUDA autocast."""
    device = next(model.parameters()).device
    if dtype == "float16" and device.type != "cuda":
        raise ValueError("pytorch float16 runs under CUDA autocast; on the CPU use dtype float32")

    @torch.no_grad()
    def detect(batch: np.ndarray):
        images = torch.from_numpy(batch).to(device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=dtype == "float16"):
            outputs = run_detector(model, images)
        return [
            (o["boxes"].float().cpu().numpy(), o["scores"].float().cpu().numpy(), o["labels"].cpu().numpy())
            for o in outputs
        ]

    return Executor("pytorch", detect, {"device": str(device), "dtype": dtype, "autocast": dtype == "float16"})


# --------------------------------------------------------------------------- the deployment form


class DeploymentForm(nn.Module):
    """The network the engine builds, in PyTorch: the features network (backbone + FPN + RPN head
    convolutions, as exported to ONNX) in `dtype`, then the StaticHead in `dtype`.

    The features are a copy when `dtype` is not float32, so the caller's model is left as it was.
    """

    def __init__(self, model, manifest: Mapping, tensors: Mapping, dtype: torch.dtype = torch.float32):
        super().__init__()
        features = FeaturesNetwork(model).eval()
        self.features = features if dtype == torch.float32 else copy.deepcopy(features).to(dtype)
        self.dtype = dtype
        self.names = output_names([level["name"] for level in manifest["features"]])
        self.head = StaticHead(manifest, tensors, dtype)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features-network outputs by their ONNX names (p2 ..., objectness_p2 ..., deltas_p2 ...)."""
        return dict(zip(self.names, self.features(images.to(self.dtype))))

    def detect(self, maps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.head(maps, maps, maps)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.detect(self.extract(images))


def pytorch_static_head_executor(
    model,
    manifest: Mapping,
    tensors: Mapping,
    *,
    dtype: str = "float32",
    device: str | torch.device | None = None,
    cuda_graph: str = "none",
) -> Executor:
    """The deployment form on one device. `cuda_graph`: none | features (the features network replayed from
    a CUDA graph, the head eager) | whole (features and head in one graph). A computation that cannot be
    captured raises CaptureError at its first batch, it never falls back to eager."""
    if cuda_graph not in CUDA_GRAPH_MODES:
        raise ValueError(f"cuda_graph = {cuda_graph!r}: use one of {', '.join(CUDA_GRAPH_MODES)}")
    device = torch.device(device) if device is not None else default_device()
    if cuda_graph != "none" and device.type != "cuda":
        raise ValueError(f"cuda_graph = {cuda_graph!r} needs a CUDA device, got {device}")
    form = DeploymentForm(model, manifest, tensors, TORCH_DTYPES[HEAD_DTYPES[dtype]]).to(device).eval()
    if cuda_graph == "whole":
        run = GraphPerShape(form)
    elif cuda_graph == "features":
        extract = GraphPerShape(form.extract)
        run = lambda images: form.detect(extract(images))  # noqa: E731
    else:
        run = form

    @torch.no_grad()
    def detect(batch: np.ndarray):
        return head_detections(run(torch.from_numpy(batch).to(device)))

    return Executor(
        "pytorch+static-head",
        detect,
        {"device": str(device), "dtype": dtype, "head_dtype": dtype, "cuda_graph": cuda_graph},
    )


# --------------------------------------------------------------------------- ONNX Runtime + the head


def onnxruntime_providers() -> list[str]:
    """CUDA execution provider where ONNX Runtime has it and a GPU is visible, else the CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnxruntime_static_head_executor(
    onnx_path: str | Path | onnx.ModelProto,
    manifest: Mapping,
    tensors: Mapping,
    *,
    head_dtype: str = "float32",
    device: str | torch.device | None = None,
    providers: list[str] | None = None,
    threads: int | None = None,
) -> Executor:
    """ONNX Runtime runs the features graph (a file, or a graph in memory: the sensitivity stage's variants); the
    StaticHead (on `device`, default the GPU where there is one) finishes detection from its outputs by name."""
    session = OnnxSession(onnx_path, providers=providers or onnxruntime_providers(), threads=threads)
    device = torch.device(device) if device is not None else default_device()
    head = StaticHead(manifest, tensors, TORCH_DTYPES[HEAD_DTYPES[head_dtype]]).to(device).eval()

    @torch.no_grad()
    def detect(batch: np.ndarray):
        maps = {name: torch.from_numpy(value).to(device) for name, value in session(batch).items()}
        return head_detections(head(maps, maps, maps))

    return Executor(
        "onnxruntime+static-head",
        detect,
        {
            "onnx": str(onnx_path) if not isinstance(onnx_path, onnx.ModelProto) else "in memory",
            "providers": session.providers,
            "head_device": str(device),
            "head_dtype": head_dtype,
        },
    )


# --------------------------------------------------------------------------- TensorRT


def tensorrt_executor(plan: str | Path, metadata: PlanMetadata | None = None, *, cuda_graph: bool = False) -> Executor:
    """A plan through trtflow.run.runtime.EngineRunner; raises EngineRefused where this machine cannot run it."""
    runner = EngineRunner(plan, metadata, cuda_graph=cuda_graph)

    @torch.no_grad()
    def detect(batch: np.ndarray):
        return head_detections(runner(torch.from_numpy(batch).cuda()))

    return Executor("tensorrt", detect, runner.describe())


# --------------------------------------------------------------------------- the network definition


def network_definition_executor(record: str | Path, *, device: str | torch.device | None = None) -> Executor:
    """The TensorRT network definition recorded at build time, evaluated by trtflow.run.netexec on `device` (default:
    the GPU where there is one, so a Hopper GPU verifies a TensorRT-RTX plan's network fast). A static batch
    is fed in chunks of its size (a short last chunk padded with copies of its last image, whose results are
    dropped); raises NetworkExecutionError where the network holds a layer netexec does not implement, or a layer
    mode it refuses: the network is evaluated once on a zero batch here (where its image size is fixed), so that
    such a network makes the ladder fall back, rather than fail verification halfway."""
    network = NetworkExecutor(NetworkRecord.load(record), device or default_device())
    ((name, shape),) = network.input_shapes.items()
    chunk = shape[0] if shape[0] > 0 else None
    if all(size > 0 for size in shape[1:]):
        network({name: torch.zeros(chunk or 1, *shape[1:])})

    def detect(batch: np.ndarray):
        images = torch.from_numpy(batch)
        chunks = []
        for start in range(0, len(images), chunk or len(images)):
            part = images[start : start + chunk] if chunk else images
            if chunk and len(part) < chunk:
                part = torch.cat([part, part[-1:].expand(chunk - len(part), *part.shape[1:])])
            chunks.append(network({name: part}))
        # one read of the whole batch, so that an impossible output names its position in `batch`
        outputs = {output: torch.cat([found[output] for found in chunks])[: len(images)] for output in HEAD_OUTPUTS}
        return head_detections(outputs)

    return Executor(
        "tensorrt-network",
        detect,
        {
            "record": str(record),
            "device": str(network.device),
            "built_by": network.record.source,
            "layers": len(network.record.layers),
        },
    )


# --------------------------------------------------------------------------- which one runs a plan here


def float16_runs_on(device: torch.device) -> str | None:
    """None where float16 matmul and convolution run on `device`, else the error that says why not."""
    try:
        x = torch.ones(1, 2, 4, 4, dtype=torch.float16, device=device)
        torch.nn.functional.conv2d(x, torch.ones(2, 2, 1, 1, dtype=torch.float16, device=device))
        x.flatten(1) @ torch.ones(32, 2, dtype=torch.float16, device=device)
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return None


def deployment_executor(
    precision: str, onnx: str | Path, weights_dir: str | Path, *, device: str | torch.device | None = None
) -> Executor:
    """The deployment-form reference as the engine of `precision` is built: `onnx` is features.onnx for fp32
    and fp16, features.qdq.onnx for int8; the head runs float32 for fp32, float16 otherwise. Where the
    head's device cannot run float16 it runs float32 and `details["note"]` says so."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    device = torch.device(device) if device is not None else default_device()
    dtype, note = head_dtype(precision), None
    if dtype == "float16" and (problem := float16_runs_on(device)):
        dtype, note = "float32", f"float16 head does not run on {device} ({problem}): head ran in float32"
    manifest, tensors = load_head(weights_dir)
    return onnxruntime_static_head_executor(onnx, manifest, tensors, head_dtype=dtype, device=device).with_note(note)


@dataclass(frozen=True)
class ExecutorChoice:
    """The strongest executor that runs a plan here, the level (`LEVELS`) that proves, and why no stronger one ran."""

    executor: Executor
    level: str
    reasons: tuple[str, ...] = ()

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"level {self.level!r}: use one of {', '.join(LEVELS)}")

    def status(self) -> dict:
        """What a result says of what ran: its level, what that leaves unverified, why nothing stronger ran."""
        status = {"verified_level": self.level, "engine_executed": self.level == "engine"}
        status["unverified"] = UNVERIFIED[self.level]
        return status | ({"reason": "; ".join(self.reasons)} if self.reasons else {})


def choose_executor(
    precision: str,
    plan: str | Path,
    *,
    network: str | Path | None = None,
    onnx: str | Path | None = None,
    weights_dir: str | Path | None = None,
    cuda_graph: bool = False,
    fallback: bool = True,
) -> ExecutorChoice:
    """The strongest executor this machine can run for `plan`: the engine, else the recorded network definition
    (`network`, the record beside the plan), else the deployment-form reference (`onnx` and `weights_dir`, the
    files the plan was built from). Without `fallback` only the engine: its EngineRefused says why not."""
    try:
        return ExecutorChoice(tensorrt_executor(plan, cuda_graph=cuda_graph), "engine")
    except EngineRefused as refused:
        if not fallback:
            raise
        reasons = [str(refused)]
    if network is not None:
        try:
            executor = network_definition_executor(network)
            log.warning("%s; running the TensorRT network definition instead", reasons[0])
            return ExecutorChoice(executor, "network-definition", tuple(reasons))
        except (NetworkExecutionError, FileNotFoundError) as error:
            reasons.append(f"the network definition cannot be evaluated: {error}")
    if onnx is None or weights_dir is None:
        raise ValueError(  # the reasons say why neither stronger rung ran: the deployment form is the last one
            f"{plan}: {'; '.join(reasons)}; the deployment-form fallback needs the features ONNX and head weights it "
            "was built from; pass onnx= and weights_dir="
        )
    log.warning("%s; running the deployment-form reference instead", "; ".join(reasons))
    return ExecutorChoice(deployment_executor(precision, onnx, weights_dir), "deployment-form", tuple(reasons))
