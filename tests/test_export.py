import numpy as np
import onnx
import pytest
import torch

from trtflow.build.export import export_features, features_parity
from trtflow.common.model import TORCHVISION_ARCHS, build_detector, level_names, output_names


def exported(tmp_path, model_cfg, **kwargs):
    torch.manual_seed(0)
    model = build_detector(model_cfg).eval()
    hw = (model_cfg["input"]["height"], model_cfg["input"]["width"])
    path = tmp_path / "features.onnx"
    proto = export_features(model, hw, path, metadata={"trtflow.checkpoint_sha256": "abc"}, **kwargs)
    return model, path, proto


def test_demo_features_outputs_and_parity(tmp_path, small_model_cfg):
    model, path, proto = exported(tmp_path, small_model_cfg)
    levels = ["p2", "p3", "p4", "p5", "pool"]
    assert level_names(model, (128, 160)) == levels
    assert [o.name for o in proto.graph.output] == output_names(levels)
    assert [o.name for o in proto.graph.output][5:7] == ["objectness_p2", "deltas_p2"]
    assert {p.key: p.value for p in proto.metadata_props}["trtflow.checkpoint_sha256"] == "abc"
    assert proto.opset_import[0].version >= 17
    images = np.random.default_rng(0).standard_normal((2, 3, 128, 160)).astype(np.float32)
    report = features_parity(model, path, images, 1e-4)
    assert report["passed"] and report["images"] == 2
    assert all(o["max_abs"] <= 1e-4 * o["ref_max"] for o in report["outputs"].values())


def test_dynamic_batch_axis(tmp_path, small_model_cfg):
    _, path, proto = exported(tmp_path, small_model_cfg, dynamic_batch=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(["p2"], {"images": np.zeros((3, 3, 128, 160), np.float32)})
    assert outputs[0].shape == (3, 64, 32, 40)


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_torchvision_arch_parity_with_random_weights(tmp_path, small_model_cfg, arch):
    model, path, proto = exported(tmp_path, {**small_model_cfg, "arch": arch, "input": {"height": 128, "width": 128}})
    onnx.checker.check_model(proto, full_check=True)
    images = np.random.default_rng(1).standard_normal((1, 3, 128, 128)).astype(np.float32)
    report = features_parity(model, path, images, 1e-4)
    assert report["passed"], report["outputs"]


def test_parity_gate_fails_with_the_output_named(tmp_path, small_model_cfg, config, monkeypatch):
    model, path, _ = exported(tmp_path, small_model_cfg)
    with torch.no_grad():
        model.rpn.head.cls_logits.bias += 1.0  # PyTorch now disagrees with the exported graph
    images = np.random.default_rng(0).standard_normal((1, 3, 128, 160)).astype(np.float32)
    report = features_parity(model, path, images, 1e-4)
    assert not report["passed"]
    failing = {name for name, o in report["outputs"].items() if o["max_abs"] > 1e-4 * o["ref_max"]}
    assert failing == {f"objectness_{level}" for level in ("p2", "p3", "p4", "p5", "pool")}


def scaled_graph(batch: int | str) -> onnx.ModelProto:
    """images (batch, 3, 4, 4) -> doubled -> plus one: a graph with an intermediate tensor `doubled`."""
    from onnx import TensorProto, helper

    shape = [batch, 3, 4, 4]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["images", "images"], ["doubled"]),
            helper.make_node("Add", ["doubled", "one"], ["out"]),
        ],
        "scaled",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_onnx_session_chunks_a_static_batch_and_exposes_intermediates(tmp_path):
    from trtflow.common.onnxrun import OnnxSession

    path = tmp_path / "static2.onnx"
    onnx.save(scaled_graph(2), str(path))
    images = np.arange(6 * 48, dtype=np.float32).reshape(6, 3, 4, 4)
    session = OnnxSession(path, extra_outputs=["doubled"])
    assert session.static_batch == 2 and session.names == ["out", "doubled"]
    outputs = session(images)  # three runs of 2, concatenated
    np.testing.assert_array_equal(outputs["out"], 2 * images + 1)
    np.testing.assert_array_equal(session(images, ["doubled"])["doubled"], 2 * images)
    assert OnnxSession(scaled_graph("batch"))(images[:5])["out"].shape == (5, 3, 4, 4)


def test_onnx_session_pads_a_short_static_batch_and_names_a_missing_file(tmp_path):
    from trtflow.common.onnxrun import OnnxSession

    path = tmp_path / "static2.onnx"
    onnx.save(scaled_graph(2), str(path))
    images = np.arange(3 * 48, dtype=np.float32).reshape(3, 3, 4, 4)
    np.testing.assert_array_equal(OnnxSession(path)(images)["out"], 2 * images + 1)  # 2 + (1 padded to 2)
    no_batch_axis = scaled_graph(2)
    no_batch_axis.graph.node.append(onnx.helper.make_node("ReduceSum", ["out"], ["total"], keepdims=0))
    no_batch_axis.graph.output.append(onnx.helper.make_tensor_value_info("total", onnx.TensorProto.FLOAT, []))
    session = OnnxSession(no_batch_axis)
    assert session(images[:2])["total"].shape == ()  # a full batch passes every output through untouched
    with pytest.raises(
        ValueError,
        match=r"output total of shape \[\] has no batch axis first, so a short batch "
        r"cannot be padded to 2",
    ):
        session(images)
    with pytest.raises(
        FileNotFoundError, match=r"missing\.onnx does not exist; build it first \(snakemake .*missing\.onnx\)"
    ):
        OnnxSession(tmp_path / "missing.onnx")
