"""trtflow.run.executors and trtflow.run.bench on CPU: the deployment form (ONNX Runtime or PyTorch features +
StaticHead) against torchvision's own detector on a tiny random-init detector, through the shared
pre/post-processing; what each executor says it runs; which one runs a plan here (the ladder); latency statistics.

Also home of the `deployment` fixture test_verify.py shares.
"""

import json

import cv2
import numpy as np
import pytest
import torch

from test_plan_metadata import write_plan
from test_weights import tame, tiny_fpn_detector
from trtflow.run.detection_loop import detect_dataset
from trtflow.run.executors import (
    CaptureError,
    Executor,
    ExecutorChoice,
    choose_executor,
    head_detections,
    onnxruntime_static_head_executor,
    pytorch_executor,
    pytorch_static_head_executor,
)
from trtflow.run.levels import LEVELS, UNVERIFIED
from trtflow.run.matching import match_detections
from trtflow.run.runtime import EngineRefused

INPUT_HW = (96, 128)
IMAGE_SIZES = ((120, 160), (96, 128), (150, 100), (64, 64), (100, 140), (90, 200))
POSTPROCESS = {"score_thresh": 0.05, "iou_thresh": 0.5, "max_detections": 100}


def preprocess_settings(input_hw=INPUT_HW) -> dict:
    """config `preprocess:` (ImageNet mean and std, RGB) at `input_hw`, as the pipeline hands it to every stage."""
    return {
        "input": {"height": input_hw[0], "width": input_hw[1]},
        "color": "rgb",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "pad_value": 0,
    }


class Deployment:
    """A tiny tamed random-init detector, its features ONNX, its head weights, and a small COCO data set."""

    def __init__(self, folder, model=None, input_hw=INPUT_HW):
        from trtflow.build.export import export_features
        from trtflow.build.weights import export_head
        from trtflow.formats.head_weights import load_head

        self.model = tame(tiny_fpn_detector(), input_hw) if model is None else model
        self.onnx = folder / "features.onnx"
        export_features(self.model, input_hw, self.onnx, simplify=False)
        self.weights = folder / "weights"
        export_head(self.model, input_hw, self.weights, checkpoint_sha256="0" * 64)
        self.manifest, self.tensors = load_head(self.weights)
        self.coco = folder / "val.json"
        self.images = len(IMAGE_SIZES)
        self.coco.write_text(json.dumps(small_coco(folder, IMAGE_SIZES)))
        self.preprocess = preprocess_settings(input_hw)
        self.postprocess = POSTPROCESS
        self.torchvision = pytorch_executor(self.model)

    def detections(self, executor):
        return detect_dataset(executor, self.coco, self.preprocess, self.postprocess, batch_size=4)


