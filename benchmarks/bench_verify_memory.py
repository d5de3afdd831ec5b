"""Seconds per image and peak memory of verify's executors on a large detector: torchvision
`fasterrcnn_resnet50_fpn` (random weights, 5 classes) at 800x1344, the pipeline's defaults otherwise (static ONNX
batch 1, the head of config.yaml), over seeded noise images through verify's own detection loop.

    PYTHONPATH=src:benchmarks python benchmarks/bench_verify_memory.py prepare --folder /tmp/r50 --images 16
    PYTHONPATH=src:benchmarks python benchmarks/bench_verify_memory.py run --folder /tmp/r50 \\
        --executor tensorrt-network --batch-size 1 --images 4 [--device cuda]

`prepare` writes the features ONNX, the head weights, the fp32 network record the engine stage would hand to the
builder (no plan is built), a COCO JSON of noise images and the config it used (config.json). `run` is one
executor in one fresh process over the first `--images` of them, on `--device` (default the CPU; ONNX Runtime
takes its CUDA provider where it has one): it prints a JSON line with seconds per image, the process's peak
resident memory (VmHWM, benchmarks/peak_memory.py) and on a GPU torch's peak of allocated GPU memory. `run` reads
only the folder, so it runs where neither TensorRT nor Snakemake is installed (a GPU machine): for `--executor
tensorrt-network` the record, config.json, val.json and the images suffice; a relative `--folder` to `prepare`
keeps val.json's image paths valid from the same directory there. Run each measurement as its own process: peak
memory is the process's.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import torch
import yaml
from peak_memory import peak_rss_mb

from trtflow.backend import load_backend
from trtflow.build.engine import EngineSettings, EngineSources, define_network
from trtflow.build.export import export_features
from trtflow.build.weights import export_head
from trtflow.common.model import build_detector
from trtflow.formats.head_weights import load_head
from trtflow.formats.network_record import read_network
from trtflow.run.detection_loop import detect_images
from trtflow.run.executors import deployment_executor, network_definition_executor
from trtflow.run.reference import torch_detector

ROOT = Path(__file__).resolve().parents[1]
INPUT_HW = (800, 1344)
NUM_CLASSES = 5


def pipeline_config() -> dict:
    """config.yaml with the schema's defaults, the model made the r50 case."""
    from snakemake.utils import validate

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    validate(config, str(ROOT / "workflow/schemas/config.schema.yaml"))
    config = copy.deepcopy(config)
    config["model"].update(
        arch="fasterrcnn_resnet50_fpn", num_classes=NUM_CLASSES, input={"height": INPUT_HW[0], "width": INPUT_HW[1]}
    )
    return config


def r50(config: dict):
    """The random-weight detector (seed 0): the same weights in every process."""
    torch.manual_seed(0)
    return build_detector(config["model"]).eval()


def prepare(folder: Path, images: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = pipeline_config()
    (folder / "config.json").write_text(json.dumps(config))
    model = r50(config)
    export_features(model, INPUT_HW, folder / "features.onnx")
    export_head(model, INPUT_HW, folder / "weights", checkpoint_sha256="0" * 64)
    backend = load_backend(config["backend"])
    network, parser = define_network(
        backend,
        backend.create_builder(),
        onnx.load(str(folder / "features.onnx")),
        EngineSources(onnx=folder / "features.onnx"),
        EngineSettings("fp32"),
        load_head(folder / "weights"),
    )
    read_network(network, backend.trt).save(folder / "engine_fp32.network.safetensors")
    del parser
    rng = np.random.default_rng(0)
    entries = []
    for index in range(1, images + 1):
        path = folder / f"image_{index}.jpg"
        cv2.imwrite(str(path), rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
        entries.append({"id": index, "file_name": str(path), "height": 480, "width": 640})
    categories = [{"id": i, "name": f"class{i}"} for i in range(1, NUM_CLASSES)]
    (folder / "val.json").write_text(json.dumps({"images": entries, "annotations": [], "categories": categories}))
    print(f"prepared {folder}: {images} images, peak {peak_rss_mb():.0f} MiB")


def run(folder: Path, executor_name: str, batch_size: int, images: int, device: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    if executor_name == "tensorrt-network":
        executor = network_definition_executor(folder / "engine_fp32.network.safetensors", device=device)
    elif executor_name == "pytorch":  # rule reference's detector
        executor = torch_detector(r50(config).to(device))
        executor.name = "pytorch"
    else:
        executor = deployment_executor("fp32", folder / "features.onnx", folder / "weights", device=device)
    val = json.loads((folder / "val.json").read_text())["images"][:images]
    started = time.perf_counter()
    detect_images(
        executor,
        val,
        {},
        {"input": config["model"]["input"], **config["preprocess"]},
        config["postprocess"],
        batch_size=batch_size,
        desc=executor.name,
    )
    seconds = time.perf_counter() - started
    gpu = {}
    if torch.device(device).type == "cuda":
        gpu = {
            "gpu": torch.cuda.get_device_name(),
            "peak_gpu_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
        }
    print(
        json.dumps(
            {
                "executor": executor.name,
                "device": device,
                "batch_size": batch_size,
                "images": len(val),
                "seconds_per_image": round(seconds / len(val), 2),
                "peak_rss_mib": round(peak_rss_mb()),
                **gpu,
                "threads": torch.get_num_threads(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("prepare", "run"))
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument(
        "--executor", choices=("tensorrt-network", "deployment-form", "pytorch"), default="tensorrt-network"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="torch device of the executor (run): cpu, cuda, cuda:1, ...")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.folder, args.images)
    else:
        run(args.folder, args.executor, args.batch_size, args.images, args.device)


if __name__ == "__main__":
    main()
