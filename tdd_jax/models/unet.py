"""diffusers ``UNet2DConditionModel`` in Flax NNX, built from its ``config.json``.

Covers the SDXL family (``addition_embed_type='text_time'``, per-level transformer depth, linear projections)
and SD1.5/SD2.x (conv or linear projections, no added conditions); the model returns the raw network output,
so ε- and v-prediction checkpoints load alike. Options this module does not implement raise a ``ValueError``
naming the config field instead of silently computing something else (``upcast_attention`` is accepted:
``jax.nn.dot_product_attention`` already computes logits and softmax in fp32). Module names mirror diffusers
(see unet_blocks.py), so ``from_pretrained`` reads ``diffusion_pytorch_model.safetensors`` key for key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from tdd_jax.models.layers import Conv2d, GroupNorm, ModelOptions, silu
from tdd_jax.models.loading import build_model, read_config, weight_files
from tdd_jax.models.unet_blocks import (DownBlock2D, TimestepEmbedding, Timesteps, UNetMidBlock2DCrossAttn,
                                        UpBlock2D)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (architecture fields).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# diffusers defaults of the fields read below (a config.json may omit any of them).
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "mid_block_scale_factor": 1.0, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 1280, "transformer_layers_per_block": 1, "attention_head_dim": 8,
    "use_linear_projection": False, "addition_embed_type": None, "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
}

# Fields whose non-default values change the architecture in ways this module does not implement.
_UNSUPPORTED: dict[str, Any] = {
    "class_embed_type": None, "num_class_embeds": None, "class_embeddings_concat": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "dual_cross_attention": False, "attention_type": "default",
    "cross_attention_norm": None, "num_attention_heads": None, "reverse_transformer_layers_per_block": None,
    "dropout": 0.0, "downsample_padding": 1,
}


def _per_level(cfg: dict, name: str, n: int) -> list:
    value = cfg[name]
    values = [value] * n if not isinstance(value, (list, tuple)) else list(value)
    if len(values) != n:
        raise ValueError(f"UNet config field {name!r} has {len(values)} entries for {n} blocks: {value}")
    return values


def checked_config(config: dict, *, decoder: bool = True, what: str = "UNet") -> dict:
    """diffusers defaults filled in, unsupported options rejected by field name. ``decoder=False`` checks only the
    encoder half (a ControlNet's config has no up blocks); ``what`` names the model in the errors."""
    cfg = {**_DEFAULTS, **config}
    for name, default in _UNSUPPORTED.items():
        value = cfg.get(name, default)
        if value != default:
            raise ValueError(f"{what} config field {name!r} = {value!r} is not supported (only {default!r})")
    only_cross = cfg.get("only_cross_attention", False)
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
        raise ValueError(f"{what} config field 'only_cross_attention' = {only_cross!r} is not supported")
    if cfg["act_fn"] not in ("silu", "swish"):
        raise ValueError(f"{what} config field 'act_fn' = {cfg['act_fn']!r} is not supported (only 'silu')")
    if cfg["norm_num_groups"] is None:
        raise ValueError(f"{what} config field 'norm_num_groups' = None is not supported")
    if cfg["addition_embed_type"] not in (None, "text_time"):
        raise ValueError(f"{what} config field 'addition_embed_type' = {cfg['addition_embed_type']!r} is not "
                         "supported (only None or 'text_time')")
    if cfg["mid_block_type"] != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"{what} config field 'mid_block_type' = {cfg['mid_block_type']!r} is not supported")
    block_kinds = [("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D"))]
    if decoder:
        block_kinds.append(("up_block_types", ("UpBlock2D", "CrossAttnUpBlock2D")))
    n = len(cfg["block_out_channels"])
    for name, kinds in block_kinds:
        bad = [t for t in cfg[name] if t not in kinds]
        if bad:
            raise ValueError(f"{what} config field {name!r} contains unsupported block types {bad} (only {kinds})")
        if len(cfg[name]) != n:
            raise ValueError(f"{what} config fields {name!r} and 'block_out_channels' must have the same length")
    for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim"):
        cfg[name] = _per_level(cfg, name, n)
    if any(isinstance(v, (list, tuple)) for v in cfg["transformer_layers_per_block"]):
        raise ValueError(f"{what} config field 'transformer_layers_per_block' with per-layer lists is not supported")
    return cfg


