"""diffusers ``ControlNetModel`` (SDXL: ``addition_embed_type='text_time'``) in Flax NNX, built from its config.json.

A ControlNet is a copy of the UNet's encoder (``unet.UNetEncoder``: the same conv_in, time/text_time embedding,
down and mid blocks) whose input is the noisy latents plus a small conv net's embedding of the control image
(``controlnet_cond_embedding``); a zero-initialised 1x1 conv per skip state (``controlnet_down_blocks``) and one
after the mid block (``controlnet_mid_block``) turn its states into residuals that the UNet adds to its skip
connections and mid-block output (``UNet2DConditionModel(..., down_block_additional_residuals=...,
mid_block_additional_residual=...)``). Module names mirror diffusers, so ``from_pretrained`` reads a folder written
by ``ControlNetModel.save_pretrained`` (e.g. diffusers/controlnet-canny-sdxl-1.0) key for key.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tdd_jax.models.layers import Conv2d, ModelOptions, silu
from tdd_jax.models.unet import UNet2DConditionModel, UNetEncoder, checked_config

# diffusers defaults of the ControlNet-only fields (the encoder's are the UNet's).
_CONTROLNET_DEFAULTS: dict[str, Any] = {
    "conditioning_channels": 3, "conditioning_embedding_out_channels": (16, 32, 96, 256),
    "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False,
}

# The UNet config fields diffusers' ``ControlNetModel.from_unet`` copies into the ControlNet's config.
FROM_UNET_FIELDS = (
    "encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type", "addition_time_embed_dim",
    "transformer_layers_per_block", "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
    "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
    "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim", "mid_block_type")
# Modules diffusers' from_unet loads from the UNet, and the zero convolutions its __init__ zeroes.
ENCODER_MODULES = ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block")
ZERO_CONVOLUTIONS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


def controlnet_config(unet_config: dict, **fields) -> dict:
    """The config.json diffusers' ``ControlNetModel.from_unet`` writes for a UNet whose config.json is
    ``unet_config``: its encoder fields as written there, plus the ControlNet fields (diffusers' defaults, or
    ``fields``, e.g. ``conditioning_embedding_out_channels``)."""
    unknown = set(fields) - set(_CONTROLNET_DEFAULTS)
    if unknown:
        raise ValueError(f"not ControlNet config fields: {sorted(unknown)} (expected {sorted(_CONTROLNET_DEFAULTS)})")
    return {**{k: unet_config[k] for k in FROM_UNET_FIELDS if k in unet_config}, **_CONTROLNET_DEFAULTS, **fields}


class ControlNetConditioningEmbedding(nnx.Module):
    """Control image (B, H, W, C) in [0, 1] -> features at the latent resolution: conv_in, then per width
    (conv 3x3, stride-2 conv 3x3) pairs, SiLU after each, and a zero-initialised conv_out to the UNet's width."""

    def __init__(self, embedding_channels: int, conditioning_channels: int, block_out_channels: tuple[int, ...], *,
                 opts: ModelOptions, rngs: nnx.Rngs):
        chans = list(block_out_channels)
        self.conv_in = Conv2d(conditioning_channels, chans[0], 3, padding=1, opts=opts, rngs=rngs)
        blocks = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            blocks.append(Conv2d(c_in, c_in, 3, padding=1, opts=opts, rngs=rngs))
            blocks.append(Conv2d(c_in, c_out, 3, stride=2, padding=1, opts=opts, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.conv_out = Conv2d(chans[-1], embedding_channels, 3, padding=1, opts=opts, rngs=rngs)

    def __call__(self, x):
        x = silu(self.conv_in(x))
        for block in self.blocks:
            x = silu(block(x))
        return self.conv_out(x)


class ControlNetModel(UNetEncoder):
    """(latents NHWC, timesteps, text states, control image NHWC in [0, 1], added conds) -> (down residuals, one
    per UNet skip state, mid residual), each scaled by ``conditioning_scale``."""

    def __init__(self, config: dict, *, opts: ModelOptions = ModelOptions(), rngs: nnx.Rngs):
        cfg = checked_config({**_CONTROLNET_DEFAULTS, **config}, decoder=False, what="ControlNet")
        order = cfg["controlnet_conditioning_channel_order"]
        if order not in ("rgb", "bgr"):
            raise ValueError(f"ControlNet config field 'controlnet_conditioning_channel_order' = {order!r} is not "
                             "'rgb' or 'bgr'")
        if cfg["global_pool_conditions"]:
            raise ValueError("ControlNet config field 'global_pool_conditions' = True is not supported")
        self._init_encoder(cfg, opts=opts, rngs=rngs)
        chans = cfg["block_out_channels"]
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            chans[0], cfg["conditioning_channels"], tuple(cfg["conditioning_embedding_out_channels"]), opts=opts,
            rngs=rngs)
        self.controlnet_down_blocks = nnx.List([Conv2d(c, c, 1, opts=opts, rngs=rngs) for c in self.skip_channels])
        self.controlnet_mid_block = Conv2d(chans[-1], chans[-1], 1, opts=opts, rngs=rngs)
        self.bgr = order == "bgr"

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, config: dict, *, opts: ModelOptions = ModelOptions(),
                  rngs: nnx.Rngs) -> ControlNetModel:
        """A ControlNet initialised as diffusers' ``ControlNetModel.from_unet`` does: ``config`` (from
        ``controlnet_config``), the UNet's encoder weights copied, the zero convolutions zero, and the
        conditioning embedding's other convolutions drawn from ``rngs``. Training starts from the UNet's own
        features and residuals of exactly 0, so the controlled UNet starts as the plain one."""
        net = cls(config, opts=opts, rngs=rngs)
        source = dict(nnx.to_flat_state(nnx.state(unet, nnx.Param)))
        flat = []
        for path, var in nnx.to_flat_state(nnx.state(net, nnx.Param)):
            name = ".".join(str(k) for k in path)
            if name.startswith(ENCODER_MODULES):
                value = source[path].get_value()
                if value.shape != var.get_value().shape:
                    raise ValueError(f"ControlNet config does not fit the UNet: {name} has shape "
                                     f"{var.get_value().shape}, the UNet's {value.shape}")
                var = var.replace(value)
            elif name.startswith(ZERO_CONVOLUTIONS):
                var = var.replace(jnp.zeros_like(var.get_value()))
            flat.append((path, var))
        nnx.update(net, nnx.from_flat_state(flat))
        return net

    @property
    def image_factor(self) -> int:
        """How many control-image pixels make one latent pixel (the conditioning embedding's downsampling)."""
        return 2 ** (len(self.config["conditioning_embedding_out_channels"]) - 1)

    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                 added_cond_kwargs: dict | None = None, guess_mode: bool = False) -> tuple[list, jax.Array]:
        """sample (B, h, w, C) latents; controlnet_cond (B, h·f, w·f, conditioning_channels) in [0, 1] with
        f = ``image_factor``; conditioning_scale a float or traced scalar. guess_mode scales the residuals from
        0.1 (first skip) to 1 (mid) on a log scale, as diffusers does. Returns (down residuals, mid residual)."""
        sample, emb = self._embed(sample, timesteps, added_cond_kwargs)
        if self.bgr:
            controlnet_cond = controlnet_cond[..., ::-1]
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        levels, mid = self._encode(x, emb, encoder_hidden_states)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, (s for level in levels for s in level))]
        mid = self.controlnet_mid_block(mid)
        if guess_mode:
            scales = conditioning_scale * np.logspace(-1, 0, len(down) + 1, dtype=np.float32)
        else:
            scales = [conditioning_scale] * (len(down) + 1)
        return [d * s for d, s in zip(down, scales)], mid * scales[-1]
