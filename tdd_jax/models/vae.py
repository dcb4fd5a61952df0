"""AutoencoderKL (SDXL's VAE) from a diffusers config: images (NHWC, [-1, 1]) <-> latents (NHWC).

Module names mirror diffusers (``encoder.down_blocks.N.resnets.M``, ``downsamplers.0.conv``,
``mid_block.attentions.0.to_q``, ``quant_conv``, ...), so state paths are the checkpoint keys. ``encode``
returns the posterior moments and leaves sampling to ``sample``, so a caller decides between the mean and a
draw; latents for the UNet are ``(z - shift_factor) * scaling_factor``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tdd_jax.models.layers import Conv2d, GroupNorm, Linear, ModelOptions, Placeholder, attention, silu
from tdd_jax.models.loading import build_model, read_config
from tdd_jax.models.unet_blocks import Downsample2D, Upsample2D

# diffusers' AutoencoderKL defaults, for keys a config.json leaves out.
_CONFIG_DEFAULTS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
                        act_fn="silu", latent_channels=4, norm_num_groups=32, scaling_factor=0.18215,
                        shift_factor=None, use_quant_conv=True, use_post_quant_conv=True,
                        mid_block_add_attention=True)

# SDXL base 1.0 vae/config.json (force_upcast is a PyTorch fp16 workaround and has no meaning here).
SDXL_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=1024,
                       scaling_factor=0.13025)

EPS = 1e-6  # every norm in diffusers' VAE encoder/decoder
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


def _config(config: dict) -> dict:
    cfg = {**_CONFIG_DEFAULTS, **config}
    bad = [t for t in cfg["down_block_types"] if t != "DownEncoderBlock2D"]
    bad += [t for t in cfg["up_block_types"] if t != "UpDecoderBlock2D"]
    if bad:
        raise ValueError(f"unsupported VAE block types {bad}; only DownEncoderBlock2D/UpDecoderBlock2D are built")
    if cfg["act_fn"] not in ("silu", "swish"):
        raise ValueError(f"unsupported VAE act_fn {cfg['act_fn']!r}; only silu is built")
    return cfg


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D with temb_channels=None: x + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    def __init__(self, cin: int, cout: int, groups: int, *, opts: ModelOptions, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(groups, cin, eps=EPS, opts=opts)
        self.conv1 = Conv2d(cin, cout, 3, padding=1, opts=opts, rngs=rngs)
        self.norm2 = GroupNorm(groups, cout, eps=EPS, opts=opts)
        self.conv2 = Conv2d(cout, cout, 3, padding=1, opts=opts, rngs=rngs)
        self.conv_shortcut = Conv2d(cin, cout, 1, opts=opts, rngs=rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """The mid-block spatial self-attention: group norm, single head over all H*W positions, residual."""

    def __init__(self, channels: int, groups: int, *, opts: ModelOptions, rngs: nnx.Rngs):
        self.impl = opts.attention_impl
        self.group_norm = GroupNorm(groups, channels, eps=EPS, opts=opts)
        self.to_q = Linear(channels, channels, opts=opts, rngs=rngs)
        self.to_k = Linear(channels, channels, opts=opts, rngs=rngs)
        self.to_v = Linear(channels, channels, opts=opts, rngs=rngs)
        self.to_out = nnx.List([Linear(channels, channels, opts=opts, rngs=rngs), Placeholder()])

    def __call__(self, x):
        b, h, w, c = x.shape
        t = self.group_norm(x.reshape(b, h * w, c))
        out = attention(self.to_q(t), self.to_k(t), self.to_v(t), heads=1, impl=self.impl)
        for layer in self.to_out:
            out = layer(out)
        return x + out.reshape(b, h, w, c)


class UNetMidBlock2D(nnx.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool, *, opts: ModelOptions, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, opts=opts, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, groups, opts=opts, rngs=rngs)] if add_attention else [])

    def __call__(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, add_downsample: bool, *,
                 opts: ModelOptions, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, opts=opts, rngs=rngs)
                                 for i in range(layers)])
        self.downsamplers = nnx.List([Downsample2D(cout, 0, opts=opts, rngs=rngs)] if add_downsample else [])

    def __call__(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, add_upsample: bool, *,
                 opts: ModelOptions, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, opts=opts, rngs=rngs)
                                 for i in range(layers)])
        self.upsamplers = nnx.List([Upsample2D(cout, opts=opts, rngs=rngs)] if add_upsample else [])

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for upsampler in self.upsamplers:
            x = upsampler(x, (2 * x.shape[1], 2 * x.shape[2]))
        return x


class Encoder(nnx.Module):
    """Image (B, H, W, in) -> moments (B, H/f, W/f, 2*latent) before quant_conv."""

    def __init__(self, cfg: dict, *, opts: ModelOptions, rngs: nnx.Rngs):
        ch, groups = cfg["block_out_channels"], cfg["norm_num_groups"]
        self.conv_in = Conv2d(cfg["in_channels"], ch[0], 3, padding=1, opts=opts, rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg["layers_per_block"], groups, i < len(ch) - 1,
                               opts=opts, rngs=rngs) for i in range(len(ch))])
        self.mid_block = UNetMidBlock2D(ch[-1], groups, cfg["mid_block_add_attention"], opts=opts, rngs=rngs)
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=EPS, opts=opts)
        self.conv_out = Conv2d(ch[-1], 2 * cfg["latent_channels"], 3, padding=1, opts=opts, rngs=rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent (B, h, w, latent) -> image (B, h*f, w*f, out), after post_quant_conv."""

    def __init__(self, cfg: dict, *, opts: ModelOptions, rngs: nnx.Rngs):
        ch, groups = list(reversed(cfg["block_out_channels"])), cfg["norm_num_groups"]
        self.conv_in = Conv2d(cfg["latent_channels"], ch[0], 3, padding=1, opts=opts, rngs=rngs)
        self.mid_block = UNetMidBlock2D(ch[0], groups, cfg["mid_block_add_attention"], opts=opts, rngs=rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg["layers_per_block"] + 1, groups, i < len(ch) - 1,
                             opts=opts, rngs=rngs) for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=EPS, opts=opts)
        self.conv_out = Conv2d(ch[-1], cfg["out_channels"], 3, padding=1, opts=opts, rngs=rngs)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers.AutoencoderKL on NHWC arrays."""

    def __init__(self, config: dict, *, opts: ModelOptions, rngs: nnx.Rngs):
        cfg = _config(config)
        latent = cfg["latent_channels"]
        self.encoder = Encoder(cfg, opts=opts, rngs=rngs)
        self.decoder = Decoder(cfg, opts=opts, rngs=rngs)
        self.quant_conv = Conv2d(2 * latent, 2 * latent, 1, opts=opts, rngs=rngs) if cfg["use_quant_conv"] else None
        self.post_quant_conv = (Conv2d(latent, latent, 1, opts=opts, rngs=rngs)
                                if cfg["use_post_quant_conv"] else None)
        self._scaling_factor = float(cfg["scaling_factor"])
        self._shift_factor = float(cfg["shift_factor"] or 0.0)

    @property
    def scaling_factor(self) -> float:
        return self._scaling_factor

    @property
    def shift_factor(self) -> float:
        """0.0 where the config has none (SDXL)."""
        return self._shift_factor

    def encode(self, x):
        """Image (B, H, W, C) in [-1, 1] -> posterior (mean, logvar), each (B, H/f, W/f, latent)."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    @staticmethod
    def sample(key: jax.Array, mean, logvar):
        """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * N(0, 1)."""
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

    def decode(self, z):
        """Unscaled latents (B, h, w, latent) -> image (B, h*f, w*f, C), nominally in [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, opts: ModelOptions = ModelOptions(), shardings: Any = None):
        """Load a diffusers folder (config.json + diffusion_pytorch_model.safetensors), e.g. a pipeline's vae/."""
        config = read_config(folder)
        return build_model(lambda: cls(config, opts=opts, rngs=nnx.Rngs(0)), folder, shardings=shardings)
