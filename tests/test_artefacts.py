"""The artefact measures on images whose answers are known, and saturation against colorsys."""

import colorsys

import numpy as np
import pytest

from tdd_jax.evaluation.artefacts import clipped_share, mean_saturation


def image(*pixels):
    return np.asarray(pixels, np.uint8).reshape(1, 1, len(pixels), 3)


def test_known_pixels():
    assert clipped_share(image((255, 255, 255), (128, 128, 128))) == 0.5  # white pinned, grey not
    assert clipped_share(image((200, 2, 100), (253, 100, 100), (3, 252, 100))) == pytest.approx(2 / 3)
    assert mean_saturation(image((255, 0, 0), (128, 128, 128))) == 0.5  # pure red 1, grey 0
    assert mean_saturation(image((200, 100, 100))) == 0.5
    assert mean_saturation(image((0, 0, 0))) == 0.0


def test_saturation_matches_colorsys():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    expected = np.mean([colorsys.rgb_to_hsv(*(p / 255.0))[1] for p in pixels.reshape(-1, 3)])
    assert mean_saturation(pixels) == pytest.approx(expected)


def test_refuses_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        clipped_share(np.zeros((1, 2, 2, 3), np.float32))
