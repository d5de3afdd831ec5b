"""The features network and its ONNX export (rule `onnx`), gated by ONNX Runtime parity with PyTorch.

`features` = backbone + FPN + RPN head convolutions: where nearly all FLOPs are and what the ONNX
parser takes cleanly. Everything after it is the head that the TensorRT network API builds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch

from trtflow.artifacts import atomic_write, software_versions, write_json
from trtflow.common.model import INPUT_NAME, FeaturesNetwork, level_names, output_names
from trtflow.common.onnxrun import OnnxSession
from trtflow.common.preprocess import preprocess_split


def export_features(
    model,
    input_hw: tuple[int, int],
    out_path: str | Path,
    *,
    opset: int = 18,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    simplify: bool = True,
    metadata: dict | None = None,
) -> onnx.ModelProto:
    """Export `features` to a single-file ONNX: checked, shape-inferred, simplified only where outputs stay identical."""
    model = model.eval()
    names = output_names(level_names(model, input_hw))
    example = torch.randn(batch_size, 3, *input_hw, generator=torch.Generator().manual_seed(0))
    dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic_batch else None
    program = torch.onnx.export(
        FeaturesNetwork(model).eval(),
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=names,
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )
    exported = program.model_proto
    if simplify:
        exported = simplified_if_identical(exported, example.numpy())
    exported = onnx.shape_inference.infer_shapes(exported, check_type=True, strict_mode=True)
    for key, value in sorted((metadata or {}).items()):
        exported.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(exported, full_check=True)
    atomic_write(out_path, lambda staging: onnx.save_model(exported, str(staging)))
    return exported


def simplified_if_identical(model: onnx.ModelProto, example: np.ndarray) -> onnx.ModelProto:
    """onnxslim's constant folding / fusion, kept only when every output is bit-identical on `example`."""
    import onnxslim

    slimmed = onnxslim.slim(model)
    before, after = OnnxSession(model)(example), OnnxSession(slimmed)(example)
    identical = before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    return slimmed if identical else model


def features_parity(model, onnx_path: str | Path, images: np.ndarray, tolerance: float) -> dict:
    """ONNX Runtime (CPU) vs PyTorch on the same preprocessed images, per output and overall.

    An output passes when its max abs error is <= tolerance * max|reference|.
    """
    with torch.no_grad():
        reference = [t.numpy() for t in FeaturesNetwork(model.eval())(torch.from_numpy(images))]
    onnx_outputs = OnnxSession(onnx_path)(images)
    outputs = {}
    for name, expected in zip(onnx_outputs, reference):
        error = float(np.abs(onnx_outputs[name] - expected).max())
        scale = float(np.abs(expected).max())
        outputs[name] = {"max_abs": error, "max_rel": error / scale if scale else error, "ref_max": scale}
    passed = all(o["max_abs"] <= tolerance * o["ref_max"] for o in outputs.values())
    return {
        "images": int(images.shape[0]),
        "tolerance": tolerance,
        "outputs": outputs,
        "max_abs": max(o["max_abs"] for o in outputs.values()),
        "passed": passed,
        "executor": "onnxruntime-cpu",
    }


class ParityError(RuntimeError):
    """ONNX Runtime disagrees with PyTorch beyond the configured tolerance."""


def check_parity(
    model, onnx_path, coco_json, preprocess_cfg: dict, num_images: int, tolerance: float, out_path
) -> dict:
    """The parity gate: the first `num_images` val images through the shared preprocessing, numbers to `out_path`.

    Fails (after writing the numbers to the log) when any output is off by more than the tolerance.
    """
    images = preprocess_split(coco_json, preprocess_cfg, num_images)
    report = {**features_parity(model, onnx_path, images, tolerance), "software": software_versions()}
    print(json.dumps(report, indent=2))
    if not report["passed"]:
        worst = max(report["outputs"].items(), key=lambda item: item[1]["max_rel"])
        raise ParityError(
            f"{onnx_path}: ONNX Runtime differs from PyTorch on output {worst[0]!r} by {worst[1]['max_abs']:.3g} "
            f"({worst[1]['max_rel']:.3g} of max|ref|) > verify.parity_tolerance {tolerance}; the export is not "
            f"faithful: try onnx.simplify: false or another onnx.opset"
        )
    write_json(out_path, report)
    return report
