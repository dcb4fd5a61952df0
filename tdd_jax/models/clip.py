"""CLIP text encoders as SDXL uses them: CLIPTextModel (text_encoder) and CLIPTextModelWithProjection
(text_encoder_2), built from a transformers ``CLIPTextConfig`` dict.

Module names mirror transformers (v5 layout: ``embeddings``, ``encoder.layers.N``, ``final_layer_norm`` at the
top of CLIPTextModel; ``text_model.*`` + ``text_projection`` in the projection model), so state paths are
the checkpoint keys. SDXL conditions on the *penultimate* hidden state (before the final layer norm) of both
encoders and on the projected pooled (EOS) output of the second one; all three are returned.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tdd_jax.models.layers import Embedding, LayerNorm, Linear, ModelOptions, attention, gelu_exact, scan_identical
from tdd_jax.models.loading import build_model, checkpoint_keys, read_config

# transformers' CLIPTextConfig defaults, for keys a config.json leaves out.
_CONFIG_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                        num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)

# SDXL base 1.0 text_encoder (CLIP ViT-L/14 text tower) and text_encoder_2 (OpenCLIP ViT-bigG/14 text tower).
SDXL_TEXT_ENCODER_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                                num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                                pad_token_id=1)
SDXL_TEXT_ENCODER_2_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                                  num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                                  hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                                  pad_token_id=1)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": gelu_exact,
}

# Non-persistent buffers that older transformers versions wrote into checkpoints; they carry no weights.
_POSITION_ID_KEYS = ("embeddings.position_ids", "text_model.embeddings.position_ids")


def _config(config: dict) -> dict:
    cfg = {**_CONFIG_DEFAULTS, **config}
    if cfg["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"unsupported CLIP hidden_act {cfg['hidden_act']!r}; expected one of {sorted(ACTIVATIONS)}")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"hidden_size {cfg['hidden_size']} is not divisible by {cfg['num_attention_heads']} heads")
    return cfg


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TextEncoderOutput:
    """last_hidden_state: after the final layer norm (B, T, D); penultimate_hidden_state: transformers'
    ``hidden_states[-2]`` (SDXL's prompt embedding); pooler_output: last_hidden_state at the EOS token (B, D);
    text_embeds: the projected pooled output (B, P), only from CLIPTextModelWithProjection."""

    last_hidden_state: jax.Array
    penultimate_hidden_state: jax.Array
    pooler_output: jax.Array
    text_embeds: jax.Array | None = None


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: dict, *, opts: ModelOptions, rngs: nnx.Rngs):
        self.token_embedding = Embedding(cfg["vocab_size"], cfg["hidden_size"], opts=opts, rngs=rngs)
        self.position_embedding = Embedding(cfg["max_position_embeddings"], cfg["hidden_size"], opts=opts, rngs=rngs)
        self.max_positions = cfg["max_position_embeddings"]

    def __call__(self, input_ids):
        length = input_ids.shape[-1]
        if length > self.max_positions:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {self.max_positions}")
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))[None]


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention (scale 1/√head_dim)."""

    def __init__(self, cfg: dict, *, opts: ModelOptions, rngs: nnx.Rngs):
        dim = cfg["hidden_size"]
        self.heads, self.impl = cfg["num_attention_heads"], opts.attention_impl
        self.k_proj = Linear(dim, dim, opts=opts, rngs=rngs)
        self.v_proj = Linear(dim, dim, opts=opts, rngs=rngs)
        self.q_proj = Linear(dim, dim, opts=opts, rngs=rngs)
        self.out_proj = Linear(dim, dim, opts=opts, rngs=rngs)

    def __call__(self, x):
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), heads=self.heads, impl=self.impl,
                        is_causal=True)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: dict, *, opts: ModelOptions, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[cfg["hidden_act"]]
        self.fc1 = Linear(cfg["hidden_size"], cfg["intermediate_size"], opts=opts, rngs=rngs)
        self.fc2 = Linear(cfg["intermediate_size"], cfg["hidden_size"], opts=opts, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: dict, *, opts: ModelOptions, rngs: nnx.Rngs):
        dim, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.self_attn = CLIPAttention(cfg, opts=opts, rngs=rngs)
        self.layer_norm1 = LayerNorm(dim, eps=eps, opts=opts)
        self.mlp = CLIPMLP(cfg, opts=opts, rngs=rngs)
        self.layer_norm2 = LayerNorm(dim, eps=eps, opts=opts)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: dict, *, opts: ModelOptions, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, opts=opts, rngs=rngs) for _ in range(cfg["num_hidden_layers"])])
        self.scan = opts.scan_blocks

    def __call__(self, x):
        """Returns (last layer output, the hidden state before the last layer = transformers' hidden_states[-2])."""
        *first, last = self.layers
        if self.scan and len(first) > 1:
            x = scan_identical(first, CLIPEncoderLayer.__call__, x, name="layers")
        else:
            for layer in first:
                x = layer(x)
        return last(x), x


