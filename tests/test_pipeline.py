"""TDDPipeline: image parity with diffusers' StableDiffusionXLPipeline + TCDScheduler on the tiny random SDXL,
the documented final-step difference, per-image determinism, LoRA scale 0 = no LoRA, and input errors."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.models import lora_formats
from tdd_jax.models.loading import read_config
from tdd_jax.models.lora import matches_target
from tdd_jax.models.unet import UNet2DConditionModel
from tdd_jax.pipeline import ImageGeometry, TDDPipeline, check_pipeline_dir

PROMPTS = ["a photo of a cat", "a red car on the street"]
NEGATIVES = [None, "blurry"]  # row 0: SDXL's zero uncond; row 1: an encoded negative prompt
TCD = SamplerSettings(num_steps=4, gamma=0.0, guidance_scale=1.7, final_step="tcd")
CLEAN = dataclasses.replace(TCD, final_step="clean")  # the official TDD last step (to x̂0)
SIZE = 16  # the tiny pipeline's default: UNet sample_size 8 x VAE factor 2


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return TDDPipeline.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def initial_latents():
    """torch NCHW noise (diffusers' layout) for the two prompts."""
    return torch.randn(len(PROMPTS), 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def diffusers_reference(tiny_pipeline_dir, initial_latents):
    """diffusers' images, final latents and the latents entering the last step, one call per row (a call
    cannot mix a zero uncond with a negative prompt)."""
    from diffusers import StableDiffusionXLPipeline, TCDScheduler

    ref = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir, add_watermarker=False)
    ref.scheduler = TCDScheduler.from_config(ref.scheduler.config, original_inference_steps=250)
    ref.set_progress_bar_config(disable=True)
    assert ref.config.force_zeros_for_empty_prompt  # negative_prompt=None -> all-zero uncond embeddings
    out = {"images": [], "latents": [], "before_last": []}
    for i, (prompt, negative) in enumerate(zip(PROMPTS, NEGATIVES)):
        kwargs = dict(prompt=prompt, negative_prompt=negative, latents=initial_latents[i:i + 1],
                      num_inference_steps=TCD.num_steps, guidance_scale=TCD.guidance_scale, eta=TCD.gamma,
                      height=SIZE, width=SIZE)
        out["images"].append(ref(**kwargs, output_type="np").images[0])
        steps = []

        def keep(pipeline, step, t, tensors):
            steps.append(tensors["latents"].clone())
            return tensors

        latents = ref(**kwargs, output_type="latent", callback_on_step_end=keep).images
        out["latents"].append(latents[0].numpy().transpose(1, 2, 0))
        out["before_last"].append(steps[-2][0].numpy().transpose(1, 2, 0))
    return {k: np.stack(v) for k, v in out.items()}, ref.scheduler.alphas_cumprod.numpy().astype(np.float64)


def _clean_latents(pipe, initial_latents):
    return pipe(PROMPTS, CLEAN, negative_prompts=NEGATIVES, latents=initial_latents.numpy().transpose(0, 2, 3, 1),
                output_type="latent")


def test_parity_with_diffusers_tcd(pipe, initial_latents, diffusers_reference):
    """final_step='tcd' gives diffusers' images. final_step='clean' differs only in the last step: TCD lands on
    ᾱ_0 (x = α_0·x̂0 + σ_0·ε̂) where ours returns x̂0; with the latents entering that step (t = 251,
    x = α_t·x̂0 + σ_t·ε̂) diffusers' pair solves for x̂0, which must be our clean output."""
    ref, ac = diffusers_reference
    ours = pipe(PROMPTS, TCD, negative_prompts=NEGATIVES, latents=initial_latents.numpy().transpose(0, 2, 3, 1),
                output_type="float")
    err = float(np.abs(ours - ref["images"]).max())
    print(f"pipeline parity vs diffusers TCD (4 steps, CFG 1.7, gamma 0): max |image diff| = {err:.2e}")
    assert err <= 1e-4

    clean = _clean_latents(pipe, initial_latents)
    t = TCD.timesteps()[-1]
    a0, s0, at, st = np.sqrt(ac[0]), np.sqrt(1 - ac[0]), np.sqrt(ac[t]), np.sqrt(1 - ac[t])
    x0 = (st * ref["latents"] - s0 * ref["before_last"]) / (st * a0 - s0 * at)
    err = float(np.abs(clean - x0).max())
    gap = float(np.abs(clean - ref["latents"]).max())
    print(f"final_step='clean' vs x0 recovered from diffusers' last TCD step: {err:.2e} (TCD remnant {gap:.2e})")
    assert err <= 1e-4 * max(1.0, float(np.abs(x0).max()))
    assert gap > 1e-2  # the two final steps really differ


def test_cfg_without_negative_prompts_matches_diffusers(pipe, initial_latents, diffusers_reference):
    """With no negative prompt at all the 2B encoder pass is skipped (the uncond is SDXL's zeros): row 0 is
    still diffusers' image with negative_prompt=None."""
    ref, _ = diffusers_reference
    ours = pipe(PROMPTS, TCD, latents=initial_latents.numpy().transpose(0, 2, 3, 1), output_type="float")
    assert float(np.abs(ours[0] - ref["images"][0]).max()) <= 1e-4


def test_same_seed_gives_the_same_image_whatever_the_batch(pipe):
    settings = SamplerSettings()  # γ = 0.2: the renoise stream comes from the seed too
    a = pipe(PROMPTS, settings, seeds=[3, 4], batch_size=2)
    assert a.dtype == np.uint8 and a.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(a, pipe(PROMPTS, settings, seeds=[3, 4], batch_size=2))
    alone = pipe(PROMPTS[1:], settings, seeds=[4], batch_size=2)  # other row, other position, padded batch
    np.testing.assert_array_equal(alone[0], a[1])
    other = pipe(PROMPTS[1:], settings, seeds=[5], batch_size=2)
    assert np.abs(other[0].astype(int) - a[1]).max() > 0


def _lora_file(pipeline_dir, path, targets=("to_q", "conv1")):
    """A rank-4 diffusers-format UNet LoRA on a few layers (few, to keep compiling cheap), with random up weights
    so that it changes the output."""
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(read_config(pipeline_dir / "unet"), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    lora = {}
    for name, shape in lora_formats.layer_shapes(unet).items():
        if matches_target(name, targets):
            up = (shape[0], 4) + (1, 1) * (len(shape) == 4)
            lora[name] = lora_formats.ModuleLoRA(0.1 * rng.standard_normal((4, *shape[1:]), np.float32),
                                                 0.1 * rng.standard_normal(up, np.float32), 1.0)
    save_file(lora_formats.to_diffusers(lora), str(path))
    return path, len(lora)


def test_lora_scale_zero_equals_no_lora(pipe, tiny_pipeline_dir, initial_latents, tmp_path):
    lora, modules = _lora_file(tiny_pipeline_dir, tmp_path / "lora.safetensors")
    base = _clean_latents(pipe, initial_latents)
    off = TDDPipeline.from_pretrained(tiny_pipeline_dir, lora=lora, lora_scale=0.0)
    on = TDDPipeline.from_pretrained(tiny_pipeline_dir, lora=lora, lora_scale=1.0)
    assert off.lora_info["loras"][0]["modules"] == {"unet": modules}
    np.testing.assert_array_equal(_clean_latents(off, initial_latents), base)
    assert np.abs(_clean_latents(on, initial_latents) - base).max() > 1e-3


def test_input_errors(pipe, tiny_pipeline_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_pipeline_dir, partial, ignore=shutil.ignore_patterns("vae", "tokenizer_2"))
    with pytest.raises(FileNotFoundError, match=r"missing component folders \['vae', 'tokenizer_2'\]"):
        check_pipeline_dir(partial)
    geometry = ImageGeometry.from_pretrained(tiny_pipeline_dir)
    assert (geometry.vae_factor, geometry.unet_factor, geometry.multiple) == (2, 2, 4)
    assert geometry.latent_shape(24, 16) == (12, 8, 4)
    with pytest.raises(ValueError, match="height=18 is not a positive multiple of 4"):
        geometry.latent_shape(18, 16)
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 prompts"):
        pipe(PROMPTS, seeds=[1])
    with pytest.raises(ValueError, match="latents have shape"):
        pipe(PROMPTS, latents=np.zeros((2, 4, 4, 4)))
