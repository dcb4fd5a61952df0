"""The building blocks of diffusers' ``UNet2DConditionModel``, on NHWC activations.

Attribute names and list layouts mirror diffusers (``resnets``, ``attentions``, ``transformer_blocks``,
``to_out.0``, ``ff.net.0.proj``, ``downsamplers.0.conv`` ...), so the dotted state path of every parameter is
its diffusers checkpoint key and PEFT-style LoRA targets match the same modules as in PyTorch. Dropout slots
are ``Placeholder``s: TDD trains with dropout 0, and the UNet config check rejects anything else.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tdd_jax.models.layers import (Conv2d, GroupNorm, LayerNorm, Linear, ModelOptions, Placeholder, attention,
                                   checkpointed, gelu_exact, scan_identical, silu)


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
    """Sinusoidal embedding of (fractional) timesteps, as diffusers' ``get_timestep_embedding``, in fp32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nnx.Module):
    """diffusers ``Timesteps``: parameter-free sinusoidal projection (kept as a module to mirror its name)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def __call__(self, t):
        return timestep_embedding(t, self.dim, self.flip_sin_to_cos, self.freq_shift)


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers ``TimestepEmbedding`` without cond_proj/post_act)."""

    def __init__(self, in_dim: int, dim: int, *, opts: ModelOptions, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_dim, dim, opts=opts, rngs=rngs)
        self.linear_2 = Linear(dim, dim, opts=opts, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv, + projected time embedding, GroupNorm-SiLU-conv, residual (1x1 conv if widths differ)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, *, groups: int, eps: float,
                 output_scale_factor: float = 1.0, opts: ModelOptions, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(groups, in_ch, eps=eps, opts=opts)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1, opts=opts, rngs=rngs)
        self.time_emb_proj = Linear(temb_ch, out_ch, opts=opts, rngs=rngs)
        self.norm2 = GroupNorm(groups, out_ch, eps=eps, opts=opts)
        self.dropout = Placeholder()
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1, opts=opts, rngs=rngs)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1, opts=opts, rngs=rngs) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor

    def __call__(self, x, temb):
        h = self.conv1(silu(self.norm1(x)))
        h = h + self.time_emb_proj(silu(temb))[:, None, None, :]
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x.astype(h.dtype) + h) / self.output_scale_factor


