"""Bad input, stage by stage: one message naming the file or config key and the fix, a failure (an exception
in-process, a non-zero exit through Snakemake), and no partial artifact left behind.

Unit tests of each reader live beside their modules (test_images, test_coco, test_model, test_config, ...); this file
drives the stages that use them, and a few Snakemake runs of single rules in a scratch workflow (no
completed pipeline needed: each rule here runs from source files only).
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from conftest import FULL_TENSORRT
from snakemake_runs import ROOT, config_overlay, snakemake
from trtflow import artifacts
from trtflow.build import data
from trtflow.common.coco import DatasetError
from trtflow.common.images import read_image
from trtflow.common.metrics import LabelSetError
from trtflow.common.model import CheckpointError
from trtflow.config import ConfigError, check_config
from trtflow.precisions import NAMES

DEMO_CHECKPOINT = ROOT / "models/demo_detector.safetensors"
CATEGORIES = [{"id": i, "name": name} for i, name in enumerate(("circle", "rectangle", "triangle", "star"), 1)]


def files_under(folder: Path) -> list[str]:
    """Every file below `folder` (hidden staging files included), relative: what a failure left behind."""
    return sorted(str(path.relative_to(folder)) for path in Path(folder).rglob("*") if path.is_file())


def encode(path: Path, pixels: np.ndarray) -> Path:
    ok, encoded = cv2.imencode(path.suffix, pixels)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes())
    return path


def photo(height=64, width=80, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def corrupt_png(path: Path) -> None:
    encoded = bytearray(encode(path, photo(96, 96)).read_bytes())
    data_start = encoded.index(b"IDAT") + 8
    encoded[data_start : data_start + 64] = bytes(64)  # damaged compressed pixels: zlib and the CRC both fail
    path.write_bytes(bytes(encoded))


def truncated_jpeg(path: Path) -> None:
    whole = encode(path, photo(128, 128)).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


# name -> (how the file is made, the problem the message must state)
BAD_IMAGES = {
    "corrupt.png": (corrupt_png, "is a corrupt or truncated PNG file"),
    "truncated.jpg": (truncated_jpeg, "is a truncated JPEG (no end-of-image marker)"),
    "zero.jpg": (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "notes.png": (lambda p: p.write_text("meeting notes, not pixels"), "is not an image OpenCV can read"),
    "tiny.png": (lambda p: encode(p, photo(20, 20)), "is 20x20 px, under 32 px a side"),
    "huge.png": (lambda p: encode(p, np.zeros((40, 8001, 3), np.uint8)), "is 8001x40 px, over 8000 px a side"),
}
# converted on reading, as cv2.imread would: name -> (pixels written, the BGR pixels every stage then sees)
GRAY = np.random.default_rng(1).integers(0, 256, (48, 64), dtype=np.uint8)
DEEP = np.random.default_rng(2).integers(0, 65536, (48, 64, 3), dtype=np.uint16)
RGBA = np.random.default_rng(3).integers(0, 256, (48, 64, 4), dtype=np.uint8)
CONVERTED_IMAGES = {
    "gray.png": (GRAY, np.repeat(GRAY[..., None], 3, axis=2)),
    "deep.png": (DEEP, ((DEEP.astype(np.uint32) + 128) // 257).astype(np.uint8)),
    "rgba.png": (RGBA, RGBA[..., :3]),
}


def coco_for(folder: Path, names: list[str], categories=CATEGORIES) -> Path:
    """annotations.json beside `folder` listing `names` (one box each, sizes from the JSON's own claim)."""
    images = [{"id": i, "file_name": name, "width": 64, "height": 48} for i, name in enumerate(names, 1)]
    for image in images:
        pixels = cv2.imread(str(folder / image["file_name"]), cv2.IMREAD_UNCHANGED)
        if pixels is not None:
            image["height"], image["width"] = pixels.shape[:2]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10]} for i in range(1, len(names) + 1)]
    path = folder.parent / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(scope="module")
