"""INT8 calibration (trtflow.build.calibrate): histograms, thresholds, the TensorRT cache, the stage end to end."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from trtflow.backend.implicit_int8 import CALIBRATORS
from trtflow.build.calibrate import (
    NUM_BINS,
    AbsHistogram,
    calibration_table,
    collect_histograms,
    compute_amax,
    entropy_amax,
    percentile_amax,
)
from trtflow.common.images import BadImageError
from trtflow.formats.calibration_table import (
    ALGORITHMS,
    CalibrationTable,
    format_calibration_table,
    parse_calibration_table,
    read_calibration_table,
    scale_hex,
    tensorrt_version_tag,
    version_tag,
    write_calibration_table,
)


def histogram_of(samples: np.ndarray, chunks: int = 1) -> AbsHistogram:
    histogram = AbsHistogram()
    for chunk in np.array_split(samples.astype(np.float32), chunks):
        histogram.add(chunk.copy())
    return histogram


def looped_entropy_amax(counts: np.ndarray, bin_width: float, amax: float, levels: int = 128) -> float:
    """EntropyCalibration2 written out plainly: one threshold at a time, one bin at a time."""
    counts = [float(c) for c in counts]
    counts[0] = counts[1]
    n = len(counts)
    best_i, best_kl = None, math.inf
    for i in range(levels, n + 1):
        reference = counts[:i]
        reference[i - 1] += sum(counts[i:])
        level_of = [j * levels // i for j in range(i)]
        level_count, level_nonzero = [0.0] * levels, [0] * levels
        for j in range(i):
            level_count[level_of[j]] += counts[j]
            level_nonzero[level_of[j]] += counts[j] > 0
        candidate = [level_count[level_of[j]] / level_nonzero[level_of[j]] if counts[j] > 0 else 0.0 for j in range(i)]
        p_total, q_total = sum(reference), sum(candidate)
        kl = 0.0
        for p, q in zip(reference, candidate):
            if p > 0:
                kl = math.inf if q == 0 else kl + p / p_total * math.log((p / p_total) / (q / q_total))
        if kl <= best_kl:  # ties: the largest threshold
            best_i, best_kl = i, kl
    return min(best_i * bin_width, amax)


SYNTHETIC = {
    "half_normal": lambda rng: rng.standard_normal(200_000),
    "relu_normal": lambda rng: np.maximum(rng.standard_normal(200_000), 0),
    "laplace_with_outliers": lambda rng: np.concatenate([rng.laplace(0, 1, 200_000), rng.uniform(-40, 40, 20)]),
    # few samples over many bins: empty bins, KL = inf candidates (and the method's known taste for
    # cutting sparse histograms at their first samples)
    "sparse_bimodal": lambda rng: np.concatenate([rng.normal(1, 0.05, 3000), rng.normal(6, 0.5, 300)]),
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_entropy_matches_looped_reference(name):
    histogram = histogram_of(SYNTHETIC[name](np.random.default_rng(0)))
    width = histogram.range / histogram.num_bins
    expected = looped_entropy_amax(histogram.counts, width, histogram.amax)
    assert entropy_amax(histogram) == pytest.approx(expected, rel=0.01)
    assert 128 * width <= entropy_amax(histogram) <= histogram.amax


def test_entropy_clips_outliers_and_keeps_uniform():
    rng = np.random.default_rng(1)
    outliers = histogram_of(np.concatenate([rng.standard_normal(500_000), [60.0]]))
    assert 3.0 < entropy_amax(outliers) < 10.0  # far below the one outlier at 60
    uniform = histogram_of(rng.uniform(-1, 1, 500_000))
    assert entropy_amax(uniform) > 0.95


def test_histogram_growth_rebins_exactly():
    """Growing the range merges bins exactly: same counts as one histogram over the final range."""
    rng = np.random.default_rng(2)
    batches = [rng.normal(0, scale, 50_000).astype(np.float32) for scale in (0.5, 0.4, 3.0, 1.0, 7.5)]
    streamed = AbsHistogram()
    for batch in batches:
        streamed.add(batch.copy())
    everything = np.abs(np.concatenate(batches))
    assert streamed.amax == everything.max()
    assert everything.max() <= streamed.range < 2 * everything.max()
    direct = np.bincount(
        np.minimum((everything * np.float32(NUM_BINS / streamed.range)).astype(np.int64), NUM_BINS - 1),
        minlength=NUM_BINS,
    )
    assert streamed.counts.sum() == everything.size
    assert np.abs(streamed.counts - direct).sum() <= 4  # float32 rounding at bin edges only


def test_histogram_zeros_first_then_values():
    histogram = AbsHistogram()
    histogram.add(np.zeros(100, np.float32))
    histogram.add(np.array([0.5, -1.0], np.float32))
    assert histogram.counts[0] == 100 and histogram.counts.sum() == 102 and histogram.amax == 1.0


def test_histogram_rejects_nan():
    with pytest.raises(ValueError, match="conv7_out holds NaN"):
        AbsHistogram().add(np.array([1.0, np.nan], np.float32), "conv7_out")


def test_minmax_and_percentile():
    samples = np.random.default_rng(3).standard_normal(1_000_000)
    histogram = histogram_of(samples, chunks=4)
    assert compute_amax({"x": histogram}, "minmax")["x"] == np.float32(np.abs(samples).max())
    width = histogram.range / histogram.num_bins
    assert abs(percentile_amax(histogram, 99.99) - np.percentile(np.abs(samples), 99.99)) <= width
    assert percentile_amax(histogram, 100) == histogram.amax
    with pytest.raises(ValueError, match="unknown calibration algorithm 'kl'"):
        compute_amax({"x": histogram}, "kl")


def test_threshold_search_is_fast():
    """204 tensors (the mobilenet-v3 FPN features) in well under ORT's 99 s: vectorised, not looped."""
    import time

    histogram = histogram_of(np.random.default_rng(4).laplace(0, 1, 100_000))
    start = time.perf_counter()
    compute_amax({f"t{i}": histogram for i in range(20)}, "entropy")
    assert (time.perf_counter() - start) / 20 < 0.1


