"""TensorRT 10's implicit INT8 path, fed by our calibration table instead of a calibration run.

TensorRT reads a calibrator's cache before asking it for batches; a cache that covers the
network means `get_batch` is never needed. Our `int8calib.table` is written in TensorRT's
calibration cache format (calibrate stage): a header `TRT-<version>-<algorithm>`, then one
scale per tensor. TensorRT uses a cache only when the header's algorithm is the one its
calibrator reports (`get_algorithm()`) and skips it otherwise, so the calibrator class is
chosen from the header (`CALIBRATORS`); with the wrong class the build would have no ranges
at all, as `get_batch` has no data. TensorRT 11 and TensorRT-RTX removed this API; there the
same ranges arrive as Q/DQ nodes (features.qdq.onnx).
"""

from __future__ import annotations

import re
from types import ModuleType
from typing import NamedTuple


class Calibrator(NamedTuple):
    """The TensorRT 10 calibrator class that reads a header's algorithm, and the CalibrationAlgoType it reports."""

    base_class: str
    algorithm_type: str


# Header algorithm -> calibrator: the algorithms rule calibrate writes (formats.calibration_table.TENSORRT_ALGORITHM).
# tests/test_trt_bindings_matrix.py checks each class's get_algorithm() on every TensorRT 10.x.
CALIBRATORS = {
    "EntropyCalibration2": Calibrator("IInt8EntropyCalibrator2", "ENTROPY_CALIBRATION_2"),
    "MinMaxCalibration": Calibrator("IInt8MinMaxCalibrator", "MINMAX_CALIBRATION"),
}

CACHE_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")


def cache_header(version: str, algorithm: str) -> str:
    """A cache's first line: `TRT-<version tag>-<algorithm>`, as CACHE_HEADER reads it."""
    return f"TRT-{version}-{algorithm}"


def parse_cache_header(line: str, source: str) -> tuple[str, str]:
    """(version tag, algorithm) of a cache's first line; refuses a malformed header or an algorithm no calibrator reads."""
    match = CACHE_HEADER.match(line.strip())
    if match is None:
        raise ValueError(
            f"{source}: first line must be a TensorRT cache header like 'TRT-100300-EntropyCalibration2', "
            f"got {line!r}: rerun rule calibrate to rewrite the table"
        )
    version, algorithm = match.groups()
    if algorithm not in CALIBRATORS:
        raise ValueError(
            f"{source}: header {line.strip()!r} names calibration algorithm {algorithm!r}, which no calibrator "
            f"trtflow uses reads (TensorRT skips a cache whose algorithm is not its calibrator's): use a table "
            f"with {' or '.join(CALIBRATORS)}, as rule calibrate writes"
        )
    return version, algorithm


def cache_only_calibrator(
    trt: ModuleType, calibration_table: bytes, batch_size: int, source: str = "calibration table"
):
    """A calibrator of the class the table's header names (`CALIBRATORS`), serving the table with no batches."""
    first_line = calibration_table.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    _, algorithm = parse_cache_header(first_line, source)
    base = getattr(trt, CALIBRATORS[algorithm].base_class)

    class CacheOnlyCalibrator(base):
        def __init__(self):
            base.__init__(self)

        def get_batch_size(self):
            return batch_size

        def get_batch(self, names):
            # No calibration data: TensorRT takes every range from the cache.
            return None

        def read_calibration_cache(self):
            return calibration_table

        def write_calibration_cache(self, cache):
            # The table is an artifact of the calibrate stage; a build never rewrites it.
            return None

    return CacheOnlyCalibrator()