class UNetEncoder(nnx.Module):
    """The half of the UNet that a ControlNet copies: conv_in, the time (+ text_time) embedding, the down blocks
    and the mid block, under diffusers' module names. ``UNet2DConditionModel`` adds the decoder to it and
    ``controlnet.ControlNetModel`` the conditioning embedding and zero convolutions."""

    def _init_encoder(self, cfg: dict, *, opts: ModelOptions, rngs: nnx.Rngs):
        """Build the encoder's modules from a checked config (``checked_config``)."""
        # Hashable (lists as tuples), so the config is static graph metadata and graphdefs stay hashable.
        self.config = FrozenDict({k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
        chans = list(cfg["block_out_channels"])
        n = len(chans)
        # diffusers' historical naming: ``attention_head_dim`` holds the number of heads per level.
        heads = cfg["attention_head_dim"]
        groups, eps, linear = cfg["norm_num_groups"], cfg["norm_eps"], bool(cfg["use_linear_projection"])
        temb_ch = 4 * chans[0]

        k_in = cfg["conv_in_kernel"]
        self.conv_in = Conv2d(cfg["in_channels"], chans[0], k_in, padding=(k_in - 1) // 2, opts=opts, rngs=rngs)
        self.time_proj = Timesteps(chans[0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
        self.time_embedding = TimestepEmbedding(chans[0], temb_ch, opts=opts, rngs=rngs)
        self.text_time = cfg["addition_embed_type"] == "text_time"
        if self.text_time:
            self.add_time_proj = Timesteps(cfg["addition_time_embed_dim"], cfg["flip_sin_to_cos"], cfg["freq_shift"])
            self.add_embedding = TimestepEmbedding(cfg["projection_class_embeddings_input_dim"], temb_ch, opts=opts,
                                                   rngs=rngs)

        down = []
        for i, kind in enumerate(cfg["down_block_types"]):
            cross = kind == "CrossAttnDownBlock2D"
            down.append(DownBlock2D(
                chans[max(i - 1, 0)], chans[i], temb_ch, layers=cfg["layers_per_block"][i], add_downsample=i < n - 1,
                groups=groups, eps=eps, heads=heads[i] if cross else None,
                transformer_layers=cfg["transformer_layers_per_block"][i], context_dim=cfg["cross_attention_dim"][i],
                linear_projection=linear, opts=opts, rngs=rngs))
        self.down_blocks = nnx.List(down)

        self.mid_block = UNetMidBlock2DCrossAttn(
            chans[-1], temb_ch, heads=heads[-1], transformer_layers=cfg["transformer_layers_per_block"][-1],
            context_dim=cfg["cross_attention_dim"][-1], groups=groups, eps=eps,
            output_scale_factor=cfg["mid_block_scale_factor"], linear_projection=linear, opts=opts, rngs=rngs)
        self.center_input_sample = bool(cfg["center_input_sample"])

    @property
    def skip_channels(self) -> tuple[int, ...]:
        """Channels of the skip states in order (conv_in's output, then every down-block state): the shapes of
        a ControlNet's down residuals."""
        chans = self.config["block_out_channels"]
        out = [chans[0]]
        for i, (c, layers) in enumerate(zip(chans, self.config["layers_per_block"])):
            out += [c] * (layers + (i < len(chans) - 1))  # each resnet (+ attention), then the downsampler
        return tuple(out)

    def _embed(self, sample, timesteps, added_cond_kwargs: dict | None):
        """(input sample, time + added-condition embedding): the part every forward shares."""
        if self.text_time and not {"text_embeds", "time_ids"} <= set(added_cond_kwargs or {}):
            raise ValueError("this UNet has addition_embed_type 'text_time': pass added_cond_kwargs with "
                             "'text_embeds' and 'time_ids'")
        b = sample.shape[0]
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        emb = self.time_embedding(self.time_proj(t))
        if self.text_time:
            text_embeds = added_cond_kwargs["text_embeds"]
            time_embeds = self.add_time_proj(added_cond_kwargs["time_ids"].reshape(-1)).reshape(b, -1)
            emb = emb + self.add_embedding(jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], -1))
        return sample, emb

    def _encode(self, x, emb, encoder_hidden_states) -> tuple[list[list], jax.Array]:
        """From conv_in's output: (the skip states per level: [[conv_in's output], states of down block 0, ...],
        the mid block's output)."""
        levels = [[x]]
        for block in self.down_blocks:
            x, states = block(x, emb, encoder_hidden_states)
            levels.append(states)
        return levels, self.mid_block(x, emb, encoder_hidden_states)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, opts: ModelOptions = ModelOptions(), shardings=None,
                        variant: str | None = None):
        """Load a diffusers model folder (config.json + safetensors, ``variant`` e.g. 'fp16' picks
        ``diffusion_pytorch_model.fp16.safetensors``) without torch and without random init."""
        config = read_config(folder)
        files = weight_files(folder, variant)
        return build_model(lambda: cls(config, opts=opts, rngs=nnx.Rngs(0)), files, shardings=shardings)


class UNet2DConditionModel(UNetEncoder):
    """Noise/velocity predictor: (latents NHWC, timesteps, text states, added conds) -> output NHWC."""

    def __init__(self, config: dict, *, opts: ModelOptions = ModelOptions(), rngs: nnx.Rngs):
        cfg = checked_config(config)
        self._init_encoder(cfg, opts=opts, rngs=rngs)
        chans = list(cfg["block_out_channels"])
        n = len(chans)
        heads = cfg["attention_head_dim"]
        groups, eps, linear = cfg["norm_num_groups"], cfg["norm_eps"], bool(cfg["use_linear_projection"])
        temb_ch = 4 * chans[0]
        up = []
        for i, kind in enumerate(cfg["up_block_types"]):
            j = n - 1 - i  # the level this up block mirrors
            cross = kind == "CrossAttnUpBlock2D"
            up.append(UpBlock2D(
                chans[max(j - 1, 0)], chans[min(j + 1, n - 1)], chans[j], temb_ch,
                layers=cfg["layers_per_block"][j] + 1, add_upsample=j > 0, groups=groups, eps=eps,
                heads=heads[j] if cross else None, transformer_layers=cfg["transformer_layers_per_block"][j],
                context_dim=cfg["cross_attention_dim"][j], linear_projection=linear, opts=opts, rngs=rngs))
        self.up_blocks = nnx.List(up)

        k_out = cfg["conv_out_kernel"]
        self.conv_norm_out = GroupNorm(groups, chans[0], eps=eps, opts=opts)
        self.conv_out = Conv2d(chans[0], cfg["out_channels"], k_out, padding=(k_out - 1) // 2, opts=opts, rngs=rngs)

    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs: dict | None = None, *,
                 down_block_additional_residuals=None, mid_block_additional_residual=None):
        """sample (B, H, W, C) NHWC; timesteps (B,) or scalar; encoder_hidden_states (B, T, D);
        added_cond_kwargs {'text_embeds': (B, E), 'time_ids': (B, 6)} for text_time models.

        down_block_additional_residuals / mid_block_additional_residual: a ControlNet's outputs (NHWC, one per
        skip state: ``skip_channels``), added to the skip connections and to the mid block's output as diffusers'
        UNet2DConditionModel does; pass both or neither.
        """
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("pass both down_block_additional_residuals and mid_block_additional_residual "
                             "(a ControlNet's outputs) or neither")
        if down_block_additional_residuals is not None and \
                len(down_block_additional_residuals) != len(self.skip_channels):
            raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} entries "
                             f"for the UNet's {len(self.skip_channels)} skip connections")
        sample, emb = self._embed(sample, timesteps, added_cond_kwargs)
        levels, x = self._encode(self.conv_in(sample), emb, encoder_hidden_states)
        skips = [s for level in levels for s in level]
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
            x = x + mid_block_additional_residual
        for block in self.up_blocks:
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            size = skips[-1].shape[1:3] if block.upsamplers is not None else None
            x = block(x, res, emb, encoder_hidden_states, size)
        return self.conv_out(silu(self.conv_norm_out(x)))

    def encoder_features(self, sample, timesteps, encoder_hidden_states,
                         added_cond_kwargs: dict | None = None) -> list:
        """The output of every down block and of the mid block (NHWC; SDXL: 320, 640, 1280, 1280 channels),
        without running the up blocks: the feature pyramid a UNet-encoder discriminator (PCM, TDD-adv) reads."""
        sample, emb = self._embed(sample, timesteps, added_cond_kwargs)
        levels, mid = self._encode(self.conv_in(sample), emb, encoder_hidden_states)
        return [states[-1] for states in levels[1:]] + [mid]

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """Channels of ``encoder_features``' outputs: each level's width, then the mid block's."""
        chans = tuple(self.config["block_out_channels"])
        return chans + chans[-1:]