# --- the TensorRT calibration cache ---------------------------------------------------------------------------


def test_scale_bits_are_big_endian_float32_hex():
    assert scale_hex(np.float32(1.0) / np.float32(127)) == "3c010204"  # an amax of 1.0, as TensorRT writes it
    assert struct.unpack(">f", bytes.fromhex(scale_hex(0.5)))[0] == 0.5


def test_table_round_trip_and_header(tmp_path):
    amax = {"images": 2.64, "/backbone/conv1/Conv_output_0": 11.3, "(Unnamed Layer* 3) [Shuffle]_output": 0.0}
    table = calibration_table(amax, "entropy", "100300")
    path = tmp_path / "int8calib.table"
    write_calibration_table(path, table)
    text = path.read_text()
    assert text.splitlines()[0] == "TRT-100300-EntropyCalibration2"
    assert text.splitlines()[2] == f"/backbone/conv1/Conv_output_0: {scale_hex(np.float32(11.3) / np.float32(127))}"
    back = read_calibration_table(path)
    assert back == table and format_calibration_table(back) == text
    assert back.amax()["images"] == pytest.approx(2.64, rel=1e-6)
    assert back.scales["(Unnamed Layer* 3) [Shuffle]_output"] == 1.0  # all-zero tensor: any scale, never 0
    assert calibration_table(amax, "minmax", "8601").header == "TRT-8601-MinMaxCalibration"
    assert calibration_table(amax, "percentile", "8601").header == "TRT-8601-MinMaxCalibration"


def test_table_reader_names_bad_lines():
    with pytest.raises(ValueError, match="first line must be a TensorRT cache header"):
        parse_calibration_table("conv1: 3c010204\n")
    with pytest.raises(ValueError, match="line 3: expected"):
        parse_calibration_table("TRT-100300-EntropyCalibration2\nconv1: 3c010204\nconv2 3c010204\n")
    assert parse_calibration_table("TRT-7000-EntropyCalibration2\ndata: 3c008912\n") == CalibrationTable(
        "7000", "EntropyCalibration2", {"data": struct.unpack(">f", bytes.fromhex("3c008912"))[0]}
    )


def test_every_table_header_names_a_tensorrt_calibrator(tmp_path):
    """TensorRT 10 reads a cache only through the calibrator whose algorithm (IInt8Calibrator::getAlgorithm,
    NvInfer.h) the header `TRT-<version>-<algorithm>` names, and skips it otherwise (NVIDIA/TensorRT#1378): each
    calibration.algorithm writes a header a calibrator class reads; a table naming another algorithm is refused
    on reading, with the file, the header and the fix."""
    headers = {algorithm: calibration_table({"images": 2.0}, algorithm, "101600").algorithm for algorithm in ALGORITHMS}
    assert {algorithm: CALIBRATORS[header].algorithm_type for algorithm, header in headers.items()} == {
        "entropy": "ENTROPY_CALIBRATION_2",
        "minmax": "MINMAX_CALIBRATION",
        "percentile": "MINMAX_CALIBRATION",
    }
    path = tmp_path / "int8calib.table"
    path.write_text("TRT-101600-LegacyCalibration\nimages: 3c010a14\n")
    with pytest.raises(
        ValueError,
        match=rf"^{path}: header 'TRT-101600-LegacyCalibration' names calibration algorithm 'LegacyCalibration', "
        r"which no calibrator trtflow uses reads .*: use a table with EntropyCalibration2 or MinMaxCalibration",
    ):
        read_calibration_table(path)


def test_version_tag():
    assert version_tag("10.3.0.26") == "100300"
    assert version_tag("10.16.0") == "101600"
    assert version_tag("8.6.1.6") == "8601"
    assert version_tag("7.0") == "7000"


# --- collection and the stage -----------------------------------------------------------------------------


