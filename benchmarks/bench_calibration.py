"""Calibration benchmark: trtflow.build.calibrate vs onnxruntime.quantization's Entropy calibrator.

Same ONNX (torchvision fasterrcnn_mobilenet_v3_large_320_fpn features: backbone + FPN + RPN head convs,
random-init weights, input (1, 3, 320, 320)), same tensors (every float tensor, as ORT selects them),
same synthetic images. Each measurement runs in a fresh subprocess and reports its own peak RSS
(VmHWM, benchmarks/peak_memory.py: not the exporting parent's, which getrusage's maxrss would carry over).

    .venv/bin/python benchmarks/bench_calibration.py                    # ours at 32 and 128 images, ORT at 32
    .venv/bin/python benchmarks/bench_calibration.py --images 32 --ort-images 16 32

Phases: ours = collection (ORT inference with the tensors exposed + streaming histograms, session
creation included) and threshold search; ORT = setup (shape inference, augmented model, session),
collect_data and compute_data. Results: <workdir>/results.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from peak_memory import peak_rss_mb

ONNX_NAME = "fasterrcnn_mobilenet_v3_large_320_fpn_features.onnx"
INPUT_SHAPE = (1, 3, 320, 320)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def export_features_onnx(path: Path) -> None:
    """Random-init fasterrcnn_mobilenet_v3_large_320_fpn -> features ONNX (trtflow.common.model.FeaturesNetwork)."""
    import torch
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    from trtflow.common.model import FeaturesNetwork

    torch.manual_seed(0)
    detector = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter, as in the anchor measurement: its graph has the 204 float tensors
    # onnxruntime calibrates (the dynamo exporter's leaner graph has 155).
    torch.onnx.export(
        FeaturesNetwork(detector).eval(),
        (torch.randn(*INPUT_SHAPE),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["images"],
    )


def synthetic_batches(count: int, seed: int = 0):
    """`count` preprocessed (1, 3, 320, 320) float32 batches of random-pixel images, made one at a time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    for _ in range(count):
        pixels = rng.integers(0, 256, INPUT_SHAPE, dtype=np.uint8).astype(np.float32) / 255.0
        yield ((pixels - mean) / std).astype(np.float32)


def ort_tensors(onnx_path: Path) -> list[str]:
    """The tensors onnxruntime's calibrator selects (every float tensor around every node)."""
    from onnxruntime.quantization.calibrate import HistogramCalibrater
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    all_op_types = SimpleNamespace(op_types_to_calibrate=None)  # the calibrator's default: every op
    tensors, _ = HistogramCalibrater.select_tensors_to_calibrate(all_op_types, load_model_with_shape_infer(onnx_path))
    return sorted(tensors)


def run_ours(onnx_path: Path, images: int, tensors: str) -> dict:
    from trtflow.build.calibrate import collect_histograms, compute_amax

    names = ort_tensors(onnx_path) if tensors == "ort" else None
    start = time.perf_counter()
    statistics = collect_histograms(onnx_path, synthetic_batches(images), names, total_images=images, progress=False)
    collected = time.perf_counter()
    amax = compute_amax(statistics.histograms, "entropy")
    searched = time.perf_counter()
    result = {
        "tool": "trtflow",
        "tensors": len(amax),
        "images": images,
        "collect_s": collected - start,
        "search_s": searched - collected,
        "total_s": searched - start,
        "peak_rss_mb": peak_rss_mb(),
    }
    if tensors == "plan":
        result["qdq_rtx_build_s"] = tensorrt_rtx_build_seconds(onnx_path, amax)
    return result


def tensorrt_rtx_build_seconds(onnx_path: Path, amax: dict) -> float | None:
    """Insert Q/DQ from `amax` and time a TensorRT-RTX build of it (strongly typed, CPU ahead-of-time)."""
    import onnx

    from trtflow.common.qdq import insert_qdq, quantization_plan

    try:
        import tensorrt_rtx as trt
    except ImportError:
        return None
    model = onnx.load(str(onnx_path))
    qdq = insert_qdq(model, quantization_plan(model), amax)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(qdq.SerializeToString()):
        raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    start = time.perf_counter()
    if builder.build_serialized_network(network, builder.create_builder_config()) is None:
        raise RuntimeError("TensorRT-RTX did not build the Q/DQ features ONNX")
    return time.perf_counter() - start


