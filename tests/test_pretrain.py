"""The tiny SDXL recipe on miniature models: tokenizer files, VAE and teacher steps, resumable loop, assembly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_pipeline import tiny_unet_config, tiny_vae_config
from transformers import CLIPTokenizer

from tdd_jax.conditioning import time_ids, tokenize
from tdd_jax.diffusion.schedule import NoiseSchedule
from tdd_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from tdd_jax.models.layers import ModelOptions
from tdd_jax.models.unet import UNet2DConditionModel
from tdd_jax.models.vae import AutoencoderKL
from tdd_jax.pretrain import loop
from tdd_jax.pretrain.architecture import text_encoder_configs
from tdd_jax.models import lora as lora_lib
from tdd_jax.models.controlnet import ControlNetModel, controlnet_config
from tdd_jax.pretrain.assemble import SCHEDULER_CONFIG, assemble, save_component
from tdd_jax.pretrain.controlnet import controlnet_loss
from tdd_jax.pretrain.style_lora import LoRAFactors, style_loss
from tdd_jax.pretrain.teacher import embed_captions, frozen_text_encoders, min_snr_weight, teacher_loss
from tdd_jax.pretrain.tokenizer import caption_words, learn_merges, write_clip_tokenizer
from tdd_jax.pretrain.vae import vae_loss

# Real emoji names, with the cases that trip tokenizers: non-ASCII letters and quotes, digits, punctuation.
CAPTIONS = ["grinning face", "red heart", "grinning face with big eyes", "flag: Côte d’Ivoire", "keycap: #",
            "woman technologist: medium-dark skin tone", "Japanese “here” button", "see-no-evil monkey",
            "1st place medal", "piñata"]
OPTS = ModelOptions()
# The optimisation-step tests only need the loss and the step to be right: one-level models compile fastest.
ONE_LEVEL = {"block_out_channels": [32], "layers_per_block": 1}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_clip_tokenizer(folder, CAPTIONS)
    return folder


def test_tokenizer_loads_in_clip_tokenizer_and_round_trips(tokenizer_dir):
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(tok) == len(vocab)
    assert (tok.bos_token_id, tok.eos_token_id) == (len(vocab) - 2, len(vocab) - 1)  # EOS is the largest id
    for caption in CAPTIONS:
        ids = tok(caption).input_ids
        words = caption_words([caption])
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) - 2 == sum(words.values()), "every caption word is one token"
        assert tok.eos_token_id not in ids[1:-1], "no unknown tokens"
        # CLIP's decoder separates word tokens by spaces, so compare without spaces.
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == caption.lower().replace(" ", "")
    padded = tokenize(tok, CAPTIONS)
    assert padded.shape == (len(CAPTIONS), 77) and (padded[:, -1] == tok.eos_token_id).all()
    # Text it never saw still tokenizes, down to byte tokens.
    assert tok.decode(tok("zebra").input_ids, skip_special_tokens=True) == "zebra"


def test_merges_are_deterministic_and_capped(tmp_path):
    words = caption_words(CAPTIONS)
    assert learn_merges(words, 1000) == learn_merges(words, 1000)
    assert learn_merges(words, 5) == learn_merges(words, 1000)[:5]
    assert write_clip_tokenizer(tmp_path, CAPTIONS, vocab_size=520) == 520


def _loss_drops(model, loss_fn, batch, lr, steps=2):
    """A few Adam steps through ``loop.make_train_step`` on one fixed (batch, key) lower its loss.

    Each step reports the loss of the parameters it starts from, so one compiled function measures both ends.
    """
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(lr)
    step = loop.make_train_step(graphdef, tx, loss_fn, ema_decay=0.9)
    state, losses = loop.init_state(params, tx, ema=True), []
    for _ in range(steps + 1):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses[0]) and losses[-1] < losses[0], losses
    assert int(state["step"]) == steps + 1 and jax.tree.structure(state["ema"]) == jax.tree.structure(params)


def _random_model(cls, config, seed=0):
    """A model with random weights drawn in numpy (N(0, 1/fan_in) matrices and kernels, unit norms, zero
    biases): building it runs no JAX initialisers, whose compiles would dominate these tests' time."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, opts=OPTS, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        if len(shape) > 1:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:
            value = np.ones(shape) if str(path[-1]) == "weight" else np.zeros(shape)
        flat.append((path, var.replace(jnp.asarray(value, jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def test_vae_steps_reduce_loss():
    config = {**tiny_vae_config(), **ONE_LEVEL, "down_block_types": ["DownEncoderBlock2D"],
              "up_block_types": ["UpDecoderBlock2D"]}
    model = _random_model(AutoencoderKL, config)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    _loss_drops(model, lambda m, x, k: vae_loss(m, x, k, kl_weight=1e-6), images, lr=3e-4)


def _one_level_unet_batch(**extra):
    """A random one-level UNet and a teacher-loss batch of two 8x8 latents for it (plus ``extra`` entries)."""
    config = {**tiny_unet_config(), **ONE_LEVEL, "down_block_types": ["CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D"], "transformer_layers_per_block": 1, "attention_head_dim": 2}
    rng = np.random.default_rng(0)
    mean, logvar = rng.standard_normal((2, 8, 8, 4)), np.full((2, 8, 8, 4), -4.0)
    batch = {"moments": jnp.asarray(np.stack([mean, logvar], axis=1), jnp.float32),
             "prompt_embeds": jnp.asarray(rng.standard_normal((2, 77, config["cross_attention_dim"])), jnp.float32),
             "pooled": jnp.asarray(rng.standard_normal((2, 32)), jnp.float32),
             "time_ids": jnp.asarray(np.tile(time_ids((16, 16)), (2, 1))), **extra}
    return config, _random_model(UNet2DConditionModel, config), batch


TEACHER_LOSS_ARGS = (NoiseSchedule.from_config(SCHEDULER_CONFIG), 1.0, 0.5, 5.0)  # scaling, dropout, Min-SNR γ


def test_teacher_steps_reduce_loss():
    _, model, batch = _one_level_unet_batch()
    _loss_drops(model, lambda m, b, k: teacher_loss(m, b, k, *TEACHER_LOSS_ARGS), batch, lr=3e-3)


def _adapter_trains_beside_the_unet(adapter, adapter_loss, unet, batch):
    """An add-on stage's loss (``adapter_loss(adapter, batch, key, unet_graphdef, ...)``, the UNet's weights in
    ``batch['unet']``) starts at exactly the frozen UNet's teacher loss, and a few steps on the adapter lower it."""
    unet_graphdef, batch["unet"] = nnx.split(unet)
    plain, _ = teacher_loss(unet, batch, jax.random.key(0), *TEACHER_LOSS_ARGS)
    start, _ = adapter_loss(adapter, batch, jax.random.key(0), unet_graphdef, *TEACHER_LOSS_ARGS)
    np.testing.assert_allclose(float(start), float(plain), rtol=1e-6)
    _loss_drops(adapter, lambda m, b, k: adapter_loss(m, b, k, unet_graphdef, *TEACHER_LOSS_ARGS), batch, lr=3e-3)


def test_controlnet_steps_reduce_loss():
    """The ControlNet stage: from ``from_unet`` (zero convolutions) the controlled UNet is the plain one."""
    control = np.random.default_rng(2).uniform(0, 1, (2, 16, 16, 3))
    config, unet, batch = _one_level_unet_batch(control=jnp.asarray(control, jnp.float32))
    net = ControlNetModel.from_unet(unet, controlnet_config(config, conditioning_embedding_out_channels=(8, 16)),
                                    rngs=nnx.Rngs(0))
    _adapter_trains_beside_the_unet(net, controlnet_loss, unet, batch)


def test_style_lora_steps_reduce_loss():
    """The style LoRA stage: a fresh LoRA (B = 0) merged into the UNet leaves it as it is."""
    _, unet, batch = _one_level_unet_batch()
    lora_lib.attach_lora(unet, lora_lib.LoRAConfig(rank=2, alpha=4.0, targets=("to_q", "conv1")), nnx.Rngs(0))
    factors = LoRAFactors(lora_lib.detach_lora(unet))
    assert factors.paths and all(s == 2.0 for s in factors.scales)
    _adapter_trains_beside_the_unet(factors, style_loss, unet, batch)


def test_min_snr_weights_match_diffusers_training_scripts():
    """min(SNR, γ)/SNR as diffusers' text-to-image script weights the ε-loss (compute_snr, γ = 5)."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    t = np.array([0, 1, 50, 200, 500, 999])
    snr = compute_snr(scheduler, torch.from_numpy(t))
    theirs = (torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr).numpy()
    ours = np.asarray(min_snr_weight(NoiseSchedule.from_config(SCHEDULER_CONFIG), jnp.asarray(t), 5.0))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert ours[0] < 0.01 and ours[-1] == 1.0  # clean steps down-weighted, noisy ones untouched
    np.testing.assert_array_equal(min_snr_weight(NoiseSchedule.from_config(SCHEDULER_CONFIG), jnp.asarray(t), 0.0),
                                  np.ones(len(t)))


def test_loop_resumes_exactly(tmp_path):
    def step_fn(state, step):
        noise = loop.epoch_batch(7, step, 10, 3).sum() + jax.random.uniform(loop.step_key(7, step))
        return {"x": state["x"] * 0.5 + noise}, {"x": state["x"]}

    settings = {"seed": 7}
    expected = loop.run("s", tmp_path / "a", {"x": np.float32(1.0)}, step_fn, 6, settings, checkpoint_every=2)

    def failing(state, step):
        if step == 3:
            raise KeyboardInterrupt
        return step_fn(state, step)

    with pytest.raises(KeyboardInterrupt):
        loop.run("s", tmp_path / "b", {"x": np.float32(1.0)}, failing, 6, settings, checkpoint_every=2)
    resumed = loop.run("s", tmp_path / "b", {"x": np.float32(1.0)}, step_fn, 6, settings, checkpoint_every=2)
    assert float(resumed["x"]) == float(expected["x"])
    with pytest.raises(ValueError, match="other settings"):
        loop.run("s", tmp_path / "b", {"x": np.float32(1.0)}, step_fn, 6, {"seed": 8})


def test_frozen_text_encoders_tell_captions_apart(tmp_path):
    write_clip_tokenizer(tmp_path / "tokenizer", CAPTIONS)
    encoders = frozen_text_encoders(tmp_path, seed=0)
    assert (tmp_path / "text_encoder" / "model.safetensors").is_file()
    embeds, pooled = embed_captions(tmp_path, CAPTIONS, encoders)
    assert embeds.shape == (len(CAPTIONS), 77, 128) and pooled.shape == (len(CAPTIONS), 64)
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    cosine = unit @ unit.T
    # "grinning face" and "red heart" share only their length: the pooled vector must still differ.
    assert cosine[0, 1] < 0.95 and (cosine[~np.eye(len(CAPTIONS), dtype=bool)] < 0.99).all(), cosine


def test_assembled_pipeline_loads_and_generates_in_diffusers(tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    work = tmp_path / "work"
    vocab_size = write_clip_tokenizer(work / "tokenizer", CAPTIONS)
    # Text encoders shaped for the tiny UNet: contexts 32 + 32 = its cross_attention_dim, pooled 32.
    te_configs = [{**c, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32}
                  for c in text_encoder_configs(vocab_size)]
    components = {"text_encoder": (CLIPTextModel, te_configs[0]),
                  "text_encoder_2": (CLIPTextModelWithProjection, te_configs[1]),
                  "vae": (AutoencoderKL, tiny_vae_config()), "unet": (UNet2DConditionModel, tiny_unet_config())}
    for seed, (name, (cls, config)) in enumerate(components.items()):
        save_component(work / name, name, _random_model(cls, config, seed), config)
    out = assemble(work, tmp_path / "pipeline", recipe={"seed": 0})
    assert json.loads((out / "recipe.json").read_text()) == {"seed": 0}

    pipe = StableDiffusionXLPipeline.from_pretrained(str(out))  # no dtype: what a user types first
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype} == {torch.float32}
    assert pipe.vae_scale_factor == 2 and pipe.default_sample_size == 8
    image = pipe("grinning face", num_inference_steps=1, guidance_scale=2.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()

    # The shipped fp16 text encoder is what transformers computes from the same files.
    ids = tokenize(pipe.tokenizer_2, ["grinning face"])
    ours = jax.jit(lambda m, x: m(x))(CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2"), ids)
    with torch.no_grad():
        ref = pipe.text_encoder_2(torch.from_numpy(ids).long(), output_hidden_states=True)
    np.testing.assert_allclose(ours.text_embeds, ref.text_embeds.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.penultimate_hidden_state, ref.hidden_states[-2].numpy(), rtol=1e-4, atol=1e-4)
