"""ModelOpt vs trtflow Q/DQ placement (issue 16, item 7) on the same ONNX, images and calibration method.

For each model and method, rule `calibrate`'s code (`trtflow.build.calibrate.calibrate_features`, with config.yaml's
`calibration:`) runs twice, each time in a fresh subprocess (so the peak memory is its own), on the same
features ONNX and the same seeded calibration subset decoded and preprocessed by the same code:

- trtflow: `calibration.qdq_placement: trtflow`, streamed histograms -> thresholds -> `trtflow.common.qdq` insertion;
- modelopt: `calibration.qdq_placement: modelopt`, `trtflow.build.modelopt_qdq.quantize_features`: the images as one
  numpy array into `modelopt.onnx.quantization.quantize(quantize_mode="int8", calibration_eps=["cpu"],
  high_precision_dtype="fp32")` (fp32 keeps the unquantized ops float32, as ours does; ModelOpt's default,
  fp16, would change two things at once).

Methods: `entropy` (ours: TensorRT's EntropyCalibration2 on 2048-bin histograms; ModelOpt: onnxruntime's
Entropy calibrator), `max` (ours: minmax; ModelOpt: max). ModelOpt offers no percentile method; ours
(the pipeline default, percentile 99.99) runs as an extra row.

Then, in this process, for every Q/DQ ONNX: QuantizeLinear/DequantizeLinear counts and the op types that read
a dequantized tensor; a TensorRT-RTX int8 plan built by `trtflow.build.engine.build_engine` (features + head for
the demo, features only for the random-weights model); and
- demo detector (results/ from `snakemake results/calib/accuracy.json`): simulated-INT8 COCO mAP through the
  deployment head, `trtflow.run.qdq_accuracy.simulated_accuracy` as rule `calibration_accuracy` runs it;
- random-weights torchvision architectures (`--models`) at `--size` (exported by `trtflow.build.export.export_features`, num_classes 5):
  mAP means nothing, so ONNX Runtime agreement of the Q/DQ graph with the float graph on `--agreement-images`
  val images (per output max |error| / max |float|, the worst output and the median over outputs).

    .venv/bin/python benchmarks/bench_modelopt.py                 # demo + fasterrcnn_mobilenet_v3_large_320_fpn
    .venv/bin/python benchmarks/bench_modelopt.py --models demo --methods entropy

Needs ModelOpt (see docs/BENCHMARKS.md for the install that keeps the pipeline's onnx/onnxruntime).
Results: <workdir>/results.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import yaml
from peak_memory import peak_rss_mb
from snakemake.utils import validate

from trtflow.artifacts import installed_versions
from trtflow.build.calibrate import image_batches, select_calibration_images
from trtflow.build.modelopt_qdq import METHODS as MODELOPT_METHODS
from trtflow.config import SCHEMA

RESULTS = Path("results")
CALIB_JSON = RESULTS / "data/calib.json"
VAL_JSON = RESULTS / "data/val.json"
# method -> config calibration.algorithm (trtflow.build.modelopt_qdq.METHODS maps it to ModelOpt's calibration_method)
METHODS = {"entropy": "entropy", "max": "minmax", "percentile": "percentile"}


def pipeline_config() -> dict:
    """config.yaml with the schema's defaults filled in, as the Snakefile sees it."""
    config = yaml.safe_load(Path("config.yaml").read_text())
    validate(config, str(SCHEMA), set_default=True)
    return config


def preprocess_settings(config: dict, size: int | None) -> dict:
    """The pipeline's preprocessing (rules' `preprocess_settings`), at the model input size."""
    shape = config["model"]["input"] if size is None else {"height": size, "width": size}
    return {"input": shape, **config["preprocess"]}


def model_onnx(workdir: Path, model: str) -> Path:
    return RESULTS / "onnx/features.onnx" if model == "demo" else workdir / model / "features.onnx"


