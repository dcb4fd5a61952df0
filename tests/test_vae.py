"""AutoencoderKL vs diffusers on the tiny SDXL pipeline's VAE, sampling, and the full-size SDXL shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx
from tiny_pipeline import assert_parity

from tdd_jax.models.layers import ModelOptions
from tdd_jax.models.loading import count_params
from tdd_jax.models.vae import SDXL_VAE_CONFIG, AutoencoderKL


def _nhwc(t):
    return np.asarray(t).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def vaes(tiny_pipeline_dir):
    folder = tiny_pipeline_dir / "vae"
    return AutoencoderKL.from_pretrained(folder), TorchAutoencoderKL.from_pretrained(folder).eval()


def test_encode_matches_diffusers(vaes):
    ours, ref = vaes
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 24)).astype(np.float32)  # non-square: catches H/W mixups
    with torch.no_grad():
        posterior = ref.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = jax.jit(lambda m, v: m.encode(v))(ours, _nhwc(x))
    assert_parity("vae mean", mean, _nhwc(posterior.mean))
    assert_parity("vae logvar", logvar, _nhwc(posterior.logvar))


def test_decode_matches_diffusers(vaes):
    ours, ref = vaes
    z = np.random.default_rng(1).standard_normal((2, 4, 12, 16)).astype(np.float32)
    with torch.no_grad():
        image = ref.decode(torch.from_numpy(z)).sample
    got = jax.jit(lambda m, v: m.decode(v))(ours, _nhwc(z))
    assert_parity("vae decode", got, _nhwc(image))


def test_sample_draws_from_the_posterior():
    mean = jnp.full((16384,), 0.5)  # 1-D: multi-dim threefry draws compile for seconds on CPU
    logvar = jnp.full_like(mean, np.log(0.25))
    a = AutoencoderKL.sample(jax.random.key(0), mean, logvar)
    np.testing.assert_array_equal(a, AutoencoderKL.sample(jax.random.key(0), mean, logvar))
    assert abs(float(a.mean()) - 0.5) < 0.02 and abs(float(a.std()) - 0.5) < 0.02


def test_factors_and_unsupported_configs(vaes):
    ours, _ = vaes
    assert ours.scaling_factor == 0.13025 and ours.shift_factor == 0.0
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        AutoencoderKL(dict(SDXL_VAE_CONFIG, down_block_types=("AttnDownEncoderBlock2D",) * 4), opts=ModelOptions(),
                      rngs=nnx.Rngs(0))


def test_sdxl_parameter_count():
    assert count_params(lambda: AutoencoderKL(SDXL_VAE_CONFIG, opts=ModelOptions(), rngs=nnx.Rngs(0))) == 83_653_863