def run_onnxruntime(onnx_path: Path, images: int, workdir: Path) -> dict:
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = synthetic_batches(images)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    start = time.perf_counter()
    calibrator = create_calibrator(
        onnx_path,
        None,
        str(workdir / "ort_augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": 2048, "num_quantized_bins": 128},
    )
    ready = time.perf_counter()
    calibrator.collect_data(Reader())
    collected = time.perf_counter()
    ranges = calibrator.compute_data()
    searched = time.perf_counter()
    return {
        "tool": "onnxruntime",
        "tensors": len(ranges.data),
        "images": images,
        "setup_s": ready - start,
        "collect_s": collected - ready,
        "search_s": searched - collected,
        "total_s": searched - start,
        "peak_rss_mb": peak_rss_mb(),
    }


def measure(args: list[str]) -> dict:
    """One measurement in a fresh interpreter; its last stdout line is the result."""
    completed = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def markdown(results: list[dict]) -> str:
    rows = [
        "| tool | tensors | images | setup s | collect s | threshold search s | total s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        setup = f"{r['setup_s']:.1f}" if "setup_s" in r else "(in collect)"
        rows.append(
            f"| {r['tool']} | {r['tensors']} | {r['images']} | {setup} | {r['collect_s']:.1f} | "
            f"{r['search_s']:.2f} | {r['total_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("results/bench_calibration"))
    parser.add_argument("--images", type=int, nargs="+", default=[32, 128], help="image counts for trtflow")
    parser.add_argument("--ort-images", type=int, nargs="*", default=[32], help="image counts for onnxruntime")
    parser.add_argument("--child", choices=["ours", "ours-plan", "onnxruntime"], help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    onnx_path = args.workdir / ONNX_NAME

    if args.child:
        if args.child == "onnxruntime":
            result = run_onnxruntime(onnx_path, args.count, args.workdir)
        else:
            result = run_ours(onnx_path, args.count, "ort" if args.child == "ours" else "plan")
        print(json.dumps(result))
        return

    import onnxruntime

    if not onnx_path.exists():
        export_features_onnx(onnx_path)
    workdir = ["--workdir", str(args.workdir)]
    results = [measure([*workdir, "--child", "ours", "--count", str(n)]) for n in args.images]
    results.append(
        {
            **measure([*workdir, "--child", "ours-plan", "--count", str(args.images[0])]),
            "tool": "trtflow (Q/DQ plan tensors)",
        }
    )
    results += [measure([*workdir, "--child", "onnxruntime", "--count", str(n)]) for n in args.ort_images]
    summary = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": str(onnx_path),
        "results": results,
    }
    ours = next((r for r in results if r["tool"] == "trtflow" and r["images"] in args.ort_images), None)
    theirs = next((r for r in results if r["tool"] == "onnxruntime" and ours and r["images"] == ours["images"]), None)
    if ours and theirs:
        summary["speedup"] = {
            "total": theirs["total_s"] / ours["total_s"],
            "search": theirs["search_s"] / ours["search_s"],
            "collect": (theirs["setup_s"] + theirs["collect_s"]) / ours["collect_s"],
            "memory": theirs["peak_rss_mb"] / ours["peak_rss_mb"],
        }
    (args.workdir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(results))
    if "speedup" in summary:
        print("\n" + ", ".join(f"{k} x{v:.1f}" for k, v in summary["speedup"].items()))
    built = [r["qdq_rtx_build_s"] for r in results if r.get("qdq_rtx_build_s") is not None]
    if built:
        print(f"TensorRT-RTX build of the Q/DQ features ONNX: {built[0]:.2f} s")


if __name__ == "__main__":
    main()
