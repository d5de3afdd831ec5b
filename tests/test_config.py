import copy
import importlib.util
from dataclasses import fields

import pytest
import yaml

from conftest import ROOT
from trtflow.backend import CHOICES as BACKEND_CHOICES
from trtflow.build.engine import INT8_MODES, QUANTIZED_FLOATS
from trtflow.build.head_network import HEAD_OPTIONS
from trtflow.common.coco import BAD_IMAGE_POLICIES
from trtflow.common.model import ARCHS
from trtflow.config import SCHEMA, ConfigError, check_config
from trtflow.formats.calibration_table import ALGORITHMS
from trtflow.precisions import PRECISIONS
from trtflow.run.bench import EXECUTORS
from trtflow.run.levels import LEVELS
from trtflow.run.verify import Thresholds

RAW = yaml.safe_load((ROOT / "config.yaml").read_text())


def checked(mutate):
    config = copy.deepcopy(RAW)
    mutate(config)
    check_config(config, workdir=ROOT)
    return config


def test_a_source_checkout_reads_the_workflows_schema():
    # tests/test_install.py: an installed trtflow reads the copy its wheel ships
    assert SCHEMA == ROOT / "workflow/schemas/config.schema.yaml"


def test_a_missing_schema_is_named(tmp_path):
    with pytest.raises(ConfigError, match=rf"the config schema {tmp_path}/none.yaml does not exist: .* reinstall it"):
        check_config(copy.deepcopy(RAW), workdir=ROOT, schema=tmp_path / "none.yaml")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c: c["model"]["input"].update(height=-320),
            r"model\.input\.height: -320 is less than the minimum of 32",
        ),
        (lambda c: c["model"]["input"].update(width=333), r"model\.input\.width: 333 is not a multiple of 32"),
        (lambda c: c["model"].update(arch="yolo"), r"model\.arch: 'yolo' is not one of \['demo'"),
        (
            lambda c: c["model"]["rpn"].update(pre_nms_top_n="many"),
            r"model\.rpn\.pre_nms_top_n: 'many' is not of type 'integer'",
        ),
        (lambda c: c.update(backend="onnx"), r"backend: 'onnx' is not one of"),
        (
            lambda c: c["postprocess"].update(iou_thresh=1.5),
            r"postprocess\.iou_thresh: 1\.5 is greater than the maximum of 1",
        ),
        (
            lambda c: c["data"].update(surprise=True),
            r"data: Additional properties are not allowed \('surprise' was unexpected\)",
        ),
        (lambda c: c["model"].update(num_classes=1), r"model\.num_classes: 1 is less than the minimum of 2"),
        (
            lambda c: c["verify"]["thresholds"]["fp16"].update(max_abs_dscore=-0.01),
            r"verify\.thresholds\.fp16\.max_abs_dscore: -0\.01 is less than the minimum of 0",
        ),
        (
            lambda c: c["calibration"].update(qdq_placement="onnxruntime"),
            r"calibration\.qdq_placement: 'onnxruntime' is not one of \['trtflow', 'modelopt'\]",
        ),
    ],
)
def test_schema_rejects_bad_values_naming_the_key(mutate, message):
    with pytest.raises(ConfigError, match=message):
        checked(mutate)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c: c["model"].update(checkpoint="models/missing.pth"),
            r"model\.checkpoint: models/missing\.pth does not exist",
        ),
        (
            lambda c: c["model"].update(checkpoint="train", arch="fasterrcnn_resnet50_fpn"),
            r"`train` only trains the demo",
        ),
        (
            lambda c: c["data"].update(source="coco", images="no/such/folder"),
            r"data\.images: no/such/folder is not a folder",
        ),
        (
            lambda c: c["data"].update(source="coco", images="tests", annotations="no.json"),
            r"data\.annotations: no\.json does not exist",
        ),
        (
            lambda c: c["model"].update(checkpoint="train") or c["data"]["demo"].update(num_train=4),
            r"data\.demo\.num_train: 4 training images make no batch of model\.train\.batch_size 16",
        ),
        (
            lambda c: (
                c.setdefault("onnx", {}).update(batch_size=3)
                or c["engine"].update(batch={"min": 3, "opt": 3, "max": 3})
            ),
            r"calibration\.batch_size: 8 and calibration\.num_images: 64 must be multiples of the features ONNX's static "
            r"batch onnx\.batch_size: 3",
        ),
    ],
)
def test_missing_files_are_named_before_any_job(mutate, message):
    with pytest.raises(ConfigError, match=message):
        checked(mutate)