def user_images(tmp_path_factory) -> Path:
    """A user's image folder: two good photos, every bad kind, and the kinds converted on reading."""
    folder = tmp_path_factory.mktemp("user") / "images"
    for index in range(2):
        encode(folder / f"good{index}.jpg", photo(seed=index))
    for name, (make, _) in BAD_IMAGES.items():
        make(folder / name)
    for name, (pixels, _) in CONVERTED_IMAGES.items():
        encode(folder / name, pixels)
    return folder


def user_data(images: Path, annotations: Path | None, bad_images: str = "fail") -> dict:
    return {
        "source": "coco",
        "images": str(images),
        "annotations": annotations and str(annotations),
        "bad_images": bad_images,
    }


# -- images, through the data stage (rule `data`, data.source: coco) ---------------------------


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_a_bad_image_in_the_val_set_fails_naming_it_or_is_skipped(user_images, tmp_path, name):
    annotations = coco_for(user_images, ["good0.jpg", "good1.jpg", name])
    out = tmp_path / "results"
    with pytest.raises(DatasetError) as caught:
        data.prepare_data(user_data(user_images, annotations), out / "val.json", out / "calib.json")
    message, problem = str(caught.value), BAD_IMAGES[name][1]
    assert message.startswith(f"{annotations}: ") and f"{user_images / name}: {problem}" in message
    assert "Fix: " in message and "data.bad_images: skip" in message
    assert files_under(tmp_path) == []

    data.prepare_data(user_data(user_images, annotations, "skip"), out / "val.json", out / "calib.json")
    val = json.loads((out / "val.json").read_text())
    assert [Path(image["file_name"]).name for image in val["images"]] == ["good0.jpg", "good1.jpg"]
    assert [(Path(s["file"]).name, problem in f"{s['file']}: {s['reason']}") for s in val["info"]["skipped"]] == [
        (name, True)
    ]
    assert val["info"]["annotations_dropped_with_skipped_images"] == 1 and len(val["annotations"]) == 2


def test_gray_16_bit_and_rgba_images_are_converted_not_refused(user_images, tmp_path):
    names = sorted(CONVERTED_IMAGES)
    annotations = coco_for(user_images, names)
    data.prepare_data(user_data(user_images, annotations), tmp_path / "val.json", tmp_path / "calib.json")
    val = json.loads((tmp_path / "val.json").read_text())
    assert [Path(image["file_name"]).name for image in val["images"]] == names
    for image in val["images"]:
        expected = CONVERTED_IMAGES[Path(image["file_name"]).name][1]
        assert (image["height"], image["width"]) == (48, 64)
        assert np.array_equal(read_image(image["file_name"]), expected)


def test_a_bad_calibration_image_fails_naming_it(user_images, tmp_path):
    calibration = tmp_path / "calibration"
    encode(calibration / "good.jpg", photo())
    truncated_jpeg(calibration / "cut.jpg")
    annotations = coco_for(user_images, ["good0.jpg"])
    with pytest.raises(DatasetError) as caught:
        data.prepare_data(
            user_data(user_images, annotations),
            tmp_path / "out/val.json",
            tmp_path / "out/calib.json",
            calibration_images=str(calibration),
        )
    assert str(caught.value).startswith(f"{calibration}: ")
    assert f"{calibration / 'cut.jpg'}: is a truncated JPEG" in str(caught.value)
    # val.json is complete and valid on its own; Snakemake removes it with the failed job's other outputs
    assert files_under(tmp_path / "out") == ["val.json"]


@pytest.fixture(scope="module")
def scratch(scratch_run) -> Path:
    """A scratch copy of the workflow with no results: single rules run from source files."""
    return scratch_run("scratch")


