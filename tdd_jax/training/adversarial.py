"""The adversarial term of TDD-adv (official train_tdd_adv.py, "Ours(adv)") and PCM's adversarial SDXL recipe.

The discriminator is the frozen teacher UNet's encoder, conv_in to the mid block on the *same* base weights the
step already holds (the teacher graphdef, LoRA off; no second copy of any UNet weight), with one small trainable
head per feature level (SDXL: 320, 640, 1280, 1280 channels): 1×1 conv → GroupNorm(32) → LeakyReLU, 1×1 conv →
GroupNorm(32) → LeakyReLU plus a residual, 1×1 conv → 1 logit per position (PCM's discriminator_sdxl.py, channel
width kept). Only the heads train; gradients of the generator's term flow through the frozen encoder into the
student. The group count is ``adv.head_groups`` (PCM's 32: 10-40 channels a group on SDXL). With one channel a
group (32 groups on a 32-channel level) each channel is standardised over positions per example, so a head's mean
logit hardly depends on its input and the hinge loss stays at 2 whatever the two sides look like (the tests'
one-level UNet shows it; ``launch/adv_probe.py`` measures a pipeline's heads).

Per example, a discriminator timestep gan_t ~ U{τ .. min(τ + window, T) − 1}; the student's prediction at τ
(fake) and the target at τ (real) are each re-noised τ → gan_t with independent noise,
x_g = √(ᾱ_g/ᾱ_τ)·x_τ + √(1 − ᾱ_g/ᾱ_τ)·z. Hinge losses averaged over the heads:
D: mean(relu(1 + D(fake))) + mean(relu(1 − D(real))); G: mean(relu(1 − D(fake))).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tdd_jax.conditioning import Cond
from tdd_jax.diffusion.schedule import NoiseSchedule, expand_like
from tdd_jax.models.layers import Conv2d, GroupNorm, ModelOptions
from tdd_jax.training.config import check_head_groups
from tdd_jax.training.frozen import FrozenPipeline

# The adversarial draws of an example come from its own key folded with this constant, so that turning the
# term on leaves every other draw of the step (n, τ, noise, w, dropped captions) exactly as it was.
ADV_STREAM = 0xAD5
LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU's default, as PCM's heads use it
HEAD_OPTS = ModelOptions(dtype=jnp.float32, param_dtype=jnp.float32)  # heads are tiny: always fp32


class DiscriminatorHead(nnx.Module):
    """One feature level's head: (B, h, w, C) features -> (B, h, w, 1) logits."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
        check_head_groups(groups, [channels])
        self.conv1 = Conv2d(channels, channels, 1, opts=HEAD_OPTS, rngs=rngs)
        self.norm1 = GroupNorm(groups, channels, opts=HEAD_OPTS)
        self.conv2 = Conv2d(channels, channels, 1, opts=HEAD_OPTS, rngs=rngs)
        self.norm2 = GroupNorm(groups, channels, opts=HEAD_OPTS)
        self.conv_out = Conv2d(channels, 1, 1, opts=HEAD_OPTS, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.leaky_relu(self.norm1(self.conv1(x.astype(jnp.float32))), LEAKY_SLOPE)
        x = jax.nn.leaky_relu(self.norm2(self.conv2(x)), LEAKY_SLOPE) + x
        return self.conv_out(x)


class DiscriminatorHeads(nnx.Module):
    """The trainable part of the discriminator: one head per encoder feature level."""

    def __init__(self, channels: Sequence[int], groups: int, *, rngs: nnx.Rngs):
        self.heads = nnx.List([DiscriminatorHead(c, groups, rngs=rngs) for c in channels])

    def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
        if len(features) != len(self.heads):
            raise ValueError(f"{len(features)} feature levels for {len(self.heads)} discriminator heads")
        return [head(f) for head, f in zip(self.heads, features)]


def hinge_d_loss(fake_logits: Sequence[jax.Array], real_logits: Sequence[jax.Array]) -> jax.Array:
    """Discriminator hinge loss, averaged over the heads."""
    terms = [jnp.mean(jax.nn.relu(1.0 + f)) + jnp.mean(jax.nn.relu(1.0 - r)) for f, r in zip(fake_logits, real_logits)]
    return sum(terms) / len(terms)


def hinge_g_loss(fake_logits: Sequence[jax.Array]) -> jax.Array:
    """Generator hinge loss mean(relu(1 − D(fake))), averaged over the heads (PCM's g_loss)."""
    return sum(jnp.mean(jax.nn.relu(1.0 - f)) for f in fake_logits) / len(fake_logits)


def head_optimizer(adv) -> optax.GradientTransformation:
    """AdamW of the heads from ``cfg.adv.{lr, b1, b2, eps, weight_decay, grad_clip}``, constant rate (the
    official discriminator optimizer has no schedule), after global-norm clipping (grad_clip 0: none)."""
    adamw = optax.adamw(float(adv.lr), b1=float(adv.b1), b2=float(adv.b2), eps=float(adv.eps),
                        weight_decay=float(adv.weight_decay))
    return optax.chain(optax.clip_by_global_norm(float(adv.grad_clip)), adamw) if adv.grad_clip else adamw


@dataclasses.dataclass
class Adversary:
    """The discriminator of one config and frozen pipeline: heads graphdef, their optimizer, the draws and
    the two losses. Built by ``Adversary.build``; the heads' state lives in ``TrainState.heads``."""

    frozen: FrozenPipeline
    schedule: NoiseSchedule
    g_weight: float
    window: int
    channels: tuple[int, ...]  # of the encoder's feature levels, one head each
    groups: int  # GroupNorm groups of every head layer
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation

    @classmethod
    def build(cls, cfg, frozen: FrozenPipeline, schedule: NoiseSchedule) -> Adversary:
        channels, groups = frozen.teacher(frozen.params).feature_channels, int(cfg.adv.head_groups)
        graphdef = nnx.split(nnx.eval_shape(lambda: DiscriminatorHeads(channels, groups, rngs=nnx.Rngs(0))))[0]
        return cls(frozen=frozen, schedule=schedule, g_weight=float(cfg.adv.g_weight), window=int(cfg.adv.window),
                   channels=channels, groups=groups, graphdef=graphdef, tx=head_optimizer(cfg.adv))

    def init_heads(self, key: jax.Array) -> nnx.State:
        return nnx.state(DiscriminatorHeads(self.channels, self.groups, rngs=nnx.Rngs(key)))

    def draw(self, key: jax.Array, tau: jax.Array, latent_shape: tuple[int, ...]) -> dict:
        """One example's discriminator timestep and its two independent re-noising draws."""
        k_t, k_fake, k_real = jax.random.split(jax.random.fold_in(key, ADV_STREAM), 3)
        high = jnp.minimum(tau + self.window, self.schedule.num_train_timesteps)
        return {"gan_t": jax.random.randint(k_t, (), tau, high),
                "z_fake": jax.random.normal(k_fake, latent_shape, jnp.float32),
                "z_real": jax.random.normal(k_real, latent_shape, jnp.float32)}

    def renoise(self, x: jax.Array, tau: jax.Array, gan_t: jax.Array, z: jax.Array) -> jax.Array:
        """x at noise level τ -> gan_t ≥ τ (the forward process between the two levels)."""
        ratio = expand_like(self.schedule.alpha_cumprod(gan_t) / self.schedule.alpha_cumprod(tau), x)
        return jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * z

    def logits(self, heads: nnx.State, base_params: dict, x: jax.Array, t: jax.Array, cond: Cond) -> list:
        """Per-head logits of latents x at timesteps t: the frozen teacher encoder, then the heads."""
        features = self.frozen.teacher(base_params).encoder_features(
            x, t, cond.prompt_embeds, {"text_embeds": cond.pooled, "time_ids": cond.time_ids})
        return nnx.merge(self.graphdef, heads)(features)
