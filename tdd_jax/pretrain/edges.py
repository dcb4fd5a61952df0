"""Edge maps of the tiny edge-map ControlNet, and how well an image follows one.

``edge_map`` is what the ControlNet is trained on and what a user hands it: a Sobel gradient magnitude of the
image's luma, thresholded (canny-style white edges on black, but with no smoothing or thinning: the 64-pixel
emoji have one- to two-pixel outlines that a Gaussian would wash out). ``edge_f1`` scores an image's own edge map
against the control map with a one-pixel tolerance (the boundary F1 of segmentation benchmarks), so an outline
drawn a pixel off still counts.
"""

from __future__ import annotations

import numpy as np

# Rec. 601 luma weights. A sharp luma step d gives a Sobel magnitude of 4d: 1.2 keeps steps above 0.3, the emoji's
# outlines and main features (11% of the pixels of the teacher's emoji; 25% at 0.5, where shading shows too).
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
THRESHOLD = 1.2


def _shifts(a: np.ndarray, radius: int = 1) -> list[np.ndarray]:
    """Every (dy, dx) shift of ``a`` (..., H, W) with |dy|, |dx| <= radius, edge-padded."""
    h, w = a.shape[-2:]
    pad = [(0, 0)] * (a.ndim - 2) + [(radius, radius), (radius, radius)]
    p = np.pad(a, pad, mode="edge")
    return [p[..., radius + dy:radius + dy + h, radius + dx:radius + dx + w]
            for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


def edge_map(images: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """(..., H, W) bool edges of RGB images (..., H, W, 3), uint8 or floats in [0, 1]."""
    images = np.asarray(images)
    x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    luma = x @ LUMA
    s = _shifts(luma)  # s[3 * (dy + 1) + (dx + 1)]
    gx = (s[2] + 2 * s[5] + s[8]) - (s[0] + 2 * s[3] + s[6])
    gy = (s[6] + 2 * s[7] + s[8]) - (s[0] + 2 * s[1] + s[2])
    return np.hypot(gx, gy) > threshold


def control_images(edges: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) float32 control images in [0, 1] (white edges on black) from bool edge maps."""
    return np.repeat(np.asarray(edges, np.float32)[..., None], 3, axis=-1)


def edge_f1(edges: np.ndarray, control: np.ndarray, tolerance: int = 1) -> np.ndarray:
    """Per image (...,): F1 of ``edges`` against ``control`` (bool (..., H, W)), a pixel matching when the other
    map has an edge within ``tolerance`` pixels (Chebyshev). 1 when both maps are empty, 0 when one is."""
    def near(a):
        return np.logical_or.reduce(_shifts(a, tolerance)) if tolerance else a

    edges, control = np.asarray(edges, bool), np.asarray(control, bool)
    n_edges, n_control = edges.sum((-2, -1)), control.sum((-2, -1))
    precision = (edges & near(control)).sum((-2, -1)) / np.maximum(n_edges, 1)
    recall = (control & near(edges)).sum((-2, -1)) / np.maximum(n_control, 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return np.where((n_edges == 0) & (n_control == 0), 1.0, f1)
