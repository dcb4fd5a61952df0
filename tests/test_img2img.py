"""img2img with the few-step sampler: TDDPipeline(init_images, strength) = diffusers' StableDiffusionXLImg2ImgPipeline
+ TCDScheduler on the tiny random SDXL (same posterior draw and noise), the timesteps that run = diffusers'
get_timesteps for any strength, and input errors."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.pipeline import TDDPipeline
from tdd_jax.render import initial_latents, posterior_keys, seed_keys

PROMPTS = ["a photo of a cat", "a red car on the street"]
NEGATIVES = [None, "blurry"]
SEEDS = [3, 4]
SIZE = 16
LATENT = (SIZE // 2, SIZE // 2, 4)
# strength 0.5 of 4 steps: the last 2 of 999, 751, 499, 251 run, from the init image noised to t = 499.
IMG2IMG = SamplerSettings(num_steps=4, gamma=0.0, guidance_scale=1.7, final_step="tcd", strength=0.5)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return TDDPipeline.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def init_images():
    """Smooth random images (2, H, W, 3) in [0, 1]."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 1, (len(PROMPTS), 4, 4, 3))
    return np.repeat(np.repeat(coarse, SIZE // 4, axis=1), SIZE // 4, axis=2).astype(np.float32)


def _noises() -> np.ndarray:
    """diffusers' img2img noise per row, NHWC: the first draw from a generator seeded with the row's seed."""
    draws = [torch.randn(1, 4, *LATENT[:2], generator=torch.Generator().manual_seed(s)) for s in SEEDS]
    return torch.cat(draws).numpy().transpose(0, 2, 3, 1)


def _diffusers_img2img(ref, init_images, **kwargs) -> np.ndarray:
    """The images of diffusers' img2img pipeline ``ref`` (TCD scheduler set here), one call per row (``kwargs``
    entries that are lists give one value per row), with the VAE posterior draw replaced by ours (so both encode
    the same sample of the same distribution) and the noise from a seeded generator."""
    from diffusers import TCDScheduler

    ref.scheduler = TCDScheduler.from_config(ref.scheduler.config, original_inference_steps=250)
    ref.set_progress_bar_config(disable=True)
    assert not ref.config.requires_aesthetics_score  # time ids (H, W, 0, 0, H, W) as ours
    posterior = np.asarray(initial_latents(posterior_keys(seed_keys(jnp.asarray(SEEDS, jnp.uint32))[0]), LATENT))
    encode = ref.vae.encode
    images = []
    for i, (prompt, negative) in enumerate(zip(PROMPTS, NEGATIVES)):
        draw = torch.from_numpy(posterior[i:i + 1].transpose(0, 3, 1, 2).copy())

        def encode_with_our_draw(x, *args, draw=draw, **kwargs):
            out = encode(x, *args, **kwargs)
            dist = out.latent_dist
            dist.sample = lambda generator=None: dist.mean + dist.std * draw
            return out

        ref.vae.encode = encode_with_our_draw
        image = torch.from_numpy(init_images[i:i + 1].transpose(0, 3, 1, 2).copy())
        row = {k: v[i] if isinstance(v, list) else v for k, v in kwargs.items()}
        out = ref(prompt=prompt, negative_prompt=negative, image=image, strength=IMG2IMG.strength,
                  num_inference_steps=IMG2IMG.num_steps, guidance_scale=IMG2IMG.guidance_scale, eta=IMG2IMG.gamma,
                  generator=torch.Generator().manual_seed(SEEDS[i]), output_type="np", **row)
        images.append(out.images[0])
    ref.vae.encode = encode
    return np.stack(images)


def test_img2img_matches_diffusers(pipe, tiny_pipeline_dir, init_images):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    ref = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_pipeline_dir, add_watermarker=False)
    expected = _diffusers_img2img(ref, init_images)
    noise = _noises()
    ours = pipe(PROMPTS, IMG2IMG, seeds=SEEDS, negative_prompts=NEGATIVES, init_images=init_images, latents=noise,
                output_type="float")
    err = float(np.abs(ours - expected).max())
    print(f"img2img vs diffusers SDXL img2img + TCD (4 steps, strength 0.5, CFG 1.7): max |image diff| = {err:.2e}")
    assert err <= 1e-4
    # The init image decides the result; text-to-image from the same noise is another image.
    text_to_image = pipe(PROMPTS, dataclasses.replace(IMG2IMG, strength=1.0), seeds=SEEDS,
                         negative_prompts=NEGATIVES, latents=noise, output_type="float")
    other = pipe(PROMPTS, IMG2IMG, seeds=SEEDS, negative_prompts=NEGATIVES, init_images=init_images[::-1],
                 latents=noise, output_type="float")
    effects = float(np.abs(text_to_image - ours).max()), float(np.abs(other - ours).max())
    print(f"effect of the init image: vs text-to-image {effects[0]:.2e}, vs the other init image {effects[1]:.2e}")
    assert min(effects) > 20 * 1e-4
    # The seeds alone (no latents) fix the image: same seeds, same image whatever the batch.
    a = pipe(PROMPTS, IMG2IMG, seeds=SEEDS, init_images=init_images, batch_size=2)
    alone = pipe(PROMPTS[1:], IMG2IMG, seeds=SEEDS[1:], init_images=init_images[1:], batch_size=2)
    np.testing.assert_array_equal(alone[0], a[1])


@pytest.mark.parametrize("num_steps", [4, 6])
def test_timesteps_that_run_are_diffusers_get_timesteps(num_steps):
    from diffusers import StableDiffusionXLImg2ImgPipeline, TCDScheduler

    scheduler = TCDScheduler(original_inference_steps=250)
    holder = type("Holder", (), {"scheduler": scheduler})()
    for strength in (1.0, 0.9, 0.75, 0.5, 0.34, 1 / num_steps):
        scheduler.set_timesteps(num_steps)
        expected, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(holder, num_steps, strength, "cpu")
        ours = SamplerSettings(num_steps=num_steps, strength=strength).timesteps()
        assert list(ours) == expected.tolist(), strength


def test_input_errors(pipe, init_images):
    with pytest.raises(ValueError, match="strength=0.5 < 1 is img2img: it needs init_images"):
        pipe(PROMPTS, IMG2IMG)
    with pytest.raises(ValueError, match=r"strength=0.2 must be in \(0, 1\] and run at least one of the 4 steps"):
        pipe(PROMPTS, dataclasses.replace(IMG2IMG, strength=0.2), init_images=init_images)
    with pytest.raises(ValueError, match="init_images are 16x16 .* asked for 24x16"):
        pipe(PROMPTS, IMG2IMG, init_images=init_images, width=24, height=16)
    with pytest.raises(ValueError, match=r"init_images have shape \(3, 16, 16, 3\)"):
        pipe(PROMPTS, IMG2IMG, init_images=np.concatenate([init_images, init_images[:1]]))


def test_img2img_with_controlnet_matches_diffusers(tiny_pipeline_dir, init_images, tmp_path):
    """img2img under a ControlNet = diffusers' StableDiffusionXLControlNetImg2ImgPipeline + TCD: its guidance window
    spans the steps that run (strength 0.5 of 4: 2 steps; the window (0, 0.5) keeps the first only, where over all 4
    steps it would keep both), per-prompt control images (a PIL image, a float array: both resize paths)."""
    from diffusers import ControlNetModel as TorchControlNet
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline
    from test_controlnet import TINY, control_images, random_controlnet

    random_controlnet(TINY, seed=12).save_pretrained(tmp_path / "controlnet")
    pil, array = control_images()
    window = dict(controlnet_conditioning_scale=0.8, control_guidance_start=0.0, control_guidance_end=0.5)
    ref = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(
        tiny_pipeline_dir, controlnet=TorchControlNet.from_pretrained(tmp_path / "controlnet").eval(),
        add_watermarker=False)
    # diffusers reads a bare (H, W, 3) array as a batch of H images: it takes an array image as a batch of one. Its
    # output size is the control image's unless height and width are given.
    expected = _diffusers_img2img(ref, init_images, control_image=[pil, array[None]], height=SIZE, width=SIZE,
                                  **window)

    pipe = TDDPipeline.from_pretrained(tiny_pipeline_dir, controlnets=tmp_path / "controlnet")
    kwargs = dict(seeds=SEEDS, negative_prompts=NEGATIVES, init_images=init_images, latents=_noises(),
                  output_type="float", control_image=[pil, array])
    ours = pipe(PROMPTS, IMG2IMG, **kwargs, **window)
    err = float(np.abs(ours - expected).max())
    print(f"img2img + ControlNet vs diffusers SDXL ControlNet img2img + TCD: max |image diff| = {err:.2e}")
    assert err <= 1e-4
    whole_window = pipe(PROMPTS, IMG2IMG, **kwargs, **{**window, "control_guidance_end": 1.0})
    assert np.abs(whole_window - ours).max() > 20 * 1e-4  # the window's second step matters
