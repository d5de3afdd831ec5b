import pytest
import torch
from safetensors.torch import save_file

from trtflow.common.model import CheckpointError, build_detector, load_detector, run_detector, save_validated_checkpoint


def test_demo_detector_fits_the_shipped_size_budget(config):
    model = build_detector(config["model"])
    megabytes = sum(p.numel() * p.element_size() for p in model.state_dict().values()) / 1e6
    assert megabytes <= 15


def test_checkpoint_round_trip_and_info(tmp_path, small_model_cfg):
    torch.manual_seed(0)
    model = build_detector(small_model_cfg).eval()
    source = tmp_path / "source.pt"
    torch.save({"model": model.state_dict()}, source)
    info = save_validated_checkpoint(small_model_cfg, source, tmp_path / "ckpt.safetensors", tmp_path / "model.json")
    assert info["num_classes"] == small_model_cfg["num_classes"] and len(info["sha256"]) == 64
    reloaded = load_detector(small_model_cfg, tmp_path / "ckpt.safetensors")
    images = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        a, b = run_detector(model, images), run_detector(reloaded, images)
    assert torch.equal(a[0]["boxes"], b[0]["boxes"]) and torch.equal(a[0]["scores"], b[0]["scores"])


def test_class_count_mismatch_names_both_numbers_and_the_fix(tmp_path, small_model_cfg):
    other = build_detector({**small_model_cfg, "num_classes": 7})
    path = tmp_path / "seven.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match=r"7 classes.*model.num_classes is 5; set model.num_classes: 7"):
        load_detector(small_model_cfg, path)


def test_missing_unreadable_and_foreign_checkpoints(tmp_path, small_model_cfg):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_detector(small_model_cfg, tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*garbage.pt"):
        load_detector(small_model_cfg, garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"roi_heads.box_predictor.cls_score.weight": torch.zeros(5, 8), "other.weight": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="does not fit model.arch 'demo'"):
        load_detector(small_model_cfg, foreign)


def test_unknown_arch_is_refused(small_model_cfg):
    with pytest.raises(ValueError, match="unknown architecture 'yolo'"):
        build_detector({**small_model_cfg, "arch": "yolo"})