class Attention(nnx.Module):
    """Multi-head (self or cross) attention: bias-free q/k/v, ``to_out = [Linear, Dropout]``."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, *, opts: ModelOptions,
                 rngs: nnx.Rngs):
        inner = heads * head_dim
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = Linear(dim, inner, bias=False, opts=opts, rngs=rngs)
        self.to_k = Linear(kv_dim, inner, bias=False, opts=opts, rngs=rngs)
        self.to_v = Linear(kv_dim, inner, bias=False, opts=opts, rngs=rngs)
        self.to_out = nnx.List([Linear(inner, dim, opts=opts, rngs=rngs), Placeholder()])
        self.heads, self.impl = heads, opts.attention_impl

    def __call__(self, x, context=None):
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), heads=self.heads, impl=self.impl)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nnx.Module):
    """proj to 2*inner, split into (value, gate), value * GELU(gate) (exact erf GELU, as torch's default)."""

    def __init__(self, dim: int, inner: int, *, opts: ModelOptions, rngs: nnx.Rngs):
        self.proj = Linear(dim, 2 * inner, opts=opts, rngs=rngs)

    def __call__(self, x):
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * gelu_exact(gate)


class FeedForward(nnx.Module):
    """``net = [GEGLU, Dropout, Linear]`` with inner width 4*dim."""

    def __init__(self, dim: int, *, opts: ModelOptions, rngs: nnx.Rngs):
        self.net = nnx.List([GEGLU(dim, 4 * dim, opts=opts, rngs=rngs), Placeholder(),
                             Linear(4 * dim, dim, opts=opts, rngs=rngs)])

    def __call__(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text states, and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, *, opts: ModelOptions,
                 rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim, opts=opts)
        self.attn1 = Attention(dim, heads, head_dim, opts=opts, rngs=rngs)
        self.norm2 = LayerNorm(dim, opts=opts)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, opts=opts, rngs=rngs)
        self.norm3 = LayerNorm(dim, opts=opts)
        self.ff = FeedForward(dim, opts=opts, rngs=rngs)

    def __call__(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm, proj_in (Linear or 1x1 conv), transformer blocks over the H*W tokens, proj_out, residual."""

    def __init__(self, channels: int, heads: int, layers: int, context_dim: int, *, groups: int,
                 linear_projection: bool, opts: ModelOptions, rngs: nnx.Rngs):
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = GroupNorm(groups, channels, eps=1e-6, opts=opts)
        if linear_projection:
            self.proj_in = Linear(channels, inner, opts=opts, rngs=rngs)
            self.proj_out = Linear(inner, channels, opts=opts, rngs=rngs)
        else:
            self.proj_in = Conv2d(channels, inner, 1, opts=opts, rngs=rngs)
            self.proj_out = Conv2d(inner, channels, 1, opts=opts, rngs=rngs)
        self.transformer_blocks = nnx.List([BasicTransformerBlock(inner, heads, head_dim, context_dim, opts=opts,
                                                                  rngs=rngs) for _ in range(layers)])
        self.remat, self.scan = opts.remat, opts.scan_blocks

    def __call__(self, x, context):
        b, h, w, c = x.shape
        # Linear acts on the last axis, so it and the 1x1 conv both apply to the NHWC map directly.
        hs = self.norm(x)
        hs = self.proj_in(hs).reshape(b, h * w, -1)
        if self.scan and len(self.transformer_blocks) > 1:
            hs = scan_identical(self.transformer_blocks, BasicTransformerBlock.__call__, hs, context,
                                remat=self.remat, name="transformer_blocks")
        else:
            block = checkpointed(BasicTransformerBlock.__call__, self.remat)
            for tb in self.transformer_blocks:
                hs = block(tb, hs, context)
        hs = self.proj_out(hs.reshape(b, h, w, -1))
        return hs + x.astype(hs.dtype)


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv; padding 0 pads bottom/right by one first, as diffusers does (the VAE's layout)."""

    def __init__(self, channels: int, padding: int, *, opts: ModelOptions, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding, opts=opts, rngs=rngs)
        self.padding = padding

    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def resize_nearest(x, size: tuple[int, int]):
    """torch ``F.interpolate(mode='nearest')`` to ``size`` on NHWC: source index floor(i * in/out) in fp32."""
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        if out == 2 * n:
            x = jnp.repeat(x, 2, axis=axis)
        elif out != n:
            src = np.minimum(np.floor(np.arange(out, dtype=np.float32) * np.float32(n / out)), n - 1)
            x = jnp.take(x, src.astype(np.int32), axis=axis)
    return x


class Upsample2D(nnx.Module):
    """Nearest upsampling to the skip connection's size (2x when it divides evenly), then a 3x3 conv."""

    def __init__(self, channels: int, *, opts: ModelOptions, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, padding=1, opts=opts, rngs=rngs)

    def __call__(self, x, size: tuple[int, int]):
        return self.conv(resize_nearest(x, size))


def run_resnet(resnet: ResnetBlock2D, x, temb, remat: str):
    """A resnet call under the named remat policy (the unit of gradient checkpointing, as in diffusers)."""
    return checkpointed(ResnetBlock2D.__call__, remat)(resnet, x, temb)


class DownBlock2D(nnx.Module):
    """diffusers ``DownBlock2D`` (``heads=None``) or ``CrossAttnDownBlock2D``: resnet [+ transformer] per layer,
    then an optional downsampler; returns the output and every intermediate state for the skip connections."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, *, layers: int, add_downsample: bool, groups: int,
                 eps: float, heads: int | None = None, transformer_layers: int = 1,
                 context_dim: int | None = None, linear_projection: bool = True, opts: ModelOptions,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups=groups, eps=eps,
                                               opts=opts, rngs=rngs) for i in range(layers)])
        self.attentions = None if heads is None else nnx.List([
            Transformer2DModel(out_ch, heads, transformer_layers, context_dim, groups=groups,
                               linear_projection=linear_projection, opts=opts, rngs=rngs) for _ in range(layers)])
        self.downsamplers = nnx.List([Downsample2D(out_ch, 1, opts=opts, rngs=rngs)]) if add_downsample else None
        self.remat = opts.remat

    def __call__(self, x, temb, context):
        states = []
        for i in range(len(self.resnets)):
            x = run_resnet(self.resnets[i], x, temb, self.remat)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet, then (transformer, resnet) once."""

    def __init__(self, channels: int, temb_ch: int, *, heads: int, transformer_layers: int, context_dim: int,
                 groups: int, eps: float, output_scale_factor: float, linear_projection: bool, opts: ModelOptions,
                 rngs: nnx.Rngs):
        self.attentions = nnx.List([Transformer2DModel(channels, heads, transformer_layers, context_dim,
                                                       groups=groups, linear_projection=linear_projection,
                                                       opts=opts, rngs=rngs)])
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, temb_ch, groups=groups, eps=eps,
                                               output_scale_factor=output_scale_factor, opts=opts, rngs=rngs)
                                 for _ in range(2)])
        self.remat = opts.remat

    def __call__(self, x, temb, context):
        x = run_resnet(self.resnets[0], x, temb, self.remat)
        x = self.attentions[0](x, context)
        return run_resnet(self.resnets[1], x, temb, self.remat)


class UpBlock2D(nnx.Module):
    """diffusers ``UpBlock2D`` (``heads=None``) or ``CrossAttnUpBlock2D``: each layer concatenates the next skip
    state on channels, then resnet [+ transformer]; an optional upsampler resizes to the next skip's size."""

    def __init__(self, in_ch: int, prev_out_ch: int, out_ch: int, temb_ch: int, *, layers: int, add_upsample: bool,
                 groups: int, eps: float, heads: int | None = None, transformer_layers: int = 1,
                 context_dim: int | None = None, linear_projection: bool = True, opts: ModelOptions,
                 rngs: nnx.Rngs):
        resnets = []
        for i in range(layers):
            skip_ch = in_ch if i == layers - 1 else out_ch
            res_in = prev_out_ch if i == 0 else out_ch
            resnets.append(ResnetBlock2D(res_in + skip_ch, out_ch, temb_ch, groups=groups, eps=eps, opts=opts,
                                         rngs=rngs))
        self.resnets = nnx.List(resnets)
        self.attentions = None if heads is None else nnx.List([
            Transformer2DModel(out_ch, heads, transformer_layers, context_dim, groups=groups,
                               linear_projection=linear_projection, opts=opts, rngs=rngs) for _ in range(layers)])
        self.upsamplers = nnx.List([Upsample2D(out_ch, opts=opts, rngs=rngs)]) if add_upsample else None
        self.remat = opts.remat

    def __call__(self, x, skips, temb, context, upsample_size=None):
        for i in range(len(self.resnets)):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = run_resnet(self.resnets[i], x, temb, self.remat)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x
