"""CLIP text encoders vs transformers on the tiny SDXL pipeline's encoders, and full-size SDXL shapes."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from tiny_pipeline import assert_parity
from transformers import CLIPTextModel as TorchCLIPTextModel
from transformers import CLIPTextModelWithProjection as TorchCLIPTextModelWithProjection
from transformers import CLIPTokenizer

from tdd_jax.models.clip import (SDXL_TEXT_ENCODER_2_CONFIG, SDXL_TEXT_ENCODER_CONFIG, CLIPTextModel,
                                 CLIPTextModelWithProjection)
from tdd_jax.models.layers import ModelOptions
from tdd_jax.models.loading import count_params

PROMPTS = ["a photo of a cat riding a horse on mars", "", "Zebra!! ünïcode, 42 ... " * 12]

ENCODERS = {  # pipeline subfolder: (tokenizer subfolder, ours, reference)
    "text_encoder": ("tokenizer", CLIPTextModel, TorchCLIPTextModel),
    "text_encoder_2": ("tokenizer_2", CLIPTextModelWithProjection, TorchCLIPTextModelWithProjection),
}


def _input_ids(folder, tokenizer_name, vocab_size, eos_id):
    """Real tokenizer ids (padded to 77, the long prompt truncated) plus random rows that exercise EOS pooling
    corner cases: two EOS tokens, no EOS at all, ids larger than EOS."""
    tok = CLIPTokenizer.from_pretrained(folder / tokenizer_name)
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="np").input_ids
    rng = np.random.default_rng(0)
    rand = rng.integers(0, vocab_size, (3, ids.shape[1]))
    rand[0, [9, 30]] = eos_id
    rand[1][rand[1] == eos_id] = 0
    return np.concatenate([ids, rand]).astype(np.int32)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_matches_transformers(tiny_pipeline_dir, name):
    tok_name, ours_cls, ref_cls = ENCODERS[name]
    folder = tiny_pipeline_dir / name
    ref = ref_cls.from_pretrained(folder).eval()
    ids = _input_ids(tiny_pipeline_dir, tok_name, ref.config.vocab_size, ref.config.eos_token_id)
    assert ids.shape[1] == 77
    with torch.no_grad():
        out = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
        text_model = ref.text_model if hasattr(ref, "text_model") else ref
        pooled = text_model(torch.from_numpy(ids).long()).pooler_output

    ours = ours_cls.from_pretrained(folder)
    got = jax.jit(lambda m, x: m(x))(ours, ids)
    assert_parity(f"{name} last_hidden_state", got.last_hidden_state, out.last_hidden_state)
    assert_parity(f"{name} penultimate_hidden_state", got.penultimate_hidden_state, out.hidden_states[-2])
    assert_parity(f"{name} pooler_output", got.pooler_output, pooled)
    if name == "text_encoder_2":
        assert_parity(f"{name} text_embeds", got.text_embeds, out.text_embeds)
    else:
        assert got.text_embeds is None


def test_legacy_text_model_prefix_and_position_ids(tiny_pipeline_dir, tmp_path):
    """SDXL's published text_encoder stores keys under 'text_model.' and may carry a position_ids buffer."""
    src = tiny_pipeline_dir / "text_encoder"
    tensors = {"text_model." + k: v for k, v in load_file(src / "model.safetensors").items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(src / "config.json", tmp_path / "config.json")

    legacy, current = CLIPTextModel.from_pretrained(tmp_path), CLIPTextModel.from_pretrained(src)
    for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(legacy)), nnx.to_flat_state(nnx.state(current))):
        np.testing.assert_array_equal(a.get_value(), b.get_value())


def test_bf16_compute_close_to_fp32(tiny_pipeline_dir):
    folder = tiny_pipeline_dir / "text_encoder_2"
    ids = np.arange(77, dtype=np.int32)[None] % json.loads((folder / "config.json").read_text())["vocab_size"]
    forward = jax.jit(lambda m, x: m(x))
    ref = forward(CLIPTextModelWithProjection.from_pretrained(folder), ids)
    low = forward(CLIPTextModelWithProjection.from_pretrained(folder, opts=ModelOptions(dtype=jnp.bfloat16)), ids)
    assert low.penultimate_hidden_state.dtype == jnp.bfloat16
    scale = float(jnp.abs(ref.text_embeds).max())
    assert float(jnp.abs(low.text_embeds.astype(jnp.float32) - ref.text_embeds).max()) < 0.05 * scale


@pytest.mark.parametrize("cls, config, expected", [
    (CLIPTextModel, SDXL_TEXT_ENCODER_CONFIG, 123_060_480),
    (CLIPTextModelWithProjection, SDXL_TEXT_ENCODER_2_CONFIG, 694_659_840),
])
def test_sdxl_parameter_counts(cls, config, expected):
    assert count_params(lambda: cls(config, opts=ModelOptions(), rngs=nnx.Rngs(0))) == expected
