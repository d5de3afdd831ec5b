"""Verify's executors on the demo val split: the TensorRT network definition evaluated layer by layer
(trtflow.run.netexec, `tensorrt-network`) vs the deployment-form reference (ONNX Runtime + StaticHead).

Each run is one executor over the val images, through the same detection loop verify uses, so two runs
side by side (one process each) give the ratio verify pays for the stronger check:

    PYTHONPATH=src python3 benchmarks/bench_netexec.py --executor tensorrt-network
    PYTHONPATH=src python3 benchmarks/bench_netexec.py --executor deployment-form

Needs a completed demo run (results/engine_<precision>.network.safetensors, results/onnx/, results/weights/,
results/data/val.json). Prints the executor, images, seconds of the detection loop, detections found and what
the executor ran (device, dtypes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from trtflow.run.detection_loop import detect_dataset
from trtflow.run.executors import deployment_executor, network_definition_executor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", choices=("tensorrt-network", "deployment-form"), required=True)
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--device", default=None, help="torch device of netexec / the StaticHead (default: the GPU where there is one)"
    )
    parser.add_argument("--detections-out", type=Path, help="write the COCO-style detections here")
    args = parser.parse_args()

    config = yaml.safe_load(args.config.read_text())
    results = args.results
    if args.executor == "tensorrt-network":
        executor = network_definition_executor(
            results / f"engine_{args.precision}.network.safetensors", device=args.device
        )
    else:
        onnx = results / "onnx" / ("features.qdq.onnx" if args.precision == "int8" else "features.onnx")
        executor = deployment_executor(args.precision, onnx, results / "weights", device=args.device)
    started = time.perf_counter()
    detections = detect_dataset(
        executor,
        results / "data/val.json",
        {"input": config["model"]["input"], **config["preprocess"]},
        config["postprocess"],
        batch_size=args.batch_size,
        desc=executor.name,
    )
    seconds = time.perf_counter() - started
    images = len(json.loads((results / "data/val.json").read_text())["images"])
    if args.detections_out:
        args.detections_out.write_text(json.dumps(detections))
    print(
        json.dumps(
            {
                "executor": executor.name,
                "precision": args.precision,
                "images": images,
                "seconds": round(seconds, 3),
                "detections": len(detections),
                **executor.describe(),
            }
        )
    )


if __name__ == "__main__":
    main()
