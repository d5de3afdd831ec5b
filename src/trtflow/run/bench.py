"""Stage `bench`: latency and throughput of every available executor for one precision.

Each executor is timed end to end as `detect` sees it (a preprocessed host batch in, per-image
detections on the host out, so GPU executors are synchronized by their copy back), on real val
images tiled to each configured batch size, after warm-up. An executor that cannot run here is listed
with the reason instead of numbers; nothing stands in for it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from trtflow.artifacts import software_versions, write_json
from trtflow.common.preprocess import preprocess_split
from trtflow.formats.head_weights import load_head
from trtflow.precisions import PRECISIONS
from trtflow.run.executors import (
    CaptureError,
    Executor,
    default_device,
    deployment_executor,
    pytorch_executor,
    pytorch_static_head_executor,
    tensorrt_executor,
)
from trtflow.run.runtime import EngineRefused

EXECUTORS = ("tensorrt", "onnxruntime+static-head", "pytorch", "pytorch+static-head")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """The machine the numbers belong to."""
    import onnxruntime

    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def bench_settings(settings: Mapping) -> dict:
    """config `bench:` for this machine: its `cpu:` overrides apply where no CUDA GPU is visible."""
    chosen = {key: value for key, value in settings.items() if key != "cpu"}
    if not torch.cuda.is_available():
        chosen.update(settings.get("cpu", {}))
    return chosen


def latency_stats(seconds: list[float], batch_size: int) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "iterations": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "throughput_ips": float(batch_size * len(ms) / (ms.sum() / 1e3)),
    }


def time_detect(detect: Callable[[np.ndarray], list], batch: np.ndarray, *, warmup: int, iterations: int) -> dict:
    """Latency statistics of `detect(batch)` over `iterations` calls after `warmup` calls."""
    for _ in range(warmup):
        detect(batch)
    seconds = []
    for _ in range(iterations):
        started = time.perf_counter()
        detect(batch)
        seconds.append(time.perf_counter() - started)
    return latency_stats(seconds, len(batch))


def tiled_batch(images: np.ndarray, batch_size: int) -> np.ndarray:
    """`batch_size` images taken cyclically from `images` (B, 3, H, W)."""
    return np.ascontiguousarray(images[np.arange(batch_size) % len(images)])


def torch_dtype_for(precision: str) -> tuple[str, str | None]:
    """The PyTorch executors' dtype for a precision: its row's bench_dtype on a CUDA GPU (a quantized precision has
    no PyTorch path here: the engine's head dtype stands in); float32 on the CPU. With a note when it differs."""
    row = PRECISIONS[precision]
    if row.bench_dtype == "float32":
        return "float32", None
    if not torch.cuda.is_available():
        return "float32", f"{precision}: PyTorch {row.bench_dtype} needs a CUDA GPU; ran float32"
    if row.quantized:
        return row.bench_dtype, f"{precision}: no PyTorch {row.quantized.name.upper()} path; ran {row.bench_dtype}"
    return row.bench_dtype, None


def bench_executors(
    precision: str, names, *, plan, onnx, weights_dir, model, cuda_graph: bool
) -> list[Executor | dict]:
    """The executors `names` asks for, built for this precision; a dict {"executor", "skipped"} for each that
    cannot run here."""
    unknown = [name for name in names if name not in EXECUTORS]
    if unknown:
        raise ValueError(f"bench.executors {unknown}: use names from {list(EXECUTORS)}")
    dtype, note = torch_dtype_for(precision)
    graphs = cuda_graph and torch.cuda.is_available()
    found: list[Executor | dict] = []
    for name in names:
        if name == "tensorrt":
            try:
                found += [
                    tensorrt_executor(plan, cuda_graph=graph) for graph in ((False, True) if graphs else (False,))
                ]
            except EngineRefused as refused:
                found.append({"executor": name, "skipped": str(refused)})
        elif name == "onnxruntime+static-head":
            found.append(deployment_executor(precision, onnx, weights_dir))
        elif name == "pytorch":
            found.append(pytorch_executor(model, dtype=dtype).with_note(note))
        else:
            manifest, tensors = load_head(weights_dir)
            modes = ("none", "features", "whole") if graphs else ("none",)
            found += [
                pytorch_static_head_executor(model, manifest, tensors, dtype=dtype, cuda_graph=mode).with_note(note)
                for mode in modes
            ]
    return found


def benchmark(
    executors: list[Executor | dict], images: np.ndarray, *, batch_sizes, warmup: int, iterations: int
) -> list[dict]:
    """One entry per executor and batch size: its description and latency statistics, or why it was skipped."""
    results = []
    for executor in executors:
        if isinstance(executor, dict):
            results.append(executor)
            continue
        for batch_size in batch_sizes:
            entry = {**executor.describe(), "batch_size": batch_size}
            try:
                entry.update(
                    time_detect(executor, tiled_batch(images, batch_size), warmup=warmup, iterations=iterations)
                )
            except CaptureError as error:
                entry["skipped"] = str(error)
            results.append(entry)
    return results


def run_bench(
    precision: str, *, plan, onnx, weights_dir, model, val_json, preprocess: dict, settings: Mapping, out_json
) -> dict:
    """Rule `bench`: results/bench/{precision}.json. `onnx` is the features graph of the precision (as for
    verify); `settings` is config `bench:`."""
    settings = bench_settings(settings)
    model = model.to(default_device()).eval()
    executors = bench_executors(
        precision,
        settings["executors"],
        plan=plan,
        onnx=onnx,
        weights_dir=weights_dir,
        model=model,
        cuda_graph=settings.get("cuda_graph", False),
    )
    images = preprocess_split(val_json, preprocess, max(settings["batch_sizes"]))
    document = {
        "precision": precision,
        "hardware": hardware(),
        "input": list(images.shape[1:]),
        "batch_sizes": list(settings["batch_sizes"]),
        "warmup": settings["warmup"],
        "iterations": settings["iterations"],
        "timing": "end to end per detect call: host batch in, per-image detections on the host out",
        "results": benchmark(
            executors,
            images,
            batch_sizes=settings["batch_sizes"],
            warmup=settings["warmup"],
            iterations=settings["iterations"],
        ),
        "software": software_versions(),
    }
    print(json.dumps(document, indent=2))
    write_json(out_json, document)
    return document
