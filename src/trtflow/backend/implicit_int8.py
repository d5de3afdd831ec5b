"""TensorRT 10's implicit INT8 path, fed by our calibration table instead of a calibration run.

TensorRT reads a calibrator's cache before asking it for batches; a cache that covers the
network means `get_batch` is never needed. Our `int8calib.table` is written in TensorRT's
EntropyCalibration2 cache format (calibrate stage), so an IInt8EntropyCalibrator2 that
returns it reproduces our ranges exactly. TensorRT 11 and TensorRT-RTX removed this API;
there the same ranges arrive as Q/DQ nodes (features.qdq.onnx).
"""

from __future__ import annotations

from types import ModuleType


def cache_only_calibrator(trt: ModuleType, calibration_table: bytes, batch_size: int):
    """An IInt8EntropyCalibrator2 that serves `calibration_table` and has no batches."""

    class CacheOnlyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)

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
