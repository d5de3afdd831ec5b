"""torchvision eager Faster R-CNN vs the deployment form in PyTorch (features network + trtflow.common.head.StaticHead).

The deployment form is the network the TensorRT engine builds: torchvision's backbone, FPN and RPN head
convolutions, then the static-shape head (fixed budgets, masks instead of compaction, greedy NMS from
matrix iterations, RoIAlign from gathers). This measures what that form costs or saves in PyTorch itself,
in fp32, fp16, and with CUDA graphs where the computation captures.

    PYTHONPATH=src python3 benchmarks/bench_deployment_head.py --out results/bench_deployment_head.json
    PYTHONPATH=src python3 benchmarks/bench_deployment_head.py --device cpu --size 128x160 --iters 3   # smoke test

Model: fasterrcnn_resnet50_fpn, random init (weights=None, weights_backbone=None, 91 classes), eval mode,
torchvision's test-time budgets. Input: one seeded random batch of the given size, already normalized.
GPU timing: CUDA events around each call, after warm-up; median (and p10/p90) over the iterations.
The `dets` column counts each variant's detections on that batch: torchvision's work shrinks with fewer
survivors, while the static head always does its full fixed-budget work.
Needs torch, torchvision, numpy and trtflow (src/) with its imports (onnx, safetensors).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from trtflow.build.weights import head_metadata, head_tensors
from trtflow.common.model import run_detector
from trtflow.run.executors import CaptureError, DeploymentForm, GraphPerShape


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def timer(device: torch.device):
    """Milliseconds of one call: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":

        def measure(fn, x):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:

        def measure(fn, x):
            started = time.perf_counter()
            fn(x)
            return (time.perf_counter() - started) * 1e3

    return measure


def run_row(name: str, fn, images: torch.Tensor, *, warmup: int, iters: int, device: torch.device) -> dict:
    """Warm-up, then `iters` timed calls of fn(images); capture failures become a reason, not a number."""
    measure = timer(device)
    row = {"name": name}
    try:
        for _ in range(warmup):
            fn(images)
        times = [measure(fn, images) for _ in range(iters)]
        row["detections"] = count_detections(fn(images))
    except CaptureError as error:
        row["not_captured"] = str(error)
        return row
    except Exception as error:  # reported per row and in the exit status, never a number
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return row
    row.update(
        median_ms=statistics.median(times),
        p10_ms=float(np.percentile(times, 10)),
        p90_ms=float(np.percentile(times, 90)),
        min_ms=min(times),
        iters=len(times),
    )
    return row


def count_detections(outputs) -> int | None:
    if isinstance(outputs, dict) and "num_detections" in outputs:
        return int(outputs["num_detections"].sum())
    if isinstance(outputs, list):
        return sum(len(o["scores"]) for o in outputs)
    return None  # the features network alone detects nothing


def variants(model, manifest, tensors, images: torch.Tensor):
    """(name, callable) pairs: torchvision eager, the deployment form in each dtype, then the CUDA-graph
    variants, the captures that may fail last (a failed capture must not disturb the rows before it)."""
    device = images.device
    autocast = lambda enabled: torch.autocast(device.type, dtype=torch.float16, enabled=enabled)  # noqa: E731

    def torchvision_full(images):  # torchvision's own call, its transform included
        return model(list(images))

    def torchvision_parts(fp16):
        def call(images):
            with autocast(fp16):
                return run_detector(model, images)

        return call

    yield "torchvision model(images) fp32", torchvision_full
    yield "torchvision backbone+rpn+roi_heads fp32", torchvision_parts(False)
    yield "torchvision backbone+rpn+roi_heads fp16 autocast", torchvision_parts(True)
    forms = {
        label: DeploymentForm(model, manifest, tensors, dtype).to(device).eval()
        for dtype, label in ((torch.float32, "fp32"), (torch.float16, "fp16 .half()"))
    }
    for label, form in forms.items():
        maps = form.extract(images)
        yield f"deployment form {label}", form
        yield f"  features network only {label}", form.extract
        yield f"  static head only {label}", lambda images, form=form, maps=maps: form.detect(maps)
    if device.type != "cuda":
        return
    for label, form in forms.items():
        graphed = GraphPerShape(form.extract)
        yield (
            f"deployment form {label} cuda-graph features + eager head",
            lambda images, form=form, graphed=graphed: form.detect(graphed(images)),
        )
    for label, form in forms.items():
        yield f"deployment form {label} cuda-graph whole", GraphPerShape(form)
    yield "torchvision backbone+rpn+roi_heads fp32 cuda-graph", GraphPerShape(torchvision_parts(False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--size", type=parse_size, default=(800, 1344), help="input HxW (default 800x1344)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=100, help="timed iterations per row (default 100; >= 50 on a GPU)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU; use --device cpu for a smoke test")

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
    manifest = head_metadata(model, args.size)  # dry runs on the CPU, before the model moves
    tensors = head_tensors(model)
    model.to(device)
    images = torch.randn(args.batch, 3, *args.size, generator=torch.Generator().manual_seed(0)).to(device)

    torch.set_grad_enabled(False)
    rows = [
        run_row(name, fn, images, warmup=args.warmup, iters=args.iters, device=device)
        for name, fn in variants(model, manifest, tensors, images)
    ]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "model": "fasterrcnn_resnet50_fpn (random init, 91 classes)",
        "size": list(args.size),
        "batch": args.batch,
        "warmup": args.warmup,
        "iters": args.iters,
        "timing": "CUDA events per call" if device.type == "cuda" else "perf_counter per call",
        "budgets": {
            "rpn": {k: manifest["rpn"][k] for k in ("pre_nms_top_n", "post_nms_top_n")},
            "box_candidates": manifest["box"]["candidates"],
            "detections_per_img": manifest["box"]["detections_per_img"],
        },
        "rows": rows,
    }
    print(
        f"{result['device']}, torch {result['torch']}, torchvision {result['torchvision']}, "
        f"{args.batch}x3x{args.size[0]}x{args.size[1]}, median of {args.iters} after {args.warmup} warm-up"
    )
    print(f"{'':60s} {'median ms':>10s} {'p10':>8s} {'p90':>8s} {'dets':>6s}")
    for row in rows:
        if "median_ms" in row:
            detections = "–" if row["detections"] is None else str(row["detections"])
            print(
                f"{row['name']:60s} {row['median_ms']:10.2f} {row['p10_ms']:8.2f} {row['p90_ms']:8.2f} {detections:>6s}"
            )
        else:
            reason = row.get("not_captured") or f"ERROR {row['error']}"
            print(f"{row['name']:60s} {'n/a':>10s}  ({reason[:110]})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
