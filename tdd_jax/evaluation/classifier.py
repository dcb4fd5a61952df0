"""The ``emoji`` feature extractor: a small CNN trained by the repo on the Noto emoji, FID's LeNet-on-MNIST idea.

Its pooled penultimate activations (``FEATURE_DIM``) are the features of FID/KID; its name head's top-1 judges
prompt following (a sample drawn for caption c counts if the classifier says c). The group head is trained on
the train split only, so its accuracy on the dataset's ``test`` split is a true held-out number.

Why 64×64 input with a stride-2 stem: the tiny SDXL draws 64×64 samples, and a 32×32 working resolution keeps
training to minutes on two CPU cores while skin tones, flags and faces stay apart. Training sees augmented views
(small shifts/scales, mild colour jitter without hue shifts — skin tones are classes —, blur, noise) so the
classifier judges what a generated sample depicts rather than its exact pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from tdd_jax.models.layers import Conv2d, GroupNorm, Linear, ModelOptions, silu, state_key
from tdd_jax.models.loading import build_model

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "emoji_classifier"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"  # architecture, class names and group names
RECIPE_FILE = "recipe.json"  # training settings, held-out accuracies and train time
IMAGE_SIZE = 64


class EmojiClassifier(nnx.Module):
    """stem (4×4, stride 2) -> stages of [3×3 stride-2 conv, 3×3 conv] with GroupNorm + SiLU -> mean pool
    (the features) -> linear name and group heads."""

    def __init__(self, num_names: int, num_groups: int, widths=(32, 64, 128, 128), *, rngs: nnx.Rngs,
                 opts: ModelOptions = ModelOptions()):
        self.stem = Conv2d(3, widths[0], 4, stride=2, padding=1, opts=opts, rngs=rngs)
        self.stem_norm = GroupNorm(8, widths[0], opts=opts)
        convs, norms = [], []
        for cin, cout in zip(widths[:-1], widths[1:]):
            convs += [Conv2d(cin, cout, 3, stride=2, padding=1, opts=opts, rngs=rngs),
                      Conv2d(cout, cout, 3, padding=1, opts=opts, rngs=rngs)]
            norms += [GroupNorm(8, cout, opts=opts), GroupNorm(8, cout, opts=opts)]
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.names = Linear(widths[-1], num_names, opts=opts, rngs=rngs)
        self.groups = Linear(widths[-1], num_groups, opts=opts, rngs=rngs)

    def features(self, images):
        """uint8 or [0, 255] float (B, 64, 64, 3) -> (B, FEATURE_DIM) pooled penultimate activations."""
        x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
        x = silu(self.stem_norm(self.stem(x)))
        for conv, norm in zip(self.convs, self.norms):
            x = silu(norm(conv(x)))
        return x.mean(axis=(1, 2))

    def __call__(self, images):
        """(features, name logits, group logits)."""
        f = self.features(images)
        return f, self.names(f), self.groups(f)


def _gaussian_blur(image, sigma):
    """One (H, W, C) image blurred by a 7-tap separable Gaussian of width ``sigma`` (≈ identity at 0)."""
    taps = jnp.arange(-3, 4, dtype=jnp.float32)
    kernel = jnp.exp(-0.5 * jnp.square(taps / jnp.maximum(sigma, 1e-3)))
    kernel = kernel / kernel.sum()
    padded = jnp.pad(image, ((3, 3), (3, 3), (0, 0)), mode="edge")
    rows = sum(kernel[i] * padded[i:i + image.shape[0]] for i in range(7))
    return sum(kernel[i] * rows[:, i:i + image.shape[1]] for i in range(7))


def augment(key, image, strength: float = 1.0):
    """One random view of a uint8 (H, W, 3) image as float [0, 255]: scale ×[0.85, 1.15] and shift ±4 px (on
    white), brightness ±8%, contrast and saturation ±15%, blur σ ≤ 1.2 px (half the views), Gaussian noise
    σ ≤ 8% (half the views). ``strength`` scales every range (0: the image unchanged)."""
    k = jax.random.split(key, 8)
    size = image.shape[0]
    x = jnp.asarray(image, jnp.float32) / 255.0
    u = lambda kk, lo, hi, shape=(): jax.random.uniform(kk, shape, minval=lo, maxval=hi)  # noqa: E731
    scale = 1.0 + strength * u(k[0], -0.15, 0.15)
    shift = strength * u(k[1], -4.0, 4.0, (2,))
    # Resample 1 - x so that what comes in from outside the frame is white (0 after the inversion).
    translation = shift + size * (1.0 - scale) / 2.0
    x = 1.0 - jax.image.scale_and_translate(1.0 - x, x.shape, (0, 1), jnp.stack([scale, scale]), translation,
                                            "linear")
    gray = x.mean(axis=-1, keepdims=True)
    x = gray + (1.0 + strength * u(k[2], -0.15, 0.15)) * (x - gray)  # saturation
    x = x.mean() + (1.0 + strength * u(k[3], -0.15, 0.15)) * (x - x.mean())  # contrast
    x = x * (1.0 + strength * u(k[4], -0.08, 0.08))  # brightness
    blur = jax.random.bernoulli(k[5]) * strength * u(k[6], 0.0, 1.2)
    x = jnp.where(blur > 0.05, _gaussian_blur(x, blur), x)
    noise_std = jax.random.bernoulli(k[7]) * strength * u(jax.random.fold_in(k[7], 1), 0.0, 0.08)
    x = x + noise_std * jax.random.normal(jax.random.fold_in(k[7], 2), x.shape)
    return jnp.clip(x, 0.0, 1.0) * 255.0


def augment_batch(key, images, strength: float = 1.0):
    return jax.vmap(lambda kk, im: augment(kk, im, strength))(jax.random.split(key, images.shape[0]), images)


def save_classifier(folder: str | Path, model: EmojiClassifier, config: dict) -> Path:
    """fp16 safetensors (keys = state paths) + ``config.json`` (``widths``, ``names``, ``groups``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {state_key(path): np.ascontiguousarray(np.asarray(var.get_value(), np.float16))
               for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder


def load_classifier(folder: str | Path = ASSET_DIR) -> tuple[EmojiClassifier, dict]:
    """(model in fp32, config) from a folder written by ``save_classifier`` (default: the shipped one)."""
    folder = Path(folder)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"emoji classifier: {folder / name} is missing; train one with "
                                    f"`python -m tdd_jax.evaluation.train_classifier --out {folder}`")
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    model = build_model(lambda: EmojiClassifier(len(config["names"]), len(config["groups"]), tuple(config["widths"]),
                                                rngs=nnx.Rngs(0)), str(folder / WEIGHTS_FILE))
    return model, config
