"""Reading one image file: its pixels as uint8 BGR, or a :class:`BadImageError` naming the file.

Image reading never hands a decoding problem to OpenCV's silent ``None``: every file
is read as bytes, decoded with ``cv2.imdecode`` and checked, and a problem is either
converted (documented in :func:`read_image`) or raised as :class:`BadImageError` naming
the file, what is wrong and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

MIN_IMAGE_SIDE = 32
MAX_IMAGE_SIDE = 8000


class BadImageError(ValueError):
    """An image file that cannot be used: names the file, the problem and the fix."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str):
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}. Fix: {fix}")


def _sniff_format(data: bytes) -> str | None:
    """The container format from the file's magic bytes (None: not a known image format)."""
    signatures = {
        b"\xff\xd8\xff": "JPEG",
        b"\x89PNG\r\n\x1a\n": "PNG",
        b"BM": "BMP",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
    }
    for magic, name in signatures.items():
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _jpeg_is_truncated(data: bytes) -> bool:
    """True when the last scan of a JPEG has no end-of-image marker after it.

    Entropy-coded data never contains 0xFFDA / 0xFFD9 (0xFF bytes are stuffed), so the last
    SOS marker starts the main image's last scan even when an EXIF thumbnail precedes it;
    trailing bytes after EOI (some cameras append data) are fine. OpenCV 4.x decodes a
    truncated JPEG into a half-grey picture with only a warning on stderr, hence this check.
    """
    last_scan = data.rfind(b"\xff\xda")
    return last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0


def _to_bgr8(pixels: np.ndarray, path: Path) -> np.ndarray:
    """Decoded pixels (1 or 3 channels, 8 or 16 bit) as uint8 HxWx3 BGR."""
    if pixels.dtype == np.uint16:
        # Full-range scaling (v * 255 / 65535, rounded): a 16-bit export of an 8-bit picture
        # round-trips exactly, and the exposure is kept rather than stretched per image.
        pixels = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise BadImageError(
            path,
            f"has {pixels.dtype} pixels, which have no agreed mapping to 8-bit colour",
            "export it as an 8- or 16-bit JPEG/PNG",
        )
    if pixels.ndim == 2:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(pixels)


def read_image(path: str | os.PathLike, min_side: int = MIN_IMAGE_SIDE, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """An image file as uint8 HxWx3 BGR, or :class:`BadImageError` naming file, problem and fix.

    Converted, as ``cv2.imread(path)`` would, so a model trained on cv2/PIL-read images
    sees the same pixels: EXIF orientation is applied; grayscale is repeated to 3
    channels; an alpha channel is dropped (not composited: the colour under transparent
    pixels is kept, as cv2.imread and PIL's ``convert("RGB")`` do); 16-bit is scaled to
    8-bit by v * 255 / 65535. Refused: missing, empty, non-image, corrupt or truncated
    files, float pixels, and images under ``min_side`` or over ``max_side`` px a side
    (resizing would silently move the annotated boxes).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadImageError(
            path, "does not exist", "check the path, or the image folder setting that led to it"
        ) from None
    except IsADirectoryError:
        raise BadImageError(path, "is a folder, not an image file", "point at the image files inside it") from None
    except OSError as error:
        raise BadImageError(path, f"cannot be read ({error.strerror})", "check its permissions and the disk") from None
    if not data:
        raise BadImageError(path, "is empty (0 bytes)", "copy the image again; the transfer that wrote it failed")
    kind = _sniff_format(data)
    if kind == "JPEG" and _jpeg_is_truncated(data):
        raise BadImageError(path, "is a truncated JPEG (no end-of-image marker)", "copy the image again in full")
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error as error:
        raise BadImageError(
            path, f"cannot be decoded by OpenCV ({error.err})", "re-save it as an 8-bit JPEG or PNG"
        ) from None
    if pixels is None:
        if kind is None:
            raise BadImageError(
                path,
                f"is not an image OpenCV can read (unknown format, starts with {data[:8]!r})",
                "convert it to JPEG or PNG, or remove it from the image folder",
            )
        raise BadImageError(path, f"is a corrupt or truncated {kind} file", "copy or re-export the image")
    height, width = pixels.shape[:2]
    if min(height, width) < min_side:
        raise BadImageError(
            path,
            f"is {width}x{height} px, under {min_side} px a side: too small to hold detectable objects",
            "use the full-size image, not a thumbnail",
        )
    if max(height, width) > max_side:
        raise BadImageError(
            path,
            f"is {width}x{height} px, over {max_side} px a side",
            f"downscale it (and scale its annotations) to at most {max_side} px a side",
        )
    return _to_bgr8(pixels, path)
