import json

import numpy as np
import pytest

from test_images import picture, write_image
from trtflow.common.preprocess import preprocess_batch, preprocess_image, preprocess_split

CFG = {
    "input": {"height": 320, "width": 320},
    "color": "rgb",
    "mean": [0.5, 0.25, 0.125],
    "std": [0.5, 0.25, 0.5],
    "pad_value": 0,
}


def test_letterbox_ratio_padding_and_values_by_hand():
    image = np.empty((100, 200, 3), np.uint8)
    image[...] = (10, 20, 30)  # BGR
    tensor, letterbox = preprocess_image(image, CFG)
    # 100x200 into 320x320: ratio min(3.2, 1.6) = 1.6, content 160x320 at the top-left, padding below.
    assert letterbox.ratio == pytest.approx(1.6)
    assert (letterbox.pad_x, letterbox.pad_y, letterbox.original_hw, letterbox.input_hw) == (
        0,
        0,
        (100, 200),
        (320, 320),
    )
    assert tensor.shape == (3, 320, 320) and tensor.dtype == np.float32
    rgb = np.array([30, 20, 10]) / 255.0
    expected_content = (rgb - np.array(CFG["mean"])) / np.array(CFG["std"])
    expected_padding = -np.array(CFG["mean"]) / np.array(CFG["std"])
    np.testing.assert_allclose(
        tensor[:, :160, :].reshape(3, -1).T, np.tile(expected_content, (160 * 320, 1)), rtol=1e-6
    )
    np.testing.assert_allclose(
        tensor[:, 160:, :].reshape(3, -1).T, np.tile(expected_padding, (160 * 320, 1)), rtol=1e-6
    )


def test_bgr_order_keeps_channels():
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0] = 255  # blue
    tensor, _ = preprocess_image(image, {**CFG, "color": "bgr", "mean": [0, 0, 0], "std": [1, 1, 1]})
    assert tensor[0].min() == 1.0 and tensor[2].max() == 0.0


def test_tall_image_pads_right_and_batch_stacks():
    tall = np.full((400, 100, 3), 128, np.uint8)
    wide = np.full((50, 640, 3), 128, np.uint8)
    batch, letterboxes = preprocess_batch([tall, wide], CFG)
    assert batch.shape == (2, 3, 320, 320)
    assert letterboxes[0].ratio == pytest.approx(0.8) and letterboxes[1].ratio == pytest.approx(0.5)
    padding = -CFG["mean"][0] / CFG["std"][0]
    assert np.all(batch[0, 0, :, 80:] == np.float32(padding)) and not np.any(batch[0, 0, :, :80] == np.float32(padding))
    assert np.all(batch[1, 0, 25:, :] == np.float32(padding))


def test_empty_batch_is_refused():
    with pytest.raises(ValueError, match="no images"):
        preprocess_batch([], CFG)


def test_a_split_s_first_images_are_read_and_preprocessed_in_order(tmp_path):
    pictures = [picture(40 + 10 * i, 60, seed=i) for i in range(3)]
    files = [write_image(tmp_path / f"{i}.png", pixels) for i, pixels in enumerate(pictures)]
    split = tmp_path / "val.json"
    split.write_text(json.dumps({"images": [{"id": i, "file_name": str(file)} for i, file in enumerate(files)]}))
    batch = preprocess_split(split, CFG, 2)
    assert batch.shape == (2, 3, 320, 320)
    assert np.array_equal(batch, preprocess_batch(pictures[:2], CFG)[0])
