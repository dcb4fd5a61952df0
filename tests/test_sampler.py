"""The jitted TDD sampler: schedules, parity with diffusers' TCDScheduler, CFG batching, tuning and clipping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, TCDScheduler

from tdd_jax.diffusion.sampler import (SamplerSettings, _denoise_loop, dynamic_threshold, guided_model_output,
                                       make_sampler, sample, sampler_timesteps)
from tdd_jax.diffusion.schedule import NoiseSchedule

SDXL = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
SCHEDULE = NoiseSchedule.from_config(SDXL)
B, H, W, C = 2, 8, 8, 4
COND, UNCOND = np.array([0.7, -0.4], np.float32), np.array([0.1, 0.2], np.float32)


def fake_eps(x, t, c, xp):
    """A deterministic nonlinear stand-in for the UNet, identical in jax and torch (elementwise, so layout-free)."""
    return (0.3 + t / 2000.0) * x + 0.2 * xp.sin(3.0 * x) + 0.1 * c


def jax_model(x, t, cond):
    return fake_eps(x, t[:, None, None, None].astype(jnp.float32), cond[:, None, None, None], jnp)


def _key(seed: int) -> jax.Array:
    """PRNG keys for tests: RBG, because the threefry kernel alone takes seconds to compile on a busy CPU."""
    return jax.random.key(seed, impl="rbg")


def _x_T(seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, H, W, C)), jnp.float32)


# ---------------------------------------------------------------------------------------------------- timesteps

def test_equidistant_timesteps():
    assert sampler_timesteps(4) == (999, 751, 499, 251)
    assert sampler_timesteps(5) == (999, 799, 599, 399, 199)


def test_non_equidistant_timesteps():
    assert sampler_timesteps(4, non_equidistant=True) == (999, 751, 499, 251)
    assert sampler_timesteps(5, non_equidistant=True) == (999, 875, 751, 499, 251)
    assert sampler_timesteps(6, non_equidistant=True) == (999, 875, 751, 627, 499, 251)
    assert sampler_timesteps(7, non_equidistant=True) == (999, 875, 751, 627, 499, 375, 251)
    assert sampler_timesteps(8, non_equidistant=True) == sampler_timesteps(8)
    # Outside [k_min, k_max] the official sampler is equidistant, and so is ours (reference: REFERENCE.md's
    # 250-grid rule, indices floor(linspace(0, 250, N, endpoint=False)) of the reversed grid).
    for n in (2, 3, 9, 12):
        grid = np.arange(1, 251) * 4 - 1
        expected = tuple(int(t) for t in grid[::-1][np.floor(np.linspace(0, 250, n, endpoint=False)).astype(int)])
        assert sampler_timesteps(n, non_equidistant=True) == expected == sampler_timesteps(n)


@pytest.mark.parametrize("change, field", [
    ({"gamma": 1.5}, "gamma"), ({"final_step": "sde"}, "final_step"), ({"clip_max": 0.5}, "clip_max"),
    ({"w_prime": -1.0}, "w_prime"), ({"clip_steps": -1}, "clip_steps"), ({"clip_percentile": 0.0}, "clip_percentile"),
])
def test_settings_validation_names_field(change, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(SamplerSettings(), **change).validate()


def test_cfg_without_uncond_is_an_error():
    with pytest.raises(ValueError, match="uncond"):
        sample(jax_model, SCHEDULE, SamplerSettings(), _x_T(), _key(0), jnp.asarray(COND))


# ------------------------------------------------------------------------------------- parity with diffusers TCD

def _run_tcd(gamma, guidance_scale, num_steps=4, seed=0):
    """diffusers TCDScheduler on the 250 grid, driven by the torch twin of the fake model. NCHW throughout."""
    tcd = TCDScheduler(**SDXL, original_inference_steps=250)
    tcd.set_timesteps(num_steps)
    x = torch.from_numpy(np.asarray(_x_T()).transpose(0, 3, 1, 2).copy())
    cond, uncond = torch.from_numpy(COND)[:, None, None, None], torch.from_numpy(UNCOND)[:, None, None, None]
    # TCD draws its renoise noise from this generator; replay the same stream for our sampler.
    replay = torch.Generator().manual_seed(seed)
    noise = [torch.randn(x.shape, generator=replay) for _ in range(num_steps - 1)]
    generator = torch.Generator().manual_seed(seed)
    states, last_eps = [], None
    for t in tcd.timesteps:
        out_c, out_u = fake_eps(x, float(t), cond, torch), fake_eps(x, float(t), uncond, torch)
        last_eps = out_u + guidance_scale * (out_c - out_u)
        x = tcd.step(last_eps, t, x, eta=gamma, generator=generator).prev_sample
        states.append(x.numpy().transpose(0, 2, 3, 1))
    noise_nhwc = np.stack([n.numpy().transpose(0, 2, 3, 1) for n in noise] + [np.zeros((B, H, W, C), np.float32)])
    return [int(t) for t in tcd.timesteps], np.stack(states), noise_nhwc, last_eps.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_parity_with_diffusers_tcd(gamma):
    timesteps, ref_states, noise, last_eps = _run_tcd(gamma, guidance_scale=1.7)
    assert timesteps == [999, 751, 499, 251]
    renoise = jnp.asarray(noise) if gamma > 0 else None
    cond, uncond = jnp.asarray(COND), jnp.asarray(UNCOND)
    errors, finals = {}, {}
    for final_step in ("clean", "tcd"):
        settings = SamplerSettings(num_steps=4, gamma=gamma, guidance_scale=1.7, final_step=final_step)
        loop = jax.jit(lambda x, z, s=settings: _denoise_loop(jax_model, SCHEDULE, s, x, z, cond, uncond)[1])
        states = np.asarray(loop(_x_T(), renoise))
        errors[final_step], finals[final_step] = np.abs(states - ref_states).max(axis=(1, 2, 3, 4)), states[-1]
    print(f"gamma={gamma}: per-step max |ours - TCD| clean={errors['clean']} tcd={errors['tcd']}")
    # Every step but the last agrees; with final_step='tcd' the whole trajectory does.
    assert errors["clean"][:-1].max() < 1e-5
    assert errors["tcd"].max() < 1e-5
    # The known last-step difference: TCD stops at ᾱ_0, i.e. TCD = √ᾱ_0·x̂0 + √(1−ᾱ_0)·ε̂ with x̂0 our output.
    ac0 = float(SCHEDULE.alphas_cumprod[0])
    np.testing.assert_allclose(ref_states[-1], ac0**0.5 * finals["clean"] + (1 - ac0) ** 0.5 * last_eps, atol=1e-5)
    assert errors["clean"][-1] > 1e-2  # a real (≈ 0.029·ε̂) difference, not noise


# --------------------------------------------------------------------------------------------- jitted sampler

def test_jitted_sampler_is_deterministic_per_key():
    run = make_sampler(jax_model, SCHEDULE, SamplerSettings(gamma=0.3))
    cond, uncond = jnp.asarray(COND), jnp.asarray(UNCOND)
    a = np.asarray(run(_x_T(), _key(1), cond, uncond))
    b = np.asarray(run(_x_T(), _key(1), cond, uncond))
    c = np.asarray(run(_x_T(), _key(2), cond, uncond))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3  # the key drives the renoise noise


def test_cfg_is_one_batched_call_per_step():
    calls = []

    def counting_model(x, t, cond):
        calls.append((x.shape[0], t.shape[0], cond["emb"].shape[0]))
        return jax_model(x, t, cond["emb"][:, 0])

    settings = SamplerSettings(num_steps=5, non_equidistant=True, gamma=0.2)
    cond, uncond = {"emb": jnp.asarray(COND)[:, None]}, {"emb": jnp.zeros((B, 1))}
    jaxpr = jax.make_jaxpr(lambda x, k, c, u: sample(counting_model, SCHEDULE, settings, x, k, c, u))(
        _x_T(), _key(0), cond, uncond)
    # The model is traced once, as a [uncond; cond] batch of 2B, inside a single scan that runs it N times.
    assert calls == [(2 * B, 2 * B, 2 * B)]
    scans = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 5
    calls.clear()
    no_cfg = dataclasses.replace(settings, guidance_scale=1.0)
    jax.make_jaxpr(lambda x, k, c: sample(counting_model, SCHEDULE, no_cfg, x, k, c))(_x_T(), _key(0), cond)
    assert calls == [(B, B, B)]


def test_guidance_scale_tuning():
    def constant_model(x, t, cond):
        return jnp.broadcast_to(cond[:, None, None, None], x.shape)

    teacher_c, teacher_u, w_prime = np.array([1.0, -2.0], np.float32), np.array([0.5, 0.25], np.float32), 3.5
    student_c = (1 + w_prime) * teacher_c - w_prime * teacher_u  # what LCM-form CFG distillation teaches
    x, t = _x_T(), jnp.asarray(999)
    for scale in (1.0, 2.0):
        settings = SamplerSettings(guidance_scale=scale, w_prime=w_prime)
        out = np.asarray(guided_model_output(constant_model, settings, x, t, jnp.asarray(student_c),
                                             jnp.asarray(teacher_u)))[:, 0, 0, 0]
        guided = teacher_u + scale * (student_c - teacher_u)
        np.testing.assert_allclose(out, (guided + w_prime * teacher_u) / (1 + w_prime), rtol=1e-6)
        if scale == 1.0:
            np.testing.assert_allclose(out, teacher_c, rtol=1e-6)  # tuning undoes the distilled guidance
    # The sampler uses it: one clean step returns x̂0 = (x − σ·ε̂)/α with the tuned ε̂.
    settings = SamplerSettings(num_steps=1, guidance_scale=2.0, w_prime=w_prime)
    out = sample(constant_model, SCHEDULE, settings, x, _key(0), jnp.asarray(student_c),
                 jnp.asarray(teacher_u))
    eps = guided_model_output(constant_model, settings, x, t, jnp.asarray(student_c), jnp.asarray(teacher_u))
    np.testing.assert_allclose(np.asarray(out), np.asarray((x - SCHEDULE.sigma(999) * eps) / SCHEDULE.alpha(999)),
                               rtol=1e-5, atol=1e-5)


def test_dynamic_threshold_matches_diffusers():
    x0 = 4.0 * np.random.default_rng(0).standard_normal((3, C, H, W)).astype(np.float32)
    x0[2] *= 0.1  # a sample whose percentile is below 1: left unscaled
    ref = DDPMScheduler(**SDXL, thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=3.0)
    expected = ref._threshold_sample(torch.from_numpy(x0)).numpy().transpose(0, 2, 3, 1)
    ours = dynamic_threshold(jnp.asarray(x0.transpose(0, 2, 3, 1)), 0.995, 3.0)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-6, atol=1e-6)


def test_clipping_bounds_x0_and_uses_dpm_solver_pp_update():
    def wild_model(x, t, cond):
        return -8.0 * x  # ε̂ = −8x: x̂0 far outside [−1, 1]

    x = _x_T()
    clipped = SamplerSettings(num_steps=2, gamma=0.0, guidance_scale=1.0, clip_steps=2, clip_max=3.0)
    assert np.abs(np.asarray(sample(wild_model, SCHEDULE, clipped, x, _key(0), None))).max() <= 1.0 + 1e-6
    # Clip the first step only: the second (clean) step returns an unclipped x̂0, and the first step must be
    # DPM-Solver++(1) in data-prediction form: x_s = (σ_s/σ_t)·x − α_s·(e^{−h} − 1)·clip(x̂0), h = λ_s − λ_t.
    first_only = dataclasses.replace(clipped, clip_steps=1)
    final, states = _denoise_loop(wild_model, SCHEDULE, first_only, x, None, None, None)
    assert np.abs(np.asarray(final)).max() > 1.5
    t, s = 999, 499
    x0 = dynamic_threshold((x - SCHEDULE.sigma(t) * wild_model(x, None, None)) / SCHEDULE.alpha(t), 0.995, 3.0)
    h = SCHEDULE.lam(s) - SCHEDULE.lam(t)
    expected = SCHEDULE.sigma(s) / SCHEDULE.sigma(t) * x - SCHEDULE.alpha(s) * jnp.expm1(-h) * x0
    np.testing.assert_allclose(np.asarray(states[0]), np.asarray(expected), rtol=1e-5, atol=1e-5)
