"""The INT8 calibration table as a file between the wings: TensorRT's calibration cache text format, written by
the calibrate stage (results/calib/int8calib.table) and read by the engine stage (TensorRT 10's implicit INT8) and
the report.

A header `TRT-<version tag>-<algorithm>`, then one `name: <float32 scale bits as 8 hex digits>` line per tensor
(scale = amax / 127). The header's algorithm picks the TensorRT 10 calibrator class that accepts the cache
(`trtflow.backend.implicit_int8.CALIBRATORS`).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtflow.artifacts import write_text
from trtflow.backend import installed_version
from trtflow.backend.implicit_int8 import cache_header, parse_cache_header
from trtflow.precisions import INT8

# calibration.algorithm -> the table header's algorithm. Percentile ranges are final ranges, like min-max ones, so
# they travel under the min-max header.
TENSORRT_ALGORITHM = {
    "entropy": "EntropyCalibration2",
    "minmax": "MinMaxCalibration",
    "percentile": "MinMaxCalibration",
}
ALGORITHMS = tuple(TENSORRT_ALGORITHM)  # the calibration methods trtflow.build.calibrate implements


@dataclass(frozen=True)
class CalibrationTable:
    """A TensorRT calibration cache: version tag (e.g. '100300'), algorithm (e.g. 'EntropyCalibration2'), scales."""

    version: str
    algorithm: str
    scales: dict[str, float]

    @property
    def header(self) -> str:
        return cache_header(self.version, self.algorithm)

    def amax(self) -> dict[str, float]:
        return {name: float(np.float32(scale) * np.float32(INT8.max_magnitude)) for name, scale in self.scales.items()}


def version_tag(version: str) -> str:
    """NV_TENSORRT_VERSION of a TensorRT version string, as cache headers write it.

    10.x and later: major*10000 + minor*100 + patch (10.3.0 -> 100300); before 10: major*1000 + minor*100 + patch
    (8.6.1 -> 8601).
    """
    major, minor, patch = (int(part) for part in (version.split(".") + ["0", "0"])[:3])
    return str(major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch)


def tensorrt_version_tag(fallback: str | int) -> str:
    """The installed TensorRT's version tag (`tensorrt` imports), else `fallback` (config calibration.tensorrt_version)."""
    installed = installed_version("tensorrt")
    return version_tag(installed) if installed else str(fallback)


def scale_hex(scale: float) -> str:
    """IEEE-754 float32 bits of `scale`, big-endian, as TensorRT writes them (8 lowercase hex digits)."""
    return struct.pack(">f", scale).hex()


def format_calibration_table(table: CalibrationTable) -> str:
    lines = [table.header] + [f"{name}: {scale_hex(scale)}" for name, scale in table.scales.items()]
    return "\n".join(lines) + "\n"


def parse_calibration_table(text: str, source: str = "calibration table") -> CalibrationTable:
    lines = text.splitlines()
    version, algorithm = parse_cache_header(lines[0] if lines else "", source)
    scales = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, separator, bits = line.rpartition(": ")
        if not separator or not re.fullmatch(r"[0-9a-fA-F]{8}", bits.strip()):
            raise ValueError(f"{source}, line {number}: expected '<tensor name>: <8 hex digits>', got {line!r}")
        scales[name] = struct.unpack(">f", bytes.fromhex(bits.strip()))[0]
    return CalibrationTable(version, algorithm, scales)


def write_calibration_table(path: str | Path, table: CalibrationTable) -> None:
    write_text(path, format_calibration_table(table))


def read_calibration_table(path: str | Path) -> CalibrationTable:
    return parse_calibration_table(Path(path).read_text(), str(path))
