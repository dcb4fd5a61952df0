"""The tiny SDXL's architecture: its component configs, in the diffusers/transformers config.json format.

SDXL in miniature, block for block: a UNet with DownBlock2D + two CrossAttnDownBlock2D levels (mirrored up
blocks, a cross-attention mid block), linear transformer projections, ``text_time`` added conditions (pooled
text embedding + six micro-conditioning time ids); two CLIP text encoders (quick_gelu, then gelu with a
projection) whose penultimate states are concatenated into the cross-attention context; an AutoencoderKL
with a mid-block attention and 4 latent channels.

Why 64×64 images -> 16×16×4 latents (a ×4 VAE, three levels, instead of SDXL's ×8): at ×8 the 64-pixel emoji
would be squeezed into 8×8×4 numbers, which blurs their faces and flags beyond recognition, and the UNet would
be left with 8/4/2-pixel levels. At ×4 the VAE reconstructs well after a few minutes of CPU training and the
UNet keeps SDXL's three resolutions (16/8/4, cross-attention at 8 and 4), at a cost the CPU budget allows.

Why these widths (timed on a 2-core CPU, where XLA runs a step on both cores at wall ≈ 0.6 × CPU time): the
VAE's cost is almost all at 64×64, so its first level is only 16 channels wide (0.9 s per 16 images, against
about twice that at 32 channels) and 1,000 steps take 15 minutes. The UNet's cost is at 16×16; it is SDXL's
shape at a quarter of the widths per level (32/64/128, one resnet per level; SDXL: 320/640/1280, two), 0.5 s
per 32 latents, which buys ~6,000 steps in the budget. Its first trial, 64/128/128 at 1.15 s per batch, reached
only 3,000 steps (28 passes over the data) and its samples ignored the captions; the narrower UNet
trained for twice the steps on the teacher's four emoji groups (see teacher.py) sees each image ~300 times.
Weights: UNet 4.3 M, VAE 0.7 M, text encoders 2 × 0.37 M parameters: 11 MB in fp16.
"""

from __future__ import annotations

IMAGE_SIZE = 64
LATENT_SIZE = 16
MAX_TOKENS = 77  # CLIP's context: the pipeline pads every prompt to it

VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64], "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4,
    "norm_num_groups": 8, "sample_size": IMAGE_SIZE, "mid_block_add_attention": True, "force_upcast": False,
    "scaling_factor": 1.0,  # replaced by 1/std of the trained VAE's latents (SDXL's is 0.13025)
}

TEXT_HIDDEN = (64, 64)  # text_encoder, text_encoder_2 widths; the UNet's context is their sum
POOLED_DIM = 64  # text_encoder_2 projection
TIME_EMBED_DIM = 32  # per micro-conditioning id (SDXL: 256)


def text_encoder_configs(vocab_size: int) -> tuple[dict, dict]:
    """CLIPTextConfig fields of (text_encoder, text_encoder_2) for a tokenizer of ``vocab_size`` tokens whose
    two highest ids are <|startoftext|> and <|endoftext|> (see tokenizer.py)."""
    common = {"vocab_size": vocab_size, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": MAX_TOKENS, "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
              "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1}
    first = {**common, "hidden_size": TEXT_HIDDEN[0], "intermediate_size": 4 * TEXT_HIDDEN[0],
             "hidden_act": "quick_gelu", "projection_dim": TEXT_HIDDEN[0]}
    second = {**common, "hidden_size": TEXT_HIDDEN[1], "intermediate_size": 4 * TEXT_HIDDEN[1],
              "hidden_act": "gelu", "projection_dim": POOLED_DIM}
    return first, second


UNET_CONFIG = {
    "sample_size": LATENT_SIZE, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [32, 64, 128], "layers_per_block": 1, "transformer_layers_per_block": [1, 1, 1],
    "attention_head_dim": [1, 2, 4],  # diffusers' name for the number of heads (32 channels each)
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": sum(TEXT_HIDDEN),
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + POOLED_DIM, "flip_sin_to_cos": True,
    "freq_shift": 0, "act_fn": "silu", "center_input_sample": False,
}