def small_coco(folder, sizes) -> dict:
    """Seeded noise images with a few filled rectangles, one box annotation each, 3 categories."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for index, (h, w) in enumerate(sizes, 1):
        picture = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        cv2.rectangle(picture, (x, y), (x + w // 3, y + h // 3), (255, 255, 255), -1)
        path = folder / f"image_{index}.png"
        cv2.imwrite(str(path), picture)
        images.append({"id": index, "file_name": str(path), "height": h, "width": w})
        annotations.append(
            {
                "id": index,
                "image_id": index,
                "category_id": 1 + index % 3,
                "iscrowd": 0,
                "bbox": [x, y, w // 3, h // 3],
                "area": float(w // 3 * h // 3),
            }
        )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": f"class{i}"} for i in (1, 2, 3)],
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    return Deployment(tmp_path_factory.mktemp("deployment"))


@pytest.fixture(scope="module")
def torchvision_detections(deployment):
    detections = deployment.detections(deployment.torchvision)
    assert len(detections) >= 50, "the tamed detector should detect plenty, or the comparison says little"
    return detections


# --------------------------------------------------------------------------- the deployment form


@pytest.mark.parametrize("head_dtype, least", [("float32", 0.99), ("float16", 0.97)])
def test_onnxruntime_static_head_matches_torchvision(deployment, torchvision_detections, head_dtype, least):
    executor = onnxruntime_static_head_executor(
        deployment.onnx,
        deployment.manifest,
        deployment.tensors,
        head_dtype=head_dtype,
        device="cpu",
        providers=["CPUExecutionProvider"],
    )
    assert executor.describe() == {
        "executor": "onnxruntime+static-head",
        "onnx": str(deployment.onnx),
        "providers": ["CPUExecutionProvider"],
        "head_device": "cpu",
        "head_dtype": head_dtype,
    }
    matching = match_detections(torchvision_detections, deployment.detections(executor))
    assert matching.recall >= least and matching.precision >= least
    assert np.abs(matching.dscores).max() <= (1e-4 if head_dtype == "float32" else 1e-2)


def test_pytorch_static_head_matches_torchvision(deployment, torchvision_detections):
    executor = pytorch_static_head_executor(deployment.model, deployment.manifest, deployment.tensors, device="cpu")
    assert executor.describe() == {
        "executor": "pytorch+static-head",
        "device": "cpu",
        "dtype": "float32",
        "head_dtype": "float32",
        "cuda_graph": "none",
    }
    matching = match_detections(torchvision_detections, deployment.detections(executor))
    assert matching.recall >= 0.99 and matching.precision >= 0.99
    assert np.abs(matching.dscores).max() <= 1e-4 and matching.ious.min() >= 0.999


def test_pytorch_executor_names_itself(deployment):
    assert deployment.torchvision.describe() == {
        "executor": "pytorch",
        "device": "cpu",
        "dtype": "float32",
        "autocast": False,
    }


def test_executors_refuse_what_they_cannot_run(deployment, tmp_path):
    with pytest.raises(ValueError, match="float16 runs under CUDA autocast"):
        pytorch_executor(deployment.model, dtype="float16")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        pytorch_static_head_executor(
            deployment.model, deployment.manifest, deployment.tensors, device="cpu", cuda_graph="features"
        )
    with pytest.raises(ValueError, match="use one of none, features, whole"):
        pytorch_static_head_executor(deployment.model, deployment.manifest, deployment.tensors, cuda_graph="yes")
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx does not exist; build it first"):
        onnxruntime_static_head_executor(tmp_path / "missing.onnx", deployment.manifest, deployment.tensors)


def test_head_detections_cut_each_image_at_num_detections():
    boxes = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    outputs = {
        "num_detections": torch.tensor([2, 0], dtype=torch.int32),
        "boxes": boxes,
        "scores": torch.tensor([[0.9, 0.8, 0.0], [0.0, 0.0, 0.0]]),
        "classes": torch.tensor([[1, 2, 0], [0, 0, 0]], dtype=torch.int32),
    }
    (b0, s0, c0), (b1, s1, c1) = head_detections(outputs)
    assert (
        np.array_equal(b0, boxes[0, :2].numpy()) and s0.tolist() == pytest.approx([0.9, 0.8]) and c0.tolist() == [1, 2]
    )
    assert b1.shape == (0, 4) and s1.size == 0 and c1.size == 0


@pytest.mark.needs_cuda
def test_cuda_graph_features_replay_matches_eager(deployment, torchvision_detections):
    model = tame(tiny_fpn_detector(), INPUT_HW).cuda()
    eager = pytorch_static_head_executor(model, deployment.manifest, deployment.tensors)
    graphed = pytorch_static_head_executor(model, deployment.manifest, deployment.tensors, cuda_graph="features")
    batch = np.random.default_rng(0).standard_normal((2, 3, *INPUT_HW), dtype=np.float32)
    for (eb, es, ec), (gb, gs, gc) in zip(eager(batch), graphed(batch)):
        assert np.allclose(eb, gb, atol=1e-3) and np.allclose(es, gs, atol=1e-5) and np.array_equal(ec, gc)
    whole = pytorch_static_head_executor(model, deployment.manifest, deployment.tensors, cuda_graph="whole")
    try:
        whole(batch)
    except CaptureError as error:
        assert "cannot be captured into a CUDA graph" in str(error)


# --------------------------------------------------------------------------- which executor runs a plan here


def test_each_level_says_what_it_leaves_unverified():
    """The levels weakest first, and what a run at each leaves open (README "Verification: what ran, and what it
    proves": nothing of the plan at `engine`; TensorRT's compilation at `network-definition`; the TensorRT network
    and the plan at `deployment-form`)."""
    assert LEVELS == ("deployment-form", "network-definition", "engine") and set(UNVERIFIED) == set(LEVELS)
    assert UNVERIFIED["engine"] is None and "compilation" in UNVERIFIED["network-definition"]
    assert UNVERIFIED["deployment-form"].startswith("neither the plan nor the TensorRT network definition ran")
    executor = Executor("x", lambda batch: [])
    assert ExecutorChoice(executor, "engine").status() == {
        "verified_level": "engine",
        "engine_executed": True,
        "unverified": None,
    }
    assert ExecutorChoice(executor, "deployment-form", ("no GPU", "no record")).status() == {
        "verified_level": "deployment-form",
        "engine_executed": False,
        "unverified": UNVERIFIED["deployment-form"],
        "reason": "no GPU; no record",
    }
    with pytest.raises(ValueError, match="level 'plan': use one of deployment-form, network-definition, engine"):
        ExecutorChoice(executor, "plan")


def test_without_fallback_the_ladder_gives_the_engines_refusal(tmp_path):
    plan = tmp_path / "engine_fp32.plan"
    with pytest.raises(EngineRefused, match=r"engine_fp32\.json not found: the runner needs the engine metadata"):
        choose_executor("fp32", plan, fallback=False)
    with pytest.raises(ValueError, match="the deployment-form fallback needs the features ONNX and head weights"):
        choose_executor("fp32", plan, network=tmp_path / "engine_fp32.network.safetensors")


@pytest.mark.needs_no_cuda
def test_the_ladder_says_why_each_stronger_level_did_not_run(deployment, tmp_path, caplog):
    """...in its result and its log, which says what runs instead and not "verifying": `trtflow detect` asks the
    same ladder, and verifies nothing."""
    plan = write_plan(tmp_path / "engine_fp32.plan")
    network = tmp_path / "engine_fp32.network.safetensors"  # not written: the network definition cannot run
    chosen = choose_executor("fp32", plan, network=network, onnx=deployment.onnx, weights_dir=deployment.weights)
    assert (chosen.level, chosen.executor.name) == ("deployment-form", "onnxruntime+static-head")
    engine, network_definition = chosen.reasons
    assert engine.startswith(f"cannot run {plan} (tensorrt_rtx 1.7.1.116, fp32): no CUDA GPU is visible")
    assert network_definition == (
        f"the network definition cannot be evaluated: network record {network} does not exist; build it with its "
        f"engine (snakemake {plan})"
    )
    assert "; running the deployment-form reference instead" in caplog.text and "verifying" not in caplog.text


# --------------------------------------------------------------------------- bench


def test_latency_stats_from_known_timings():
    from trtflow.run.bench import latency_stats

    stats = latency_stats([0.010, 0.020, 0.030, 0.040], batch_size=2)
    assert stats["iterations"] == 4 and stats["p50_ms"] == pytest.approx(25.0)
    assert stats["p90_ms"] == pytest.approx(37.0) and stats["p99_ms"] == pytest.approx(39.7)
    assert stats["mean_ms"] == pytest.approx(25.0) and stats["min_ms"] == pytest.approx(10.0)
    assert stats["throughput_ips"] == pytest.approx(2 * 4 / 0.1)


def test_time_detect_warms_up_then_times_each_call():
    from trtflow.run.bench import tiled_batch, time_detect

    batches = []
    stats = time_detect(
        lambda batch: batches.append(len(batch)), np.zeros((3, 3, 4, 4), np.float32), warmup=2, iterations=5
    )
    assert batches == [3] * 7 and stats["iterations"] == 5 and stats["p50_ms"] <= stats["p99_ms"]
    tiled = tiled_batch(np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1), 5)
    assert tiled.ravel().tolist() == [0, 1, 2, 0, 1]


@pytest.mark.needs_no_cuda
def test_bench_on_cpu_lists_the_refused_engine_and_times_the_rest(deployment, tmp_path):
    from trtflow.run.bench import EXECUTORS, bench_executors, benchmark

    executors = bench_executors(
        "fp16",
        EXECUTORS,
        plan=tmp_path / "engine_fp16.plan",
        onnx=deployment.onnx,
        weights_dir=deployment.weights,
        model=deployment.model,
        cuda_graph=True,
    )
    assert [e["executor"] if isinstance(e, dict) else e.name for e in executors] == list(EXECUTORS)
    assert "engine_fp16.json not found" in executors[0]["skipped"]
    assert executors[1].details["head_dtype"] == "float16"  # as the fp16 engine's head
    assert executors[2].details["note"] == "fp16: PyTorch float16 needs a CUDA GPU; ran float32"
    images = np.random.default_rng(0).standard_normal((2, 3, *INPUT_HW), dtype=np.float32)
    results = benchmark(executors, images, batch_sizes=[1, 2], warmup=1, iterations=2)
    assert len(results) == 1 + 3 * 2
    timed = [entry for entry in results if "p50_ms" in entry]
    assert [(e["executor"], e["batch_size"]) for e in timed] == [
        (name, size) for name in EXECUTORS[1:] for size in (1, 2)
    ]
    assert all(0 < e["p50_ms"] <= e["p99_ms"] and e["iterations"] == 2 for e in timed)


def test_executor_is_a_named_callable():
    executor = Executor("x", lambda batch: [len(batch)], {"device": "cpu"})
    assert executor(np.zeros((2, 1))) == [2] and executor.describe() == {"executor": "x", "device": "cpu"}
