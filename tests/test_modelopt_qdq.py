"""calibration.qdq_placement: modelopt (trtflow.build.modelopt_qdq); the stage tests run only where ModelOpt is installed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from test_calibrate import PREPROCESS, features_onnx, run_stage, write_images  # noqa: F401  (features_onnx: a fixture)
from test_qdq import resnet_like_model
from trtflow.build.calibrate import image_batches
from trtflow.build.modelopt_qdq import activation_amax, modelopt_method
from trtflow.common.onnxrun import OnnxSession
from trtflow.formats.calibration_table import read_calibration_table

# The convs of test_qdq.resnet_like_model that ModelOpt quantizes: not b1_conv1/b1_conv2, whose 8 in and 8 out
# channels its small-conv rule leaves in float (modelopt graph_utils.find_nodes_from_convs_to_exclude).
CONVS = {"stem_conv", "b2_conv1", "b2_conv2", "b2_shortcut", "head_conv", "lateral_conv"}


@pytest.fixture
def modelopt():
    return pytest.importorskip(
        "modelopt.onnx.quantization", reason='NVIDIA ModelOpt is not installed (pip install -e ".[modelopt]")'
    )


def test_percentile_is_refused_naming_the_fix():
    assert modelopt_method("entropy") == "entropy" and modelopt_method("minmax") == "max"
    with pytest.raises(
        ValueError,
        match=r"calibration\.algorithm: percentile is not offered by ModelOpt .*set "
        r"calibration\.algorithm to entropy or minmax, or calibration\.qdq_placement: trtflow",
    ):
        modelopt_method("percentile")


def int8_weight_readers(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes that read a weight through QuantizeLinear -> DequantizeLinear."""
    initializers = {t.name for t in model.graph.initializer}
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in initializers}
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quantized}
    return {n.name for n in model.graph.node if dequantized & set(n.input)}


def test_stage_with_modelopt_placement(tmp_path, modelopt):
    features = resnet_like_model()
    features.metadata_props.add(key="trtflow.checkpoint_sha256", value="0123abcd")
    # a graph output that a conv also reads, like the FPN maps the head reads: ModelOpt renames it when it quantizes it
    features.graph.output.append(onnx.helper.make_tensor_value_info("o2", onnx.TensorProto.FLOAT, (1, 16, 16, 16)))
    onnx.save(features, str(tmp_path / "features.onnx"))
    images = write_images(tmp_path / "images", 8)
    out = tmp_path / "out"
    document = run_stage(
        tmp_path / "features.onnx", images, out, num_images=8, algorithm="minmax", qdq_placement="modelopt"
    )
    qdq = onnx.load(str(out / "features.qdq.onnx"))
    # ModelOpt drops metadata; the engine stage needs the checkpoint's sha256 to match the head weights
    assert {p.key: p.value for p in qdq.metadata_props} == {"trtflow.checkpoint_sha256": "0123abcd"}
    ops = Counter(node.op_type for node in qdq.graph.node)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] > len(CONVS)
    assert int8_weight_readers(qdq) == CONVS  # and the Gemm on a 1x16 vector stays float (its GEMV rule)
    # ranges.json and int8calib.table carry exactly the activation scales of the Q/DQ graph
    amax = activation_amax(qdq, features, "test")
    table = read_calibration_table(out / "int8calib.table")
    assert document["qdq_placement"] == "modelopt" and document["num_images"] == 8
    assert list(document["tensors"]) == list(table.scales) == list(amax)
    assert {"images", "o2"} <= set(amax) and table.algorithm == "MinMaxCalibration"
    # every name is a tensor of the unquantized graph, with the scale of its QuantizeLinear in the Q/DQ graph
    initializers = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    scales = sorted(
        float(initializers[n.input[1]])
        for n in qdq.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in initializers
    )
    assert set(amax) <= {name for node in features.graph.node for name in node.output} | {"images"}
    assert sorted(table.scales.values()) == scales
    # on a calibration image, the simulated quantization stays close to float in ONNX Runtime
    image = next(image_batches(sorted(images.iterdir())[:1], 1, PREPROCESS))
    reference, simulated = OnnxSession(features)(image), OnnxSession(qdq)(image)
    for name, expected in reference.items():
        error = np.abs(simulated[name] - expected).max() / np.abs(expected).max()
        assert 1e-4 < error < 0.05, name  # measured: logits 0.005, p 0.022


def test_keep_float_reaches_modelopt(tmp_path, features_onnx, modelopt):  # noqa: F811
    images = write_images(tmp_path / "images", 4)
    run_stage(
        features_onnx,
        images,
        tmp_path / "out",
        num_images=4,
        qdq_placement="modelopt",
        keep_float={"nodes": ["head_*"], "op_types": ["ConvTranspose"]},
    )
    qdq = onnx.load(str(tmp_path / "out" / "features.qdq.onnx"))
    assert int8_weight_readers(qdq) == CONVS - {"head_conv"}


def test_modelopt_qdq_builds_with_tensorrt_rtx(tmp_path, features_onnx, modelopt):  # noqa: F811
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu13) is not installed")
    images = write_images(tmp_path / "images", 4)
    run_stage(features_onnx, images, tmp_path / "out", num_images=4, qdq_placement="modelopt")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((tmp_path / "out" / "features.qdq.onnx").read_bytes()), [
        str(parser.get_error(i)) for i in range(parser.num_errors)
    ]
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    assert plan is not None and plan.nbytes > 10_000
