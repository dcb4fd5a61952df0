"""Small random-weight models in SDXL's architecture, built with diffusers/transformers (the parity oracle).

Every test that compares against PyTorch (UNet, text encoders, VAE, pipeline, trainer, conversion) uses these
configs so that the shapes exercised are SDXL's: two text encoders whose hidden sizes add up to the UNet's
cross-attention width, a projected pooled embedding feeding the text_time added conditions, a VAE with a
mid-block attention and an asymmetric-padding downsampler. Norm layers are given random affine parameters
(PyTorch initialises them to 1/0), so a swapped or skipped norm weight cannot pass a parity test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# diffusers/transformers are imported where models are built: conftest imports this module in every session.

# --- tokenizer --------------------------------------------------------------------------------------------

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Words that get whole-word BPE tokens; any other text still tokenizes (down to single bytes).
_WORDS = (
    "a an the of on in with and at by photo picture painting portrait drawing sketch render cat dog horse bird "
    "fish astronaut robot man woman girl boy child person sitting standing riding running flying swimming "
    "red blue green yellow black white orange purple golden silver house tree chair table car boat city street "
    "mountain lake river ocean beach forest garden flower park sky cloud sun moon night day sunset sunrise snow "
    "rain beautiful detailed cinematic lighting digital art style high quality realistic oil watercolor "
    "landscape close up wearing hat space mars castle"
).split()


def _byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE uses for the bytes 0..255 (CLIP/GPT-2 convention):
    printable Latin-1 bytes stand for themselves, the others are shifted to code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _word_merges(words) -> list[tuple[str, str]]:
    """Left-to-right merge chains that turn each word into one end-of-word token ('cat' -> c a, ca t</w>)."""
    merges: dict[tuple[str, str], None] = {}
    for word in words:
        token = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + ("</w>" if i == len(word) - 1 else "")
            merges[(token, piece)] = None
            token += piece
    return list(merges)


def write_tokenizer(folder: str | Path, *, pad_token: str = EOS) -> Path:
    """Write a CLIP-format tokenizer (vocab.json, merges.txt, tokenizer_config.json) to ``folder``.

    Layout as in CLIP: byte tokens, byte tokens + '</w>', merge results, then <|startoftext|> and
    <|endoftext|> as the two highest ids. SDXL's tokenizer pads with <|endoftext|>, its tokenizer_2 with '!'.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    merges = _word_merges(_WORDS)
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def tokenizer_vocab_size() -> int:
    return 2 * 256 + len(_word_merges(_WORDS)) + 2


# --- model configs ----------------------------------------------------------------------------------------

def tiny_clip_configs() -> tuple[dict, dict]:
    """(text_encoder, text_encoder_2) configs as CLIPTextConfig kwargs.

    The first uses SDXL's legacy eos_token_id=2 (pooling = argmax of ids) and quick_gelu; the second the
    tokenizer's real EOS id (pooling = first EOS position), gelu and a projection, like OpenCLIP bigG.
    """
    vocab = tokenizer_vocab_size()
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5)
    first = dict(common, hidden_act="quick_gelu", projection_dim=32, bos_token_id=0, eos_token_id=2,
                 pad_token_id=1)
    second = dict(common, hidden_act="gelu", projection_dim=32, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                  pad_token_id=vocab - 1)
    return first, second


def tiny_unet_config() -> dict:
    """An SDXL-style UNet2DConditionModel config: text_time added conditions, 2 transformer layers in a level.

    ``attention_head_dim`` is diffusers' (misnamed) number of heads, as in SDXL's config (5, 10, 20).
    """
    first, second = tiny_clip_configs()
    time_dim = 8
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        cross_attention_dim=first["hidden_size"] + second["hidden_size"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + second["projection_dim"],
    )


def tiny_sd15_unet_config() -> dict:
    """An SD1.5-style config: attention in the first levels, conv projections, one text encoder, no added conds."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        attention_head_dim=8,
        norm_num_groups=8,
        cross_attention_dim=tiny_clip_configs()[0]["hidden_size"],
    )


def tiny_vae_config() -> dict:
    """An SDXL-style AutoencoderKL config with 2 levels (spatial factor 2) and 4 latent channels."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.13025,
    )


SDXL_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", prediction_type="epsilon", timestep_spacing="leading",
                             steps_offset=1)


# --- building ---------------------------------------------------------------------------------------------

def randomize_norms(model: torch.nn.Module, generator: torch.Generator, std: float = 0.1) -> torch.nn.Module:
    """Give every LayerNorm/GroupNorm a random affine transform (weight 1 + N(0, std²), bias N(0, std²))."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and module.weight is not None:
                module.weight.copy_(1 + std * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(std * torch.randn(module.bias.shape, generator=generator))
    return model


def build_tiny_models(seed: int = 0) -> dict:
    """The random PyTorch components of a tiny SDXL pipeline (eval mode, fp32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    first, second = tiny_clip_configs()
    models = {
        "unet": UNet2DConditionModel(**tiny_unet_config()),
        "vae": AutoencoderKL(**tiny_vae_config()),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**first)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**second)),
    }
    return {name: randomize_norms(m, gen).eval() for name, m in models.items()}


def save_tiny_sdxl_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save a random tiny ``StableDiffusionXLPipeline`` in diffusers format (safetensors) to ``path``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    path = Path(path)
    # The tokenizer folders are written in place; save_pretrained then rewrites them in its own format.
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(path / "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_tokenizer(path / "tokenizer_2", pad_token="!"))
    pipe = StableDiffusionXLPipeline(
        **build_tiny_models(seed), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG), add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# --- comparison -------------------------------------------------------------------------------------------

def assert_parity(name: str, actual, expected, rtol: float = 1e-4) -> float:
    """Assert max |actual - expected| <= rtol * max(1, max |expected|) (the project's parity bound).

    Returns the measured max abs error so tests can report it.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs reference {expected.shape}"
    err = float(np.abs(actual - expected).max())
    bound = rtol * max(1.0, float(np.abs(expected).max()))
    assert err <= bound, f"{name}: max abs error {err:.3g} exceeds {bound:.3g}"
    print(f"{name}: max abs error {err:.3g} (bound {bound:.3g})")
    return err