def test_rule_data_names_every_bad_image_and_leaves_nothing(scratch, user_images):
    """One Snakemake run over the whole folder: every bad file on the console, exit 1, no data set written."""
    names = ["good0.jpg", "good1.jpg", *BAD_IMAGES, *CONVERTED_IMAGES]
    annotations = coco_for(user_images, names)
    overlay = config_overlay(scratch, "user_data.yaml", yaml.safe_dump({"data": user_data(user_images, annotations)}))
    result = snakemake(scratch, "results/data/val.json", *overlay, check=False)
    assert result.returncode == 1
    console = result.stderr
    assert f"DatasetError: {annotations}: {len(BAD_IMAGES)} problems:" in console
    for name, (_, problem) in BAD_IMAGES.items():
        assert f"{user_images / name}: {problem}" in console
    assert "data.bad_images: skip" in console
    assert files_under(scratch / "results") == []
    assert f"{user_images / 'zero.jpg'}: is empty" in (scratch / "logs/data/data.log").read_text()

    skip = config_overlay(
        scratch, "user_data_skip.yaml", yaml.safe_dump({"data": user_data(user_images, annotations, "skip")})
    )
    snakemake(scratch, "results/data/val.json", *skip)
    val = json.loads((scratch / "results/data/val.json").read_text())
    kept = [Path(image["file_name"]).name for image in val["images"]]
    assert kept == ["good0.jpg", "good1.jpg", *CONVERTED_IMAGES]
    assert sorted(Path(s["file"]).name for s in val["info"]["skipped"]) == sorted(BAD_IMAGES)
    assert files_under(scratch / "results") == ["data/calib.json", "data/val.json"]
    shutil.rmtree(scratch / "results")


# -- COCO JSON: missing and extra images or categories ---------------------------------------


def test_an_image_the_json_lists_but_the_folder_lacks_is_named(user_images, tmp_path):
    annotations = coco_for(user_images, ["good0.jpg", "gone.jpg"])
    with pytest.raises(DatasetError, match=rf"{user_images / 'gone.jpg'}: does not exist\. Fix: check the path"):
        data.prepare_data(user_data(user_images, annotations), tmp_path / "val.json", tmp_path / "calib.json")
    assert files_under(tmp_path) == []


def test_images_the_json_does_not_list_are_counted_not_used(user_images, tmp_path):
    annotations = coco_for(user_images, ["good0.jpg"])
    data.prepare_data(user_data(user_images, annotations), tmp_path / "val.json", tmp_path / "calib.json")
    val = json.loads((tmp_path / "val.json").read_text())
    assert len(val["images"]) == 1
    assert val["info"]["unlisted_images"] == len(files_under(user_images)) - 1


def test_an_annotation_of_an_unlisted_category_is_named(user_images, tmp_path):
    annotations = coco_for(user_images, ["good0.jpg"], categories=CATEGORIES[1:])
    with pytest.raises(DatasetError, match=r"annotation 1 points at category id 1, which 'categories' does not list"):
        data.prepare_data(user_data(user_images, annotations), tmp_path / "val.json", tmp_path / "calib.json")
    assert files_under(tmp_path) == []


@pytest.fixture(scope="module")
def demo_model(default_config):
    from trtflow.common.model import load_detector

    return load_detector(default_config["model"], DEMO_CHECKPOINT)


@pytest.mark.parametrize(
    "categories", [CATEGORIES[:3], [*CATEGORIES, {"id": 9, "name": "hexagon"}]], ids=["fewer", "more"]
)
def test_categories_that_are_not_the_models_classes_fail_before_scoring(
    demo_model, default_config, user_images, tmp_path, categories
):
    from trtflow.run.reference import run_reference

    annotations = coco_for(user_images, ["good0.jpg"], categories)
    val = tmp_path / "val.json"
    data.prepare_data(user_data(user_images, annotations), val, tmp_path / "calib.json")
    preprocess = {"input": default_config["model"]["input"], **default_config["preprocess"]}
    out = tmp_path / "reference"
    with pytest.raises(LabelSetError) as caught:
        run_reference(
            demo_model, val, preprocess, default_config["postprocess"], out / "detections.json", out / "metrics.json"
        )
    assert str(caught.value).startswith(
        f"{val} lists {len(categories)} categories but model.num_classes is 5 (4 object classes + background)"
    )
    assert f"model.num_classes: {len(categories) + 1}" in str(caught.value)
    assert not out.exists()


