"""INT8 calibration (rule `calibrate`): activation histograms, thresholds, TensorRT calibration cache.

1. Collection: the features ONNX runs in ONNX Runtime (CPU) with every tensor the Q/DQ plan quantizes
   exposed as an extra output; each feeds a streaming histogram of |x| (`AbsHistogram`). Memory is
   bins x tensors plus one batch of activations, whatever the number of images.
2. Thresholds: `entropy` (TensorRT's EntropyCalibration2 method), `minmax`, `percentile`; all
   candidate thresholds of a tensor are scored at once with numpy.
3. Table: TensorRT's calibration cache (`trtflow.formats.calibration_table`), plus `ranges.json`.

Histogram range growth (our choice, documented): a histogram has exactly `num_bins` bins over [0, range).
The first non-zero batch sets range = its max |x|. When a later batch exceeds it, range grows by the
smallest integer factor k that covers the new max and every k neighbouring bins merge into one, which
re-bins exactly (no interpolation) and keeps the bin count fixed. ONNX Runtime and pytorch-quantization
instead append bins of the old width, so their bin count (and memory) is unbounded; the price here is
resolution: after a growth the data fills between half and all of the bins.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from trtflow.artifacts import files_sha256, software_versions, write_json
from trtflow.build.modelopt_qdq import quantize_features
from trtflow.common.coco import list_images
from trtflow.common.images import read_image
from trtflow.common.onnxrun import OnnxSession
from trtflow.common.preprocess import preprocess_batch
from trtflow.common.qdq import (
    CalibratedGraph,
    KeepFloat,
    insert_qdq,
    quantization_plan,
    save_onnx,
    shared_amax,
    symmetric_scale,
)
from trtflow.formats.calibration_table import (
    ALGORITHMS,
    TENSORRT_ALGORITHM,
    CalibrationTable,
    tensorrt_version_tag,
    write_calibration_table,
)
from trtflow.precisions import QuantizedType

log = logging.getLogger(__name__)

NUM_BINS = 2048
NUM_QUANTIZED_BINS = 128  # int8: 127 magnitudes + 0


class AbsHistogram:
    """Streaming histogram of |x| with a fixed number of bins over [0, range) (see the module docstring)."""

    def __init__(self, num_bins: int = NUM_BINS):
        self.counts = np.zeros(num_bins, dtype=np.int64)
        self.range = 0.0  # upper edge of the last bin; 0 until a non-zero value arrives
        self.amax = 0.0  # largest |x| seen

    @property
    def num_bins(self) -> int:
        return len(self.counts)

    def add(self, values: np.ndarray, name: str = "tensor") -> None:
        """Count |values|. `values` is used as scratch space (overwritten) when it is a writable float32 array."""
        writable = values.dtype == np.float32 and values.flags.writeable and values.flags.c_contiguous
        magnitudes = np.abs(values, out=values) if writable else np.abs(values.astype(np.float32))
        if magnitudes.size == 0:
            return
        batch_amax = float(magnitudes.max())
        if not math.isfinite(batch_amax):
            raise ValueError(f"{name} holds NaN or infinite values: check the model and the calibration images")
        self.amax = max(self.amax, batch_amax)
        if batch_amax > self.range:
            self._grow(batch_amax)
        if self.range == 0.0:
            self.counts[0] += magnitudes.size
            return
        magnitudes *= np.float32(self.num_bins / self.range)
        indices = magnitudes.astype(np.intp).ravel()
        np.minimum(indices, self.num_bins - 1, out=indices)
        self.counts += np.bincount(indices, minlength=self.num_bins)

    def _grow(self, new_amax: float) -> None:
        if self.range == 0.0:  # only zeros so far, all in bin 0 whatever the range
            self.range = new_amax
            return
        factor = math.ceil(new_amax / self.range)
        padded = np.concatenate([self.counts, np.zeros(-self.num_bins % factor, dtype=np.int64)])
        merged = padded.reshape(-1, factor).sum(axis=1)
        self.counts = np.zeros_like(self.counts)
        self.counts[: len(merged)] = merged
        self.range *= factor


# --- thresholds -------------------------------------------------------------------------------------------


def _xlogx(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def entropy_divergences(
    counts: np.ndarray, num_quantized_bins: int = NUM_QUANTIZED_BINS, start_bin: int = NUM_QUANTIZED_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) for every candidate threshold i = start_bin .. len(counts) (in bins), all at once.

    TensorRT's EntropyCalibration2 method, as NVIDIA's pytorch-quantization writes it:
    P = bins[:i] with the outliers (bins[i:]) folded into bin i-1; Q = bins[:i] merged into 128 levels
    (bin j -> level floor(128 j / i)), each level's count spread evenly over its non-empty bins.
    Bin 0 takes bin 1's count first (the zeros of a ReLU would otherwise dominate). A P bin with mass
    where Q is empty gives KL = inf. Cumulative sums make each threshold O(levels) instead of O(bins).
    Returns (thresholds in bins, divergences).
    """
    counts = counts.astype(np.float64)
    counts[0] = counts[1]
    n = len(counts)
    thresholds = np.arange(start_bin, n + 1)
    total = counts.sum()
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    cum_nonzero = np.concatenate([[0], np.cumsum(counts > 0)])
    cum_xlogx = np.concatenate([[0.0], np.cumsum(_xlogx(counts))])

    levels = np.arange(num_quantized_bins + 1)
    edges = (levels[None, :] * thresholds[:, None] + num_quantized_bins - 1) // num_quantized_bins  # ceil(k i / Q)
    level_sum = cum[edges[:, 1:]] - cum[edges[:, :-1]]
    level_nonzero = cum_nonzero[edges[:, 1:]] - cum_nonzero[edges[:, :-1]]
    tail = total - cum[thresholds]
    kept = cum[thresholds]
    last = counts[thresholds - 1]

    # sum p log p, with p = P / total and the tail in the last bin
    p_log_p = (cum_xlogx[thresholds - 1] + _xlogx(last + tail)) / total - np.log(total)
    # sum p log q: q is constant (level_sum / level_nonzero / kept) over a level's non-empty bins,
    # whose P mass is the level's count (plus the tail for the last level).
    level_mass = level_sum.copy()
    level_mass[:, -1] += tail
    occupied = level_sum > 0
    safe = np.where(occupied, level_sum, 1.0)
    log_q = np.log(safe) - np.log(np.where(occupied, level_nonzero, 1)) - np.log(np.maximum(kept, 1e-300))[:, None]
    p_log_q = np.where(occupied, level_mass * log_q, 0.0).sum(axis=1) / total
    divergence = p_log_p - p_log_q
    divergence[(last == 0) & (tail > 0)] = np.inf
    return thresholds, divergence