def export_random_model(config: dict, arch: str, size: int, path: Path) -> None:
    """Random-init `arch` (num_classes 5) -> features ONNX through the pipeline's own exporter."""
    import torch

    from trtflow.build.export import export_features
    from trtflow.common.model import build_detector

    torch.manual_seed(0)
    detector = build_detector({**config["model"], "arch": arch, "num_classes": 5}).eval()
    export_features(
        detector,
        (size, size),
        path,
        opset=config["onnx"]["opset"],
        metadata={"trtflow.checkpoint_sha256": f"random-init-{arch}-seed0", "trtflow.arch": arch},
    )


def child(args) -> dict:
    """One quantization in this (fresh) process, rule `calibrate`'s code with the given placement and method.

    Time and peak memory cover all of it, image decoding included. Peak memory is this process image's own
    (benchmarks/peak_memory.py).
    """
    from trtflow.build.calibrate import calibrate_features

    config = pipeline_config()
    preprocess = preprocess_settings(config, None if args.model == "demo" else args.size)
    out = args.workdir / args.model / f"{args.child}_{args.method}.qdq.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    calibration = {**config["calibration"], "algorithm": METHODS[args.method], "qdq_placement": args.child}
    start = time.perf_counter()
    calibrate_features(
        model_onnx(args.workdir, args.model),
        CALIB_JSON,
        table_path=out.with_suffix(".table"),
        ranges_path=out.with_suffix(".ranges.json"),
        qdq_path=out,
        calibration=calibration,
        preprocess=preprocess,
    )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "qdq_onnx": str(out)}


def measure(args, model: str, tool: str, method: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--workdir",
        str(args.workdir),
        "--size",
        str(args.size),
        "--child",
        tool,
        "--model",
        model,
        "--method",
        method,
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-12:]
        return {"error": " | ".join(tail)}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def qdq_summary(path: Path) -> dict:
    """Q/DQ node counts; the op types that read a dequantized activation / weight (node counts per type)."""
    model = onnx.load(str(path))
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    # a weight: int8 initializer -> DQ (ours), or float initializer -> Q -> DQ (ModelOpt, onnxruntime)
    constants |= {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in constants}
    dequantized = {n.output[0]: n.input[0] in constants for n in graph.node if n.op_type == "DequantizeLinear"}
    activation_readers, weight_readers = Counter(), Counter()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        kinds = {dequantized[name] for name in node.input if name in dequantized}
        if False in kinds:
            activation_readers[node.op_type] += 1
        if True in kinds:
            weight_readers[node.op_type] += 1
    ops = Counter(node.op_type for node in graph.node)
    return {
        "QuantizeLinear": ops["QuantizeLinear"],
        "DequantizeLinear": ops["DequantizeLinear"],
        "weight_DequantizeLinear": sum(dequantized.values()),
        "int8_activation_inputs_of": dict(sorted(activation_readers.items())),
        "int8_weights_of": dict(sorted(weight_readers.items())),
    }