def _from_pretrained(cls, folder: str | Path, opts: ModelOptions, shardings: Any, prefix: str):
    config = read_config(folder)
    return build_model(lambda: cls(config, opts=opts, rngs=nnx.Rngs(0)), folder, shardings=shardings,
                       prefix=prefix, ignore_prefixes=_POSITION_ID_KEYS)


class CLIPTextModel(nnx.Module):
    """transformers.CLIPTextModel: token ids (B, T) -> ``TextEncoderOutput`` (no text_embeds)."""

    def __init__(self, config: dict, *, opts: ModelOptions, rngs: nnx.Rngs):
        cfg = _config(config)
        self.embeddings = CLIPTextEmbeddings(cfg, opts=opts, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, opts=opts, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"], opts=opts)
        self.eos_token_id = cfg["eos_token_id"]

    def pool(self, last_hidden_state, input_ids):
        """The hidden state at the EOS token, chosen exactly as transformers does.

        Configs with the legacy eos_token_id == 2 (SDXL's) take the position of the largest id (the EOS token is
        the highest id in CLIP's vocabulary); others take the first position holding eos_token_id.
        """
        if self.eos_token_id == 2:
            index = jnp.argmax(input_ids, axis=-1)
        else:
            index = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]

    def __call__(self, input_ids) -> TextEncoderOutput:
        last, penultimate = self.encoder(self.embeddings(input_ids))
        last = self.final_layer_norm(last)
        return TextEncoderOutput(last, penultimate, self.pool(last, input_ids))

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, opts: ModelOptions = ModelOptions(), shardings: Any = None):
        """Load a transformers folder (config.json + model.safetensors), e.g. an SDXL pipeline's text_encoder/.

        transformers < 5 saved this model's weights under 'text_model.' (as in SDXL's published files);
        transformers 5 saves them at the top level. Both layouts load.
        """
        legacy = any(k.startswith("text_model.") for k in checkpoint_keys(folder))
        return _from_pretrained(cls, folder, opts, shardings, prefix="text_model." if legacy else "")


class CLIPTextModelWithProjection(nnx.Module):
    """transformers.CLIPTextModelWithProjection: as CLIPTextModel plus ``text_embeds`` = text_projection(pooled)."""

    def __init__(self, config: dict, *, opts: ModelOptions, rngs: nnx.Rngs):
        cfg = _config(config)
        self.text_model = CLIPTextModel(config, opts=opts, rngs=rngs)
        self.text_projection = Linear(cfg["hidden_size"], cfg["projection_dim"], bias=False, opts=opts, rngs=rngs)

    def __call__(self, input_ids) -> TextEncoderOutput:
        out = self.text_model(input_ids)
        return dataclasses.replace(out, text_embeds=self.text_projection(out.pooler_output))

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, opts: ModelOptions = ModelOptions(), shardings: Any = None):
        """Load a transformers folder (config.json + model.safetensors), e.g. an SDXL pipeline's text_encoder_2/."""
        return _from_pretrained(cls, folder, opts, shardings, prefix="")