def test_images_without_annotations_give_reference_detections_and_say_map_is_not_measured(
    demo_model, default_config, user_images, tmp_path
):
    val = tmp_path / "val.json"
    data.prepare_data(user_data(user_images, None, "skip"), val, tmp_path / "calib.json")
    preprocess = {"input": default_config["model"]["input"], **default_config["preprocess"]}
    from trtflow.run.reference import run_reference

    metrics = run_reference(
        demo_model,
        val,
        preprocess,
        default_config["postprocess"],
        tmp_path / "detections.json",
        tmp_path / "metrics.json",
    )
    assert metrics["images"] == 2 + len(CONVERTED_IMAGES)
    assert metrics["skipped"].endswith("has no annotations (data.annotations unset): mAP is not measured")
    detections = json.loads((tmp_path / "detections.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= {1, 2, 3, 4}  # the model's own labels


# -- checkpoints (rule `model`) -----------------------------------------------------------------


def truncated_checkpoint(path: Path) -> None:
    whole = DEMO_CHECKPOINT.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


def pickled_list(path: Path) -> None:
    import torch

    torch.save([1, 2, 3], path)


def pickled_model(path: Path) -> None:
    import torch

    torch.save(torch.nn.Linear(2, 2), path)


CHECKPOINTS = {  # file -> (how it is made, config change, what the message must say)
    "truncated.safetensors": (truncated_checkpoint, {}, "model.checkpoint: cannot read {path} ("),
    "garbage.pth": (
        lambda p: p.write_bytes(b"\x00not a pickle"),
        {},
        "model.checkpoint: cannot read {path}: it is not tensors saved with torch.save",
    ),
    "whole_model.pt": (
        pickled_model,
        {},
        "model.checkpoint: cannot read {path}: it is not tensors saved with "
        "torch.save (a damaged file, or a whole pickled model: save "
        "model.state_dict() instead)",
    ),
    "list.pt": (pickled_list, {}, "model.checkpoint: {path} holds no state_dict of tensors; save model.state_dict()"),
    "demo.safetensors": (
        lambda p: shutil.copy(DEMO_CHECKPOINT, p),
        {"num_classes": 7},
        "{path}: the checkpoint has 5 classes (background included) but config model.num_classes "
        "is 7; set model.num_classes: 5",
    ),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_a_bad_checkpoint_is_named_with_the_fix_and_nothing_is_saved(default_config, tmp_path, name):
    from trtflow.common.model import save_validated_checkpoint

    make, change, message = CHECKPOINTS[name]
    path = tmp_path / name
    make(path)
    out = tmp_path / "results"
    with pytest.raises(CheckpointError) as caught:
        save_validated_checkpoint(
            {**default_config["model"], **change}, path, out / "checkpoint.safetensors", out / "model.json"
        )
    assert str(caught.value).startswith(message.format(path=path))
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its permissions")
def test_an_unreadable_checkpoint_is_named(default_config, tmp_path):
    from trtflow.common.model import load_detector

    path = tmp_path / "private.safetensors"
    shutil.copy(DEMO_CHECKPOINT, path)
    path.chmod(0)
    with pytest.raises(CheckpointError, match=rf"model\.checkpoint: cannot read {path} \(.*Permission denied"):
        load_detector(default_config["model"], path)


def test_rule_model_fails_on_a_corrupt_checkpoint_and_saves_nothing(scratch, tmp_path):
    checkpoint = tmp_path / "corrupt.safetensors"
    truncated_checkpoint(checkpoint)
    overlay = config_overlay(scratch, "corrupt.yaml", f"model:\n  checkpoint: {checkpoint}\n")
    result = snakemake(scratch, "results/model/checkpoint.safetensors", *overlay, check=False)
    assert result.returncode == 1
    assert f"CheckpointError: model.checkpoint: cannot read {checkpoint} (" in result.stderr
    assert not (scratch / "results/model").exists() or files_under(scratch / "results/model") == []


# -- config.yaml (checked before any job; test_config covers the schema's basic cases) -----------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"calibration": {"num_images": 0}}, "calibration.num_images: 0 is less than the minimum of 1"),
        ({"calibration": {"percentile": 150}}, "calibration.percentile: 150 is greater than the maximum of 100"),
        ({"engine": {"precisions": ["int4"]}}, f"engine.precisions.0: 'int4' is not one of {list(NAMES)}"),
        ({"engine": {"opt_level": 9}}, "engine.opt_level: 9 is greater than the maximum of 5"),
        ({"data": {"bad_images": "ignore"}}, "data.bad_images: 'ignore' is not one of ['fail', 'skip']"),
        ({"preprocess": {"std": [0.2, 0, 0.2]}}, "preprocess.std.1: 0 is less than or equal to the minimum of 0"),
        ({"model": {"input": "320x320"}}, "model.input: '320x320' is not of type 'object'"),
        ({"verify": {"enforce": ["fp64"]}}, f"verify.enforce.0: 'fp64' is not one of {list(NAMES)}"),
        (
            {"engine": {"batch": {"min": 2, "opt": 1, "max": 1}}},
            "engine.batch: {'min': 2, 'opt': 1, 'max': 1} needs 1 <= min <= opt <= max",
        ),
        (
            {"engine": {"batch": {"min": 1, "opt": 4, "max": 8}}},
            "the features ONNX has the static batch "
            "onnx.batch_size: 1; set engine.batch to {min: 1, opt: 1, "
            "max: 1} or onnx.dynamic_batch: true",
        ),
        (
            {"plugins": {"archs": [75, 86], "ptx_arch": 86}},
            "plugins.ptx_arch: 86 is newer than the oldest of plugins.archs [75, 86]: the PTX must run everywhere "
            "the library does; set it to at most 75",
        ),
        (
            {"calibration": {"images": "no/such/images/*.jpg"}},
            "calibration.images: no/such/images/*.jpg matches nothing",
        ),
    ],
)
def test_config_values_that_cannot_work_name_the_key(change, message):
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    for section, values in change.items():
        config[section] = {**config.get(section, {}), **values}
    with pytest.raises(ConfigError) as caught:
        check_config(config, workdir=ROOT)
    assert message in str(caught.value)


def test_snakemake_refuses_a_bad_config_before_any_job(scratch):
    overlay = config_overlay(scratch, "bad.yaml", "model:\n  num_classes: five\ncalibration:\n  num_images: -3\n")
    result = snakemake(scratch, "--dry-run", *overlay, check=False)
    console = result.console
    assert result.returncode == 1
    # the headline names the config files read: config.yaml, then the overlay (as Snakemake holds it: absolute)
    assert f"config.yaml + {scratch / 'bad.yaml'}: invalid configuration:" in console
    assert "model.num_classes: 'five' is not of type 'integer'" in console
    assert "calibration.num_images: -3 is less than the minimum of 1" in console
    assert "Job stats" not in console

    missing = config_overlay(scratch, "missing.yaml", "model:\n  checkpoint: models/nowhere.pth\n")
    result = snakemake(scratch, "--dry-run", *missing, check=False)
    assert result.returncode == 1
    assert "model.checkpoint: models/nowhere.pth does not exist" in result.console


# -- tools: nvcc, TensorRT, the GPU ---------------------------------------------------------------


def test_rule_plugins_without_nvcc_names_the_fix_and_builds_nothing(scratch):
    nvcc = shutil.which("nvcc")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not nvcc or Path(p) != Path(nvcc).parent)
    env = {"PATH": path, "CUDA_HOME": "", "CUDA_PATH": ""}
    result = snakemake(scratch, "results/plugins/build.json", check=False, env=env)
    assert result.returncode == 1
    assert "PluginBuildError: nvcc (the CUDA compiler) not found: plugins.nvcc = 'nvcc'" in result.stderr
    assert "set plugins.nvcc to its path in config.yaml" in result.stderr
    assert not (scratch / "results/plugins").exists() or files_under(scratch / "results/plugins") == []


