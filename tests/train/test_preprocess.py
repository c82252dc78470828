"""center_crop_arr against the release's preprocessing written out here step by step, on non-square
images larger and smaller than the target."""
import re

import numpy as np
import pytest
from PIL import Image

from fastdit.train.preprocess import center_crop_arr


def release_preprocessing(image, target):
    """ADM's center_crop_arr spelled out: the list of BOX-halved sizes, one BICUBIC resize of the last
    to a short side of ``target``, then the central target x target square."""
    sizes = [image.size]
    while min(sizes[-1]) >= 2 * target:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    for size in sizes[1:]:
        image = image.resize(size, Image.BOX)
    width, height = image.size
    factor = target / min(width, height)
    image = image.resize((round(factor * width), round(factor * height)), Image.BICUBIC)
    array = np.array(image)
    y0 = (array.shape[0] - target) // 2
    x0 = (array.shape[1] - target) // 2
    return array[y0:y0 + target, x0:x0 + target]


def sharp_image(width, height, seed=0, mode="RGB"):
    """Edges and noise: content on which the resampling order shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    stripes = ((x // 3 + y // 5) % 2 * 200).astype(np.uint8)
    pixels = np.stack([stripes, rng.integers(0, 256, (height, width)), (x * 255 // max(width - 1, 1))], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8)).convert(mode)


# (width, height) for a 32 target: smaller on both sides, smaller on one, between 1x and 2x, one
# halving, two halvings (129 -> 64 -> 32), portrait, and exactly 2x.
SIZES = [(17, 13), (37, 23), (50, 41), (131, 70), (300, 129), (33, 90), (64, 100)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_equals_the_release_formula(size, mode):
    image = sharp_image(*size, mode=mode)
    result = center_crop_arr(image, 32)
    expected = release_preprocessing(image.convert("RGB"), 32)
    assert result.dtype == np.uint8 and result.shape == (32, 32, 3)
    np.testing.assert_array_equal(result, expected)


def test_halving_is_an_exact_box_average_then_a_center_crop():
    # 96x64 to 32: one halving gives 48x32 (short side already 32, so the bicubic resize keeps it),
    # then columns 8..40. With constant 2x2 blocks the BOX average is each block's value, exactly.
    blocks = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    pixels = blocks.repeat(2, axis=0).repeat(2, axis=1)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(pixels), 32), blocks[:, 8:40])


def test_crop_then_resize_is_not_the_release():
    # The test above can fail: the preprocessing fastdit had before (crop, one bicubic resize, no
    # halving) differs from the release's on sharp content.
    image = sharp_image(300, 129)
    side = min(image.size)
    left = (image.width - side) // 2
    old = np.asarray(image.crop((left, 0, left + side, side)).resize((32, 32), Image.BICUBIC))
    difference = np.abs(old.astype(int) - center_crop_arr(image, 32).astype(int)).max()
    assert difference > 20


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "32"])
def test_bad_size(bad):
    with pytest.raises(ValueError, match=f"image_size: expected a positive integer, got {bad!r}"):
        center_crop_arr(sharp_image(40, 40), bad)


def test_not_an_image():
    with pytest.raises(TypeError, match="pil_image: expected a PIL.Image.Image, got ndarray"):
        center_crop_arr(np.zeros((40, 40, 3), np.uint8), 32)


def test_every_mode_keeps_its_full_range_or_is_refused_by_name(tmp_path):
    """16-bit grey PNGs were clipped at 255 by PIL's conversion, almost every pixel white (issue 27)."""
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode == "I;16"
        pixels = center_crop_arr(image, 16)
    expected = (ramp.astype(np.uint32) * 255 + 32767) // 65535
    np.testing.assert_array_equal(pixels, np.repeat(expected[:, :, None], 3, axis=2))
    assert (pixels == 255).mean() < 0.01 and pixels.min() == 0
    for mode, words in (("I", "image mode I (32-bit integer pixels) has no fixed range"),
                        ("F", "image mode F (32-bit float pixels) has no fixed range"),
                        ("La", "image mode La cannot be converted to RGB")):
        with pytest.raises(ValueError, match=re.escape(words)):
            center_crop_arr(Image.new(mode, (16, 16)), 16)
    for mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I;16B", "I;16L"):
        assert center_crop_arr(Image.new(mode, (16, 16)), 16).shape == (16, 16, 3), mode