def test_collection_uses_the_qdq_plan_and_streams():
    from test_qdq import INPUT_SHAPE, resnet_like_model
    from trtflow.common.qdq import quantization_plan

    model = resnet_like_model()
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((2, *INPUT_SHAPE[1:])).astype(np.float32) for _ in range(3)]
    statistics = collect_histograms(model, iter(batches), progress=False)
    assert list(statistics.histograms) == quantization_plan(model).activation_names
    assert statistics.num_images == 6
    images = statistics.histograms["images"]
    assert images.counts.sum() == 6 * np.prod(INPUT_SHAPE[1:]) and images.amax == np.abs(np.stack(batches)).max()
    # ReLU outputs: the zeros land in bin 0, and the batches were not modified by the histograms
    assert statistics.histograms["r1"].counts[0] > 0.3 * statistics.histograms["r1"].counts.sum()
    assert np.abs(np.stack(batches)).max() == images.amax


def write_images(folder, count, seed=0):
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        cv2.imwrite(str(folder / f"img_{i:03d}.png"), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return folder


CALIBRATION = {
    "num_images": 5,
    "batch_size": 2,
    "seed": 0,
    "algorithm": "entropy",
    "percentile": 99.99,
    "tensorrt_version": "101600",
    "keep_float": {"nodes": [], "op_types": []},
}
PREPROCESS = {
    "input": {"height": 32, "width": 32},
    "color": "rgb",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "pad_value": 0,
}


@pytest.fixture
def features_onnx(tmp_path):
    import onnx

    from test_qdq import resnet_like_model

    path = tmp_path / "features.onnx"
    onnx.save(resnet_like_model(), str(path))
    return path


def run_stage(features_onnx, images, out, **overrides):
    from trtflow.build.calibrate import calibrate_features

    return calibrate_features(
        features_onnx,
        images,
        table_path=out / "int8calib.table",
        ranges_path=out / "ranges.json",
        qdq_path=out / "features.qdq.onnx",
        calibration={**CALIBRATION, **overrides},
        preprocess=PREPROCESS,
    )


def test_stage_outputs_are_deterministic(tmp_path, features_onnx):
    images = write_images(tmp_path / "images", 8)
    first, second = tmp_path / "run1", tmp_path / "run2"
    document = run_stage(features_onnx, images, first)
    run_stage(features_onnx, images, second)
    for name in ("int8calib.table", "ranges.json", "features.qdq.onnx"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert sorted(path.name for path in first.iterdir()) == ["features.qdq.onnx", "int8calib.table", "ranges.json"]
    ranges = json.loads((first / "ranges.json").read_text())
    assert ranges == document
    assert set(ranges) == {"algorithm", "qdq_placement", "num_images", "images_sha256", "tensors", "software"}
    assert ranges["qdq_placement"] == "trtflow"
    assert ranges["num_images"] == 5 and len(ranges["images_sha256"]) == 64
    table = read_calibration_table(first / "int8calib.table")
    assert table.algorithm == "EntropyCalibration2"
    assert table.version == tensorrt_version_tag("101600")  # the installed TensorRT's, else the config value
    assert list(table.scales) == list(ranges["tensors"])
    for name, entry in ranges["tensors"].items():
        assert entry["scale"] == table.scales[name] == float(np.float32(entry["amax"]) / np.float32(127))


def test_stage_subset_is_seeded(tmp_path):
    from trtflow.build.calibrate import select_calibration_images

    images = write_images(tmp_path / "images", 10)
    chosen = select_calibration_images(images, 4, seed=0)
    assert chosen == select_calibration_images(images, 4, seed=0) and len(chosen) == 4
    assert chosen != select_calibration_images(images, 4, seed=1)
    assert chosen == sorted(chosen)


def test_more_images_than_available_warns_and_uses_all(tmp_path):
    from trtflow.build.calibrate import select_calibration_images

    images = write_images(tmp_path / "images", 3)
    with pytest.warns(UserWarning, match="num_images = 50 but .* has only 3 images"):
        assert len(select_calibration_images(images, 50, seed=0)) == 3


def test_empty_calibration_set_fails_clearly(tmp_path, features_onnx):
    (tmp_path / "calib_set").mkdir()
    with pytest.raises(ValueError, match="calib_set.*no image files"):
        run_stage(features_onnx, tmp_path / "calib_set", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreadable_calibration_image_fails_clearly(tmp_path, features_onnx):
    images = write_images(tmp_path / "images", 3)
    (images / "img_001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(BadImageError, match="img_001.png"):
        run_stage(features_onnx, images, tmp_path / "out", num_images=3)
    assert not (tmp_path / "out").exists()


def test_collection_refuses_a_batch_that_misfits_a_static_batch(tmp_path):
    """Padding a short batch would count copies of an image twice, so calibration refuses it instead."""
    import onnx

    from test_qdq import resnet_like_model

    model = resnet_like_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # a static batch of 2
    path = tmp_path / "static2.onnx"
    onnx.save(model, str(path))
    batch = np.zeros((3, 3, 32, 32), np.float32)
    with pytest.raises(
        ValueError,
        match=r"static2\.onnx takes batches of exactly 2 images, got a batch of 3: make "
        r"calibration\.batch_size and the number of calibration images multiples of 2",
    ):
        collect_histograms(path, iter([batch]), progress=False)