def tiny_features_model() -> onnx.ModelProto:
    """The smallest graph that follows the features contract: one map p2, its objectness and deltas."""

    def conv(name, inputs, out_channels, in_channels):
        weight = helper.make_tensor(
            f"{name}.weight",
            TensorProto.FLOAT,
            [out_channels, in_channels, 1, 1],
            np.full(out_channels * in_channels, 0.1, np.float32),
        )
        return helper.make_node("Conv", [inputs, weight.name], [name]), weight

    nodes, weights = zip(conv("p2", "images", 4, 3), conv("objectness_p2", "p2", 3, 4), conv("deltas_p2", "p2", 12, 4))
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, channels, 32, 32])
        for name, channels in (("p2", 4), ("objectness_p2", 3), ("deltas_p2", 12))
    ]
    graph = helper.make_graph(
        list(nodes),
        "features",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        outputs,
        initializer=list(weights),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def tiny_features_onnx(path: Path) -> Path:
    onnx.save(tiny_features_model(), str(path))
    return path


def test_engine_stage_without_tensorrt_names_the_install_command(tmp_path):
    if FULL_TENSORRT:
        pytest.skip("full TensorRT is installed here")
    from trtflow.backend import BackendUnavailableError
    from trtflow.build.engine import EngineSettings, EngineSources, build_engine

    sources = EngineSources(onnx=tiny_features_onnx(tmp_path / "features.onnx"))
    with pytest.raises(BackendUnavailableError) as caught:
        build_engine(
            sources,
            EngineSettings("fp32"),
            tmp_path / "engine_fp32.plan",
            backend="tensorrt",
        )
    assert str(caught.value).startswith("backend: tensorrt -- no TensorRT Python module imports (tensorrt)")
    assert "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13" in str(caught.value)
    assert files_under(tmp_path) == ["features.onnx"]


def test_a_plan_for_other_gpus_is_refused_with_the_reason(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="builds a real (features-only) TensorRT-RTX plan")
    from trtflow.build.engine import EngineSettings, EngineSources, build_engine
    from trtflow.run.runtime import EngineRefused, Gpu, check_runnable, refusals

    plan = tmp_path / "engine_fp32.plan"
    metadata = build_engine(
        EngineSources(onnx=tiny_features_onnx(tmp_path / "features.onnx")),
        EngineSettings("fp32"),
        plan,
        backend="tensorrt_rtx",
    )
    installed = {"tensorrt_rtx": metadata.backend_version}
    assert refusals(metadata, Gpu("NVIDIA RTX A6000", "8.6"), installed, plan) == []
    (hopper,) = refusals(metadata, Gpu("NVIDIA H100 80GB HBM3", "9.0"), installed, plan)
    assert "compute capability 9.0 (Hopper), on which TensorRT-RTX plans do not run" in hopper
    assert "build the engine with full TensorRT on this GPU (backend: tensorrt)" in hopper
    (turing,) = refusals(metadata, Gpu("Tesla T4", "7.5"), installed, plan)
    assert f"the plan targets compute capabilities {metadata.compute_capabilities} but Tesla T4 is 7.5" in turing
    assert "engine.rtx.compute_capabilities" in turing
    (upgraded,) = refusals(metadata, Gpu("NVIDIA RTX A6000", "8.6"), {"tensorrt_rtx": "9.9.9"}, plan)
    assert "a plan runs only on the version that built it" in upgraded
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(EngineRefused, match=rf"cannot run {plan} .*no CUDA GPU is visible"):
            check_runnable(plan, metadata)


# -- a full disk -----------------------------------------------------------------------------------


def fsync_fails_with_enospc(monkeypatch):
    """What a full disk looks like to a writer on a file system that allocates late (ext4, XFS, NFS)."""

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)