def entropy_amax(histogram: AbsHistogram, num_quantized_bins: int = NUM_QUANTIZED_BINS) -> float:
    """The threshold (in |x| units) that minimizes KL divergence; ties go to the largest threshold."""
    counts = histogram.counts
    if histogram.range == 0.0 or counts[1:].sum() == 0:
        return histogram.amax
    thresholds, divergence = entropy_divergences(counts, num_quantized_bins, num_quantized_bins)
    if not np.isfinite(divergence).any():
        return histogram.amax
    best = len(divergence) - 1 - int(np.argmin(divergence[::-1]))
    return min(float(thresholds[best]) * histogram.range / histogram.num_bins, histogram.amax)


def minmax_amax(histogram: AbsHistogram) -> float:
    return histogram.amax


def percentile_amax(histogram: AbsHistogram, percentile: float = 99.99) -> float:
    """Upper edge of the bin where the |x| CDF reaches `percentile`, capped at the largest |x| seen."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    total = histogram.counts.sum()
    if histogram.range == 0.0 or total == 0:
        return histogram.amax
    cdf = np.cumsum(histogram.counts) / total
    index = int(np.searchsorted(cdf, percentile / 100.0))
    return min((index + 1) * histogram.range / histogram.num_bins, histogram.amax)


def compute_amax(
    histograms: Mapping[str, AbsHistogram], algorithm: str = "entropy", percentile: float = 99.99
) -> dict[str, float]:
    """amax per tensor by `algorithm` (entropy | minmax | percentile)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown calibration algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    if algorithm == "entropy":
        return {name: entropy_amax(h) for name, h in histograms.items()}
    if algorithm == "minmax":
        return {name: minmax_amax(h) for name, h in histograms.items()}
    return {name: percentile_amax(h, percentile) for name, h in histograms.items()}


# --- collection -------------------------------------------------------------------------------------------


