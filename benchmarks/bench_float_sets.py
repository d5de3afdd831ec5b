"""Every float set of k layers among the N most sensitive: the best simulated mAP any of them reaches, to say
whether a budget can be met with k layers in float at all (issue 25's "at most 10 % of the layers"), not only
along rule float_layers' greedy path. Each set is one SimulatedDetection (ONNX Runtime + the deployment head) over
the val split, one process per CPU core.

    PYTHONPATH=src python benchmarks/bench_float_sets.py --results results --ranges results/calib/ranges.json \\
        --sensitivity results/calib/sensitivity_int8.json --top 12 --sizes 3 4 --out float_sets.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import yaml

from trtflow.common.qdq import CalibratedGraph
from trtflow.precisions import INT8
from trtflow.run.simulated import SimulatedDetection

ROOT = Path(__file__).resolve().parents[1]
WORKER: dict = {}


def start_worker(results: str, ranges: str, settings: dict) -> None:
    torch.set_num_threads(1)
    features = CalibratedGraph(Path(results) / "onnx/features.onnx", ranges, INT8)
    detection = SimulatedDetection(Path(results) / "weights", Path(results) / "data/val.json", **settings)
    WORKER.update(features=features, detection=detection)


def evaluate(layers: tuple[str, ...]) -> tuple[tuple[str, ...], float]:
    graph = WORKER["features"].with_float(layers)
    return layers, WORKER["detection"].mAP(graph, desc=" ".join(layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results")
    parser.add_argument("--ranges", required=True)
    parser.add_argument("--sensitivity", required=True, help="rule sensitivity's JSON: its ranking orders the layers")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--sizes", type=int, nargs="+", default=[3])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    settings = {
        "preprocess": {"input": config["model"]["input"], **config["preprocess"]},
        "postprocess": config["postprocess"],
    }
    candidates = json.loads(Path(args.sensitivity).read_text())["ranking"][: args.top]
    start_worker(args.results, args.ranges, settings)
    float_map = WORKER["detection"].mAP(WORKER["features"].model, desc="float")
    started = time.perf_counter()
    sets = [combo for size in args.sizes for combo in itertools.combinations(candidates, size)]
    scores = {}
    pool = ProcessPoolExecutor(os.cpu_count(), initializer=start_worker, initargs=(args.results, args.ranges, settings))
    with pool, open(Path(args.out).with_suffix(".jsonl"), "w") as progress:  # each set as it comes
        for layers, value in pool.map(evaluate, sets):
            scores[layers] = value
            progress.write(json.dumps({"layers": layers, "mAP": value}) + "\n")
            progress.flush()
    best = {
        size: max(((layers, value) for layers, value in scores.items() if len(layers) == size), key=lambda x: x[1])
        for size in args.sizes
    }
    report = {
        "float_mAP": float_map,
        "candidates": candidates,
        "sets": len(sets),
        "seconds": time.perf_counter() - started,
        "best": {
            str(size): {"layers": list(layers), "mAP": value, "drop_points": 100 * (float_map - value)}
            for size, (layers, value) in best.items()
        },
        "cpus": os.cpu_count(),
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["best"]), report["seconds"])


if __name__ == "__main__":
    main()