def write_split(path):
    artifacts.write_json(path, {"images": []}, indent=1, sort_keys=False)  # how rule data writes a split


def write_metrics(path):
    from trtflow.artifacts import write_json

    write_json(path, {"mAP": 0.5})


def write_table(path):
    from trtflow.formats.calibration_table import CalibrationTable, write_calibration_table

    write_calibration_table(path, CalibrationTable("101600", "EntropyCalibration2", {"images": 0.02}))


def write_plan(path):
    pytest.importorskip("tensorrt_rtx", reason="builds a real (features-only) TensorRT-RTX plan")
    from trtflow.build.engine import EngineSettings, EngineSources, build_engine

    with tempfile.TemporaryDirectory() as sources:
        features = tiny_features_onnx(Path(sources) / "features.onnx")
        build_engine(
            EngineSources(onnx=features),
            EngineSettings("fp32"),
            path,
            backend="tensorrt_rtx",
        )


def write_qdq(path):
    from trtflow.common.qdq import save_onnx

    save_onnx(tiny_features_model(), path)


def demo_model_config() -> dict:
    from snakemake.utils import validate

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    validate(config, str(ROOT / "workflow/schemas/config.schema.yaml"))
    return config["model"]


def write_checkpoint(path):
    from trtflow.common.model import save_validated_checkpoint

    save_validated_checkpoint(demo_model_config(), DEMO_CHECKPOINT, path, path.with_name("model.json"))


