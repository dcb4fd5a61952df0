"""Model-free artefact measures of sampled images, for the decoupled-guidance ablation (paper Fig. 6a).

The artefact that strong guidance causes in few-step students is burnt-out colour: channels pinned at 0 or 255
and over-saturated hues. Two numbers measure it with no model to tune: the share of pixels with any channel at
<= 2 or >= 253, and the mean HSV saturation. Neither is "good" or "bad" on its own (an emoji's white background
is pinned at 255, a flat red heart is saturated), so each is read beside the value of the teacher control that
the samples approximate: the artefact is the excess over it.
"""

from __future__ import annotations

import numpy as np

from tdd_jax.evaluation.features import check_images

PINNED_LOW, PINNED_HIGH = 2, 253


def clipped_share(images: np.ndarray) -> float:
    """Share of pixels with at least one channel <= PINNED_LOW or >= PINNED_HIGH."""
    images = check_images(images)
    return float(((images <= PINNED_LOW) | (images >= PINNED_HIGH)).any(axis=-1).mean())


def mean_saturation(images: np.ndarray) -> float:
    """Mean HSV saturation (max − min) / max over pixels, 0 for black pixels."""
    x = check_images(images).astype(np.float64)
    high, low = x.max(axis=-1), x.min(axis=-1)
    return float(np.divide(high - low, high, out=np.zeros_like(high), where=high > 0).mean())