@dataclass
class ActivationStatistics:
    histograms: dict[str, AbsHistogram]
    num_images: int


def collect_histograms(
    model: onnx.ModelProto | str | Path,
    batches: Iterable[np.ndarray],
    tensor_names: Sequence[str] | None = None,
    *,
    num_bins: int = NUM_BINS,
    total_images: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    source: str | Path | None = None,
) -> ActivationStatistics:
    """Stream preprocessed float32 (B, 3, H, W) batches through `model` and histogram |x| of each tensor.

    `tensor_names` defaults to the tensors the Q/DQ plan quantizes. Graph inputs among them are counted
    from the batch itself. A graph with a static batch size runs each batch in chunks of that size, and each
    chunk's activations are released before the next one runs. `source` names a ModelProto in messages.
    """
    from tqdm import tqdm

    source = model if isinstance(model, (str, Path)) else source or "the ONNX graph"
    model = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    names = list(quantization_plan(model).activation_names if tensor_names is None else tensor_names)
    if not names:
        raise ValueError("nothing to calibrate: the ONNX graph has no tensor that the Q/DQ plan quantizes")
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"calibration feeds graphs with one image input; this one has {len(inputs)}: {inputs}")
    graph_input = inputs[0]
    session = OnnxSession(model, threads=threads, extra_outputs=names)
    fetched = [name for name in names if name != graph_input]

    histograms = {name: AbsHistogram(num_bins) for name in names}
    num_images = 0
    with tqdm(total=total_images, unit="img", desc="calibration", disable=not progress) as bar:
        for batch in batches:
            if batch.dtype != np.float32 or batch.ndim != 4:
                raise ValueError(f"calibration batches must be float32 (B, 3, H, W), got {batch.dtype} {batch.shape}")
            static = session.static_batch
            if static and len(batch) % static:
                # padding would count copies of an image twice in the histograms
                raise ValueError(
                    f"{source} takes batches of exactly {static} images, got a batch of "
                    f"{len(batch)}: make calibration.batch_size and the number of calibration images "
                    f"multiples of {static}, or export with onnx.dynamic_batch: true"
                )
            for chunk in np.split(batch, len(batch) // static) if static else (batch,):
                outputs = session(chunk, fetched)
                if graph_input in histograms:
                    histograms[graph_input].add(chunk.copy(), graph_input)
                for name in fetched:
                    histograms[name].add(outputs[name], name)
                del outputs
            num_images += len(batch)
            bar.update(len(batch))
    if num_images == 0:
        raise ValueError("no calibration images were fed: the calibration set is empty")
    return ActivationStatistics(histograms, num_images)


# --- TensorRT calibration cache (trtflow.formats.calibration_table) ------------------------------------


def calibration_table(amax: Mapping[str, float], algorithm: str, version: str) -> CalibrationTable:
    return CalibrationTable(
        version, TENSORRT_ALGORITHM[algorithm], {name: float(symmetric_scale(value)) for name, value in amax.items()}
    )


def ranges_document(
    amax: Mapping[str, float],
    table: CalibrationTable,
    algorithm: str,
    num_images: int,
    images_sha256: str,
    qdq_placement: str = "trtflow",
) -> dict:
    """ranges.json: per tensor the calibrated amax (float32) and the table's scale, plus what produced them."""
    return {
        "algorithm": algorithm,
        "qdq_placement": qdq_placement,
        "num_images": num_images,
        "images_sha256": images_sha256,
        "tensors": {
            name: {"amax": float(np.float32(amax[name])), "scale": scale} for name, scale in table.scales.items()
        },
        "software": software_versions(),
    }


# --- the pipeline stage -----------------------------------------------------------------------------------


def select_calibration_images(spec: str | Path, num_images: int, seed: int) -> list[Path]:
    """A seeded, deterministic subset of `num_images` of the images `spec` names (folder, glob or COCO JSON).

    Asking for more than there are warns and uses all; an empty set fails.
    """
    paths = list_images(spec)
    if not paths:
        raise ValueError(
            f"no calibration images found in {spec!r}: point calibration.images at a folder, "
            "a glob pattern or a COCO JSON with images"
        )
    if num_images >= len(paths):
        if num_images > len(paths):
            warnings.warn(
                f"calibration.num_images = {num_images} but {spec} has only {len(paths)} images: "
                f"calibrating with all {len(paths)}",
                stacklevel=2,
            )
        return list(paths)
    chosen = np.random.default_rng(seed).choice(len(paths), size=num_images, replace=False)
    return [paths[i] for i in sorted(chosen)]


def image_batches(paths: Sequence[Path], batch_size: int, preprocess_cfg: dict) -> Iterator[np.ndarray]:
    """Decoded and preprocessed exactly as at inference, `batch_size` images at a time."""
    for start in range(0, len(paths), batch_size):
        images = [read_image(path) for path in paths[start : start + batch_size]]
        yield preprocess_batch(images, preprocess_cfg)[0]


def calibrate_features(
    features_onnx: str | Path,
    images: str | Path,
    *,
    table_path: str | Path,
    ranges_path: str | Path,
    qdq_path: str | Path | None,
    calibration: dict,
    preprocess: dict,
    threads: int | None = None,
) -> dict:
    """Rule `calibrate`: images -> histograms -> thresholds -> int8calib.table, ranges.json, Q/DQ ONNX (`qdq_path`;
    None where rule quantized_graph writes it: calibration.keep_float.auto chooses its float layers afterwards).

    `calibration` is config `calibration:`; `preprocess` is the model's input size + config `preprocess:`.
    Returns the ranges document.
    """
    paths = select_calibration_images(images, calibration["num_images"], calibration["seed"])
    placement = calibration.get("qdq_placement", "trtflow")
    log.info(
        "calibrating %s on %d images from %s (%s, Q/DQ placement: %s)",
        features_onnx,
        len(paths),
        images,
        calibration["algorithm"],
        placement,
    )
    keep_float = KeepFloat.from_config(calibration.get("keep_float"))
    batches = image_batches(paths, calibration["batch_size"], preprocess)
    if placement == "modelopt":
        amax = quantize_features(
            features_onnx,
            np.concatenate(list(batches)),
            qdq_path,
            algorithm=calibration["algorithm"],
            keep_float=keep_float,
        )
    else:
        model = onnx.load(str(features_onnx))
        plan = quantization_plan(model, keep_float)
        statistics = collect_histograms(
            model, batches, plan.activation_names, total_images=len(paths), threads=threads, source=features_onnx
        )
        # one amax per Concat group, so the table, ranges.json and the Q/DQ graph carry the same scales
        amax = shared_amax(
            plan, compute_amax(statistics.histograms, calibration["algorithm"], calibration["percentile"])
        )
        if qdq_path is not None:
            save_onnx(insert_qdq(model, plan, amax), qdq_path)
    empty = [name for name, value in amax.items() if value <= 0]
    if empty:
        log.warning("%d tensors were all zero on the calibration set (scale 1): %s", len(empty), ", ".join(empty[:5]))
    table = calibration_table(amax, calibration["algorithm"], tensorrt_version_tag(calibration["tensorrt_version"]))
    document = ranges_document(amax, table, calibration["algorithm"], len(paths), files_sha256(*paths), placement)
    write_calibration_table(table_path, table)
    write_json(ranges_path, document, indent=1, sort_keys=False)
    log.info("wrote %s (%d tensors), %s, %s", table_path, len(table.scales), ranges_path, qdq_path or "")
    return document


def write_quantized_graph(
    features_onnx: str | Path,
    ranges_path: str | Path,
    qdq_path: str | Path,
    *,
    quantized: QuantizedType,
    keep_float: dict | None = None,
    float_layers_path: str | Path | None = None,
) -> None:
    """Rule quantized_graph: a precision's Q/DQ graph from the amax rule calibrate measured (ranges.json) and
    trtflow's placement with calibration.keep_float's patterns (`keep_float`), so that every quantized precision
    shares one calibration; with keep_float.auto, the layers rule float_layers chose (`float_layers_path`) are left
    in float, every other scale as calibrated."""
    graph = CalibratedGraph(features_onnx, ranges_path, quantized, keep_float)
    chosen = [] if float_layers_path is None else json.loads(Path(float_layers_path).read_text())["float_layers"]
    plan = graph.plan.without_layers(graph.layers(chosen, str(float_layers_path)))
    save_onnx(graph.graph(plan), qdq_path)
    log.info(
        "wrote %s (%s, scale %s, %d tensors)", qdq_path, quantized.name, quantized.scale_rule(), len(plan.activations)
    )