def write_head_weights(path):
    from trtflow.build.weights import export_head
    from trtflow.common.model import load_detector

    model = load_detector(demo_model_config(), DEMO_CHECKPOINT)
    export_head(model, (320, 320), path.parent, checkpoint_sha256="0" * 64)


WRITERS = {  # artifact -> writer; each goes through trtflow.artifacts.atomic_write
    "val.json": write_split,
    "metrics.json": write_metrics,
    "int8calib.table": write_table,
    "engine_fp32.plan": write_plan,
    "features.qdq.onnx": write_qdq,
    "checkpoint.safetensors": write_checkpoint,
    "head.safetensors": write_head_weights,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_full_disk_names_the_file_and_keeps_the_old_artifact(tmp_path, monkeypatch, name):
    target = tmp_path / name
    target.write_bytes(b"the previous, complete artifact")
    fsync_fails_with_enospc(monkeypatch)
    with pytest.raises(artifacts.DiskFullError) as caught:
        WRITERS[name](target)
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert str(caught.value).startswith(f"{target}: the disk is full (no space left on the device holding {tmp_path}")
    assert "nothing was written" in str(caught.value) and "then run snakemake again" in str(caught.value)
    assert target.read_bytes() == b"the previous, complete artifact"
    assert files_under(tmp_path) == [name]


def test_a_write_cut_off_halfway_leaves_no_staging_file(tmp_path):
    def half_then_full(staging: Path) -> None:
        staging.write_bytes(b"x" * 1000)
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    with pytest.raises(artifacts.DiskFullError, match=r"engine_fp16\.plan: the disk quota is used up"):
        artifacts.atomic_write(tmp_path / "engine_fp16.plan", half_then_full)
    assert files_under(tmp_path) == []


def user_namespaces_work() -> bool:
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


@pytest.mark.skipif(not user_namespaces_work(), reason="needs `unshare -rm` (user namespaces) to mount a small tmpfs")
def test_rule_data_on_a_really_full_disk(scratch):
    """results/ on a 256 KiB tmpfs (a private mount namespace): the demo images fill it while rule data runs."""
    (scratch / "results").mkdir(exist_ok=True)
    script = (
        f"mount -t tmpfs -o size=256k tmpfs results && {sys.executable} -m snakemake --cores 1 "
        "results/data/val.json; echo exit=$?; find results -type f"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=scratch, capture_output=True, text=True, timeout=300
    )
    assert "exit=1" in result.stdout, result.stdout + result.stderr
    assert (
        "DiskFullError: results/data/val: the disk is full (no space left on the device holding results/data"
        in result.stderr
    ), result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "exit=1"  # `find` listed no file: nothing half-written