def test_modelopt_placement_needs_its_methods_and_the_package(monkeypatch):
    with pytest.raises(
        ConfigError,
        match=r"calibration\.algorithm: percentile is not offered by ModelOpt "
        r"\(calibration\.qdq_placement: modelopt\); set calibration\.algorithm to "
        r"entropy or minmax",
    ):
        checked(lambda c: c["calibration"].update(qdq_placement="modelopt", algorithm="percentile"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *rest: None if name == "modelopt" else find_spec(name, *rest)
    )
    with pytest.raises(
        ConfigError,
        match=r"calibration\.qdq_placement: modelopt needs NVIDIA ModelOpt, which is not "
        r"installed; run pip install -e \"\.\[modelopt\]\"",
    ):
        checked(lambda c: c["calibration"].update(qdq_placement="modelopt", algorithm="entropy"))


def test_fp8_for_gpus_without_fp8_is_refused_before_any_job():
    with pytest.raises(
        ConfigError,
        match=r"engine\.rtx\.compute_capabilities: \['8\.6'\] -- fp8 plans need compute capability 8\.9 or later with "
        r"backend tensorrt_rtx \(Ada 8\.9, Hopper 9\.0 \(full TensorRT\), Blackwell 12\.x\); add one of those GPUs' "
        r"compute capabilities to it \(e\.g\. 8\.9, 12\.0\), leave it \[\] \(every target from the least on\), or "
        r"take fp8 out of engine\.precisions",
    ):
        checked(lambda c: c["engine"].update(precisions=["fp32", "fp8"], rtx={"compute_capabilities": ["8.6"]}))
    for targets in (["8.6", "8.9"], [12.0], [], ["current"]):
        checked(lambda c: c["engine"].update(precisions=["fp8"], rtx={"compute_capabilities": targets}))
    checked(lambda c: c["engine"].update(precisions=["fp32", "int8"], rtx={"compute_capabilities": ["8.6"]}))


def test_fp8_needs_trtflows_placement():
    with pytest.raises(
        ConfigError,
        match=r"calibration\.qdq_placement: modelopt writes the features\.qdq\.onnx graph only, "
        r"and fp8 is written from trtflow's placement",
    ):
        checked(
            lambda c: (
                c["engine"].update(precisions=["fp8"]),
                c["calibration"].update(qdq_placement="modelopt", algorithm="entropy"),
            )
        )


def test_defaults_are_filled_in():
    config = checked(lambda c: c.pop("postprocess") and c["model"].pop("box"))
    assert config["postprocess"] == {"score_thresh": 0.05, "iou_thresh": 0.5, "max_detections": 100}
    assert config["model"]["box"]["detections_per_img"] == 100
    assert config["onnx"]["opset"] >= 17 and config["model"]["train"]["epochs"] == 30


def test_the_default_verdicts_bound_recall_precision_and_dscore():
    """fp32 and fp16 pass on more than recall (issue 21): a head that adds detections or moves scores fails; the
    schema's defaults are config.yaml's, so a config without `verify.thresholds` gets the same verdicts."""
    config = checked(lambda c: c["verify"].pop("thresholds"))
    assert config["verify"]["thresholds"] == RAW["verify"]["thresholds"]
    for precision in ("fp32", "fp16"):
        thresholds = Thresholds.from_config(RAW["verify"]["thresholds"][precision])
        assert None not in (thresholds.min_match_recall, thresholds.min_match_precision, thresholds.max_abs_dscore)
    assert Thresholds.from_config(RAW["verify"]["thresholds"]["int8"]).max_map_drop_points == 0.5


def test_the_schema_offers_exactly_the_values_the_library_implements():
    """Each option's values are defined where they are implemented; the schema only repeats them for users."""
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())["properties"]
    engine = schema["engine"]["properties"]
    assert engine["roi_align"]["enum"] == list(HEAD_OPTIONS["roi_align"])
    assert engine["nms"]["enum"] == list(HEAD_OPTIONS["nms"])
    assert engine["int8_mode"]["enum"] == list(INT8_MODES)
    assert engine["quantized_float"]["enum"] == list(QUANTIZED_FLOATS)
    assert engine["precisions"]["items"]["enum"] == list(PRECISIONS)
    assert schema["backend"]["enum"] == list(BACKEND_CHOICES)
    assert schema["calibration"]["properties"]["algorithm"]["enum"] == list(ALGORITHMS)
    assert schema["data"]["properties"]["bad_images"]["enum"] == list(BAD_IMAGE_POLICIES)
    assert schema["bench"]["properties"]["executors"]["items"]["enum"] == list(EXECUTORS)
    assert sorted(schema["verify"]["properties"]["require"]["enum"]) == sorted(LEVELS)
    criteria = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())["definitions"]
    assert criteria["model_settings"]["properties"]["arch"]["enum"] == list(ARCHS)
    assert list(criteria["verify_thresholds"]["properties"]) == [field.name for field in fields(Thresholds)]
