"""SDXL preprocessing: resize/crop/flip geometry and time_ids against hand-computed values, decode failures."""

import io

import numpy as np
import pytest
from PIL import Image

from tdd_jax.data import preprocess as pp


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def _record(image: Image.Image, caption: str = "a cat") -> dict:
    return {"key": "k", "image": _encode(image), "caption": caption}


@pytest.mark.parametrize("h, w, res, expected", [
    (480, 640, 256, (256, 341)),  # 256 * 640 / 480 = 341.33, truncated like torchvision.
    (640, 480, 256, (341, 256)),
    (100, 100, 64, (64, 64)),
    (30, 2000, 64, (64, 4266)),
    (1024, 1024, 1024, (1024, 1024)),
])
def test_resized_size_shorter_side(h, w, res, expected):
    assert pp.resized_size(h, w, res) == expected


@pytest.mark.parametrize("h, w, expected", [
    (256, 341, (0, 42)),  # (341 - 256) / 2 = 42.5 -> round half to even = 42, as diffusers computes it.
    (256, 343, (0, 44)),  # 43.5 -> 44.
    (300, 256, (22, 0)),
    (256, 256, (0, 0)),
])
def test_center_crop_coordinates(h, w, expected):
    assert pp.crop_top_left(h, w, 256, center=True, rng=None) == expected


def test_random_crop_covers_the_whole_valid_range():
    rng = np.random.default_rng(0)
    corners = {pp.crop_top_left(258, 259, 256, center=False, rng=rng) for _ in range(400)}
    assert {t for t, _ in corners} == {0, 1, 2}
    assert {l for _, l in corners} == {0, 1, 2, 3}


def test_center_crop_time_ids_and_pixels():
    image = _gradient(640, 480)
    out = pp.SDXLPreprocessor(256, center_crop=True)(_record(image, " a cat \n"), np.random.default_rng(0))
    np.testing.assert_array_equal(out["time_ids"], [480, 640, 0, 42, 256, 256])
    assert out["time_ids"].dtype == np.float32 and out["caption"] == "a cat"
    expected = image.resize((341, 256), Image.Resampling.BILINEAR).crop((42, 0, 298, 256))
    np.testing.assert_array_equal(out["pixels"], np.asarray(expected))


def test_random_crop_records_its_corner():
    image = _gradient(300, 200)  # Resized to 384x256 at resolution 256: left in [0, 128].
    resized = np.asarray(image.resize((384, 256), Image.Resampling.BILINEAR))
    lefts = set()
    for seed in range(20):
        out = pp.SDXLPreprocessor(256)(_record(image), np.random.default_rng(seed))
        top, left = int(out["time_ids"][2]), int(out["time_ids"][3])
        assert top == 0 and 0 <= left <= 128
        np.testing.assert_array_equal(out["pixels"], resized[:, left:left + 256])
        lefts.add(left)
    assert len(lefts) > 10


def test_flip_mirrors_pixels_and_sets_crop_left_like_diffusers():
    image = _gradient(640, 480)
    crop = np.asarray(image.resize((341, 256), Image.Resampling.BILINEAR).crop((42, 0, 298, 256)))
    preprocess = pp.SDXLPreprocessor(256, center_crop=True, random_flip=True)
    outs = [preprocess(_record(image), np.random.default_rng(seed)) for seed in range(16)]
    flipped = [o for o in outs if o["time_ids"][3] != 42]
    assert 0 < len(flipped) < len(outs)
    for out in flipped:
        np.testing.assert_array_equal(out["time_ids"], [480, 640, 0, 256 - 42, 256, 256])
        np.testing.assert_array_equal(out["pixels"], crop[:, ::-1])


def test_resize_is_antialiased():
    stripes = np.zeros((256, 256, 3), np.uint8)
    stripes[:, ::2] = 255  # One-pixel stripes average to grey, not to aliased black/white.
    out = pp.SDXLPreprocessor(32, center_crop=True)(_record(Image.fromarray(stripes)), np.random.default_rng(0))
    assert 100 < out["pixels"].mean() < 155 and out["pixels"].std() < 5


def test_transparent_png_is_composited_on_white():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    out = pp.SDXLPreprocessor(32, center_crop=True)(_record(rgba), np.random.default_rng(0))
    assert (out["pixels"] == 255).all()


def test_uint8_array_input_is_accepted():
    array = np.asarray(_gradient(64, 64))
    out = pp.SDXLPreprocessor(64)({"key": "k", "image": array, "caption": "x"}, np.random.default_rng(0))
    np.testing.assert_array_equal(out["pixels"], array)
    np.testing.assert_array_equal(out["time_ids"], [64, 64, 0, 0, 64, 64])


@pytest.mark.parametrize("record, reason", [
    ({"key": "k", "image": _encode(_gradient(64, 48), "JPEG")[:300], "caption": "x"}, pp.DECODE_ERROR),
    ({"key": "k", "image": b"this is not an image", "caption": "x"}, pp.DECODE_ERROR),
    ({"key": "k", "image": _encode(_gradient(64, 48)), "caption": "  "}, pp.MISSING_CAPTION),
    ({"key": "k", "image": _encode(_gradient(64, 48)), "caption": None}, pp.MISSING_CAPTION),
    ({"key": "k", "image": None, "caption": "x"}, pp.MISSING_IMAGE),
    ({"key": "k", "image": _encode(_gradient(64, 20)), "caption": "x"}, pp.TOO_SMALL),
])
def test_unusable_records_become_skip_records(record, reason):
    out = pp.SDXLPreprocessor(32, min_image_size=24)(record, np.random.default_rng(0))
    assert out["skip"] == reason and out["key"] == "k"


def test_skip_records_pass_through():
    record = pp.skip_record("k", pp.READ_ERROR, "gone")
    assert pp.SDXLPreprocessor(32)(record, np.random.default_rng(0)) is record