def build_int8_plan(config: dict, qdq: Path, with_head: bool) -> dict:
    from trtflow.build.engine import EngineSettings, EngineSources, build_engine

    engine = {key: value for key, value in config["engine"].items() if key != "precisions"}
    sources = EngineSources(onnx=qdq, head_weights=RESULTS / "weights" if with_head else None)
    try:
        metadata = build_engine(
            sources, EngineSettings.from_config(engine, "int8"), qdq.with_suffix(".plan"), backend="tensorrt_rtx"
        )
    except Exception as error:  # the result to record, not a failure of the benchmark
        return {"builds": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    qdq.with_suffix(".plan").unlink()
    return {"builds": True, "build_s": metadata.build_seconds, "plan_mb": metadata.plan_bytes / 2**20}


def demo_accuracy(config: dict, qdq: Path) -> dict:
    from trtflow.run.qdq_accuracy import simulated_accuracy

    report = simulated_accuracy(
        RESULTS / "onnx/features.onnx",
        {"int8": qdq},
        RESULTS / "weights",
        VAL_JSON,
        qdq.with_suffix(".accuracy.json"),
        preprocess=preprocess_settings(config, None),
        postprocess=config["postprocess"],
    )
    return {"fp32_mAP": report["fp32_mAP"], "int8_sim_mAP": report["int8_sim_mAP"], "delta": report["int8_delta"]}


def output_agreement(config: dict, float_onnx: Path, qdq: Path, size: int, count: int) -> dict:
    """Per output: max |Q/DQ - float| / max |float| in ONNX Runtime on `count` val images."""
    from trtflow.common.onnxrun import OnnxSession

    paths = select_calibration_images(VAL_JSON, count, 0)
    images = np.concatenate(list(image_batches(paths, count, preprocess_settings(config, size))))
    reference, quantized = OnnxSession(float_onnx)(images), OnnxSession(qdq)(images)
    errors = {
        name: float(np.abs(quantized[name] - value).max() / np.abs(value).max()) for name, value in reference.items()
    }
    return {
        "agreement_images": count,
        "worst_output": max(errors, key=errors.get),
        "max_rel_error_worst": max(errors.values()),
        "max_rel_error_median": float(np.median(list(errors.values()))),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | method | tool | Q / DQ (weight DQ) | int8 inputs of | time s | peak RSS MB | "
        "TensorRT-RTX int8 plan | fp32 → sim-INT8 mAP / output error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['tool']} | failed: {r['error'][:200]} | | | | | |")
            continue
        q = r["qdq"]
        readers = ", ".join(f"{op} {n}" for op, n in q["int8_activation_inputs_of"].items())
        plan = f"builds, {r['plan']['build_s']:.1f} s" if r["plan"]["builds"] else f"fails: {r['plan']['error'][:120]}"
        if "int8_sim_mAP" in r:
            quality = f"{r['fp32_mAP']:.3f} → {r['int8_sim_mAP']:.3f} ({-r['delta'] * 100:+.1f} pts)"
        else:
            quality = (
                f"worst {r['max_rel_error_worst']:.3f} ({r['worst_output']}), median {r['max_rel_error_median']:.3f}"
            )
        lines.append(
            f"| {r['model']} | {r['method']} | {r['tool']} | {q['QuantizeLinear']} / {q['DequantizeLinear']} "
            f"({q['weight_DequantizeLinear']}) | {readers} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{plan} | {quality} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=RESULTS / "bench_modelopt")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["demo", "fasterrcnn_mobilenet_v3_large_320_fpn"],
        help="demo (the pipeline's results/) and/or random-weights torchvision architectures",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(METHODS),
        default=["entropy", "max", "percentile"],
        help="percentile runs trtflow only (ModelOpt has no percentile method)",
    )
    parser.add_argument("--size", type=int, default=256, help="input side of the random-weights models")
    parser.add_argument("--agreement-images", type=int, default=8, help="val images of the output agreement check")
    parser.add_argument("--child", choices=["trtflow", "modelopt"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    for needed in (RESULTS / "onnx/features.onnx", RESULTS / "weights/manifest.json", CALIB_JSON, VAL_JSON):
        if not needed.exists():
            sys.exit(
                f"bench_modelopt.py: {needed} does not exist; run: .venv/bin/snakemake --cores 2 "
                "results/calib/accuracy.json"
            )
    config = pipeline_config()
    rows = []
    for model in args.models:
        source = model_onnx(args.workdir, model)
        if model != "demo" and not source.exists():
            export_random_model(config, model, args.size, source)
        for method in args.methods:
            for tool in ("trtflow", "modelopt") if METHODS[method] in MODELOPT_METHODS else ("trtflow",):
                row = {"model": model, "method": method, "tool": tool, **measure(args, model, tool, method)}
                if "error" not in row:
                    qdq = Path(row["qdq_onnx"])
                    row["qdq"] = qdq_summary(qdq)
                    row["plan"] = build_int8_plan(config, qdq, with_head=model == "demo")
                    row.update(
                        demo_accuracy(config, qdq)
                        if model == "demo"
                        else output_agreement(config, source, qdq, args.size, args.agreement_images)
                    )
                rows.append(row)
                print(json.dumps(row), flush=True)

    summary = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "software": installed_versions(("nvidia_modelopt", "onnx", "tensorrt_rtx", "torch")),
        "size": args.size,
        "rows": rows,
    }
    (args.workdir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
