"""trtflow.build.deploy: a full-TensorRT plan's JSON -> a Triton model (config.pbtxt read back through Triton's own
model-config protobuf, its tensors those of the JSON) and a DeepStream nvinfer config whose scale and offsets give
trtflow's preprocessing where nvinfer can express it; a TensorRT-RTX plan refused in one line."""

import configparser
from pathlib import Path

import numpy as np
import pytest

from test_plan_metadata import write_plan
from trtflow.build.deploy import DeployError, deploy
from trtflow.common.preprocess import normalize, resize_with_ratio
from trtflow.formats.plan_metadata import PlanMetadata, metadata_path
from trtflow.formats.usage import plan_usage

CATEGORIES = [{"id": 3, "name": "triangle"}, {"id": 1, "name": "circle"}, {"id": 2, "name": "rectangle"}]
PREPROCESS = {"input": {"height": 64, "width": 96}, "color": "rgb", "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225], "pad_value": 0}  # fmt: skip
POSTPROCESS = {"score_thresh": 0.05, "iou_thresh": 0.5, "max_detections": 100}
IMAGE_INPUT = {"name": "images", "dtype": "FLOAT", "shape": [1, 3, 64, 96]}


def detection_outputs(batch: int, classes_dtype: str = "INT32") -> list[dict]:
    """The four outputs as the engine stage records them (the demo's JSON), for `batch` (-1: dynamic)."""
    return [
        {"name": "num_detections", "dtype": "INT32", "shape": [batch]},
        {"name": "boxes", "dtype": "FLOAT", "shape": [batch, 100, 4]},
        {"name": "scores", "dtype": "FLOAT", "shape": [batch, 100]},
        {"name": "classes", "dtype": classes_dtype, "shape": [batch, 100]},
    ]


def full_tensorrt_plan(tmp_path: Path, inputs=(IMAGE_INPUT,), outputs=None, preprocess=PREPROCESS) -> Path:
    """A plan and its JSON as the engine stage writes them for full TensorRT on an 8.9 GPU (usage fields from
    trtflow.formats.usage, as for the demo)."""
    usage = plan_usage(
        list(inputs),
        outputs or detection_outputs(1),
        backend="tensorrt",
        backend_version="10.13.3.9",
        compute_capabilities=["8.9"],
        plan_path=tmp_path / "engine_fp16.plan",
        usage={"preprocess": preprocess, "postprocess": POSTPROCESS, "categories": CATEGORIES},
    )
    return write_plan(
        tmp_path / "engine_fp16.plan",
        b"plan bytes",
        backend="tensorrt",
        backend_version="10.13.3.9",
        precision="fp16",
        built_on="gpu",
        gpu={"name": "NVIDIA L4", "compute_capability": "8.9"},
        compute_capabilities=["8.9"],
        **usage,
    )


def deployed(tmp_path: Path, plan: Path) -> tuple[Path, Path]:
    triton, deepstream = tmp_path / "deploy/triton/trtflow_fp16", tmp_path / "deploy/deepstream/fp16/config_infer.txt"
    deploy(plan, triton, deepstream)
    return triton, deepstream


def triton_model_config(model_dir: Path):
    """config.pbtxt parsed by Triton's ModelConfig protobuf (tritonclient); parsing fails on any unknown field."""
    model_config_pb2 = pytest.importorskip(
        "tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed (pip install -e .[test])"
    )
    text_format = pytest.importorskip("google.protobuf.text_format")
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def tensors(config_tensors, pb2) -> list[tuple]:
    return [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in config_tensors]


def test_the_triton_config_is_tritons_model_config_with_the_sidecars_tensors(tmp_path):
    plan = full_tensorrt_plan(tmp_path)
    triton, _ = deployed(tmp_path, plan)
    config = triton_model_config(triton)
    from tritonclient.grpc import model_config_pb2

    metadata = PlanMetadata.read(metadata_path(plan))
    assert (config.name, config.platform, config.max_batch_size) == ("trtflow_fp16", "tensorrt_plan", 0)
    # a static batch: dims with the batch, as the JSON records the shapes
    assert tensors(config.input, model_config_pb2) == [("images", "TYPE_FP32", [1, 3, 64, 96])]
    assert tensors(config.output, model_config_pb2) == [
        ("num_detections", "TYPE_INT32", [1]),
        ("boxes", "TYPE_FP32", [1, 100, 4]),
        ("scores", "TYPE_FP32", [1, 100]),
        ("classes", "TYPE_INT32", [1, 100]),
    ]
    assert [entry["name"] for entry in metadata.outputs] == [t.name for t in config.output]
    assert config.output[3].label_filename == "labels.txt"
    # line i: model label i (categories numbered 1.. in id order)
    assert (triton / "labels.txt").read_text().splitlines() == ["background", "circle", "rectangle", "triangle"]
    assert (triton / "1/model.plan").read_bytes() == b"plan bytes"


def test_a_dynamic_batch_gives_max_batch_size_and_dims_without_the_batch(tmp_path):
    dynamic = {**IMAGE_INPUT, "shape": [-1, 3, 64, 96], "profile": {"min": [1, 3, 64, 96], "opt": [2, 3, 64, 96],
                                                                   "max": [4, 3, 64, 96]}}  # fmt: skip
    triton, deepstream = deployed(tmp_path, full_tensorrt_plan(tmp_path, [dynamic], detection_outputs(-1)))
    config = triton_model_config(triton)
    from tritonclient.grpc import model_config_pb2

    assert config.max_batch_size == 4
    assert tensors(config.input, model_config_pb2) == [("images", "TYPE_FP32", [3, 64, 96])]
    # one count per image: dims [1] reshaped to a scalar, Triton's spelling of a tensor that is only the batch
    assert tensors(config.output, model_config_pb2)[:2] == [
        ("num_detections", "TYPE_INT32", [1]),
        ("boxes", "TYPE_FP32", [100, 4]),
    ]
    assert config.output[0].HasField("reshape") and list(config.output[0].reshape.shape) == []
    assert nvinfer_property(deepstream)["batch-size"] == "4"


def test_a_tensorrt_rtx_plan_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    plan = write_plan(tmp_path / "engine_fp32.plan", preprocess=PREPROCESS, classes=[{"label": 1, "name": "a"}])
    assert PlanMetadata.read(metadata_path(plan)).backend == "tensorrt_rtx"
    with pytest.raises(DeployError) as refused:
        deployed(tmp_path, plan)
    message = str(refused.value)
    assert "\n" not in message
    assert "tensorrt_rtx 1.7.1.116 plan" in message and "load only full TensorRT plans" in message
    assert "backend: tensorrt" in message and str(metadata_path(plan)) in message
    assert not (tmp_path / "deploy").exists()


def test_a_plan_of_other_bytes_than_its_json_is_refused(tmp_path):
    plan = full_tensorrt_plan(tmp_path)
    plan.write_bytes(b"another plan")
    with pytest.raises(DeployError, match="is not the plan .* describes"):
        deployed(tmp_path, plan)


def nvinfer_property(config: Path, section: str = "property") -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read_string(config.read_text())
    return parser[section]


def nvinfer_preprocess(canvas_bgr: np.ndarray, config: Path) -> np.ndarray:
    """nvinfer's y = net-scale-factor * (x - offsets[c]) on the letterboxed 0..255 pixels in model-color-format's
    order (0: RGB, 1: BGR), CHW, with the values its config holds."""
    settings = nvinfer_property(config)
    pixels = canvas_bgr[..., ::-1] if settings["model-color-format"] == "0" else canvas_bgr
    offsets = np.array([float(value) for value in settings["offsets"].split(";")], np.float64)
    return (float(settings["net-scale-factor"]) * (pixels.astype(np.float64) - offsets)).transpose(2, 0, 1)


def letterboxed_test_image() -> np.ndarray:
    image = np.random.default_rng(0).integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    return resize_with_ratio(image, (64, 96), pad_value=0)[0]  # the pixels nvinfer normalises, padding included


@pytest.mark.parametrize("color", ["rgb", "bgr"])
def test_nvinfers_scale_and_offsets_reproduce_trtflows_preprocessing_where_std_is_one_number(tmp_path, color):
    preprocess = {**PREPROCESS, "color": color, "std": [0.25, 0.25, 0.25]}
    _, deepstream = deployed(tmp_path, full_tensorrt_plan(tmp_path, preprocess=preprocess))
    canvas = letterboxed_test_image()
    expected = normalize(canvas, color, preprocess["mean"], preprocess["std"])
    np.testing.assert_allclose(nvinfer_preprocess(canvas, deepstream), expected, rtol=0, atol=2e-6)
    assert nvinfer_property(deepstream)["model-color-format"] == {"rgb": "0", "bgr": "1"}[color]
    assert "NOT EXPRESSIBLE" not in deepstream.read_text()


def test_a_per_channel_std_is_written_for_the_mean_std_and_said(tmp_path):
    """ImageNet's std (0.229, 0.224, 0.225): one net-scale-factor for 0.226, so each channel comes out scaled by
    std[c] / 0.226; the config says so."""
    _, deepstream = deployed(tmp_path, full_tensorrt_plan(tmp_path))
    canvas = letterboxed_test_image()
    expected = normalize(canvas, "rgb", PREPROCESS["mean"], PREPROCESS["std"])
    factors = np.array([0.229, 0.224, 0.225]) / 0.226
    np.testing.assert_allclose(factors, [1.013274, 0.991150, 0.995575], atol=1e-6)
    np.testing.assert_allclose(nvinfer_preprocess(canvas, deepstream), expected * factors[:, None, None], atol=2e-6)
    assert np.abs(nvinfer_preprocess(canvas, deepstream) - expected).max() > 0.02  # not trtflow's: hence the note
    text = deepstream.read_text()
    assert "NOT EXPRESSIBLE: std per channel [0.229, 0.224, 0.225]" in text
    assert "1.0133, 0.9912, 0.9956" in text


def test_the_deepstream_config_names_the_parser_its_outputs_need(tmp_path):
    _, int32_classes = deployed(tmp_path / "int32", full_tensorrt_plan(tmp_path / "int32"))
    settings = nvinfer_property(int32_classes)
    assert settings["output-blob-names"] == "num_detections;boxes;scores;classes"
    assert (settings["num-detected-classes"], settings["cluster-mode"], settings["network-mode"]) == ("4", "4", "2")
    # int32 classes: the bundled parser (float32 classes) would read every label as 0, so it stays commented out
    assert "parse-bbox-func-name" not in settings
    assert "# parse-bbox-func-name=NvDsInferParseYoloV5CustomBatchedNMSTLT" in int32_classes.read_text()
    assert (int32_classes.parent / "labels.txt").read_text().splitlines()[1:] == ["circle", "rectangle", "triangle"]
    assert settings["model-engine-file"] == "../../../engine_fp16.plan"
    assert (int32_classes.parent / settings["model-engine-file"]).read_bytes() == b"plan bytes"

    float_plan = full_tensorrt_plan(tmp_path / "float", outputs=detection_outputs(1, classes_dtype="FLOAT"))
    _, float_classes = deployed(tmp_path / "float", float_plan)
    assert nvinfer_property(float_classes)["parse-bbox-func-name"] == "NvDsInferParseYoloV5CustomBatchedNMSTLT"
    assert nvinfer_property(float_classes, "class-attrs-all")["pre-cluster-threshold"] == "0.05"


def test_a_plan_without_the_four_detection_outputs_is_refused_for_deepstream(tmp_path):
    outputs = [*detection_outputs(1), {"name": "p2", "dtype": "FLOAT", "shape": [1, 256, 16, 24]}]
    with pytest.raises(DeployError, match=r"read the outputs .* in this order, this plan has .*'p2'"):
        deployed(tmp_path, full_tensorrt_plan(tmp_path, outputs=outputs))
