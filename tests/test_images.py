"""trtflow.common.images: robust image reading."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from trtflow.common.images import BadImageError, read_image


def write_image(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix, pixels)
    assert ok
    path.write_bytes(encoded.tobytes())
    return path


def picture(height=48, width=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_read_image_returns_bgr_uint8(tmp_path):
    pixels = picture()
    path = write_image(tmp_path / "ok.png", pixels)
    assert np.array_equal(read_image(path), pixels)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = picture()[..., 0]
    image = read_image(write_image(tmp_path / "gray.png", gray))
    assert image.shape == (48, 64, 3) and all(np.array_equal(image[..., c], gray) for c in range(3))


def test_16_bit_is_scaled_to_8_bit(tmp_path):
    pixels = picture()
    image = read_image(write_image(tmp_path / "deep.png", pixels.astype(np.uint16) * 257))
    assert image.dtype == np.uint8 and np.array_equal(image, pixels)
    gray16 = np.full((40, 40), 65535, np.uint16)
    assert (read_image(write_image(tmp_path / "deep_gray.png", gray16)) == 255).all()


def test_alpha_is_dropped_not_composited(tmp_path):
    pixels = picture()
    alpha = np.zeros((48, 64, 1), np.uint8)  # fully transparent: compositing would change every pixel
    image = read_image(write_image(tmp_path / "rgba.png", np.concatenate([pixels, alpha], axis=2)))
    assert np.array_equal(image, pixels)


def test_jpeg_with_bytes_after_end_marker_reads(tmp_path):
    path = write_image(tmp_path / "tail.jpg", picture())
    path.write_bytes(path.read_bytes() + b"\x00" * 16)
    assert read_image(path).shape == (48, 64, 3)


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path


BAD_IMAGES = {
    "empty.jpg": (lambda p: p.write_bytes(b""), "empty (0 bytes)"),
    "half.jpg": (lambda p: truncated(write_image(p, picture(200, 200))), "truncated JPEG"),
    "no_end.jpg": (lambda p: p.write_bytes(write_image(p, picture()).read_bytes()[:-2]), "truncated JPEG"),
    "half.png": (lambda p: truncated(write_image(p, picture(200, 200))), "corrupt or truncated PNG"),
    "text.jpg": (lambda p: p.write_text("this is not an image"), "not an image OpenCV can read"),
    "tiny.png": (lambda p: write_image(p, picture(20, 300)), "300x20 px, under 32 px a side"),
    "huge.png": (lambda p: write_image(p, np.zeros((40, 8001, 3), np.uint8)), "8001x40 px, over 8000 px a side"),
    "float.tiff": (lambda p: write_image(p, np.zeros((40, 40, 3), np.float32)), "float32 pixels"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_is_named_with_problem_and_fix(tmp_path, name):
    make, problem = BAD_IMAGES[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(BadImageError) as caught:
        read_image(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert problem in caught.value.problem and "Fix: " in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_missing_and_folder_paths_are_bad_images(tmp_path):
    with pytest.raises(BadImageError, match="does not exist"):
        read_image(tmp_path / "nowhere.jpg")
    with pytest.raises(BadImageError, match="is a folder"):
        read_image(tmp_path)
