"""Noise schedule, teacher solver and consistency functions, with diffusers' schedulers as the oracle."""

import json

import jax

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from tdd_jax.diffusion.consistency import consistency_fn, lcm_boundary_fn, lcm_boundary_scalings
from tdd_jax.diffusion.schedule import CLEAN, NoiseSchedule
from tdd_jax.diffusion.solver import (ddim_step, equidistant_timesteps, guide, sample_guidance_weight,
                                      solver_prev_timesteps, solver_timesteps)

SDXL = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def _rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("oracle", [DDPMScheduler, DDIMScheduler])
def test_alphas_cumprod_match_diffusers(beta_schedule, oracle):
    cfg = {**SDXL, "beta_schedule": beta_schedule}
    ours = np.asarray(NoiseSchedule.from_config(cfg).alphas_cumprod)
    ref = oracle(**cfg).alphas_cumprod.numpy()
    # diffusers accumulates in float32 (~1e-6 relative); ours is float64 rounded once. The cosine tail
    # (ᾱ ~ 1e-9) is where float32 accumulation drifts most.
    np.testing.assert_allclose(ours, ref, rtol=3e-5, atol=0)


def test_sdxl_schedule_endpoints():
    sched = NoiseSchedule.from_config(SDXL)
    assert sched.num_train_timesteps == 1000
    np.testing.assert_allclose(float(sched.alpha_cumprod(0)), 0.99915, rtol=1e-6)
    np.testing.assert_allclose(float(sched.alpha_cumprod(999)), 0.00466, rtol=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_to_x0_eps_matches_diffusers_ddim(prediction_type):
    cfg = {**SDXL, "prediction_type": prediction_type}
    ref = DDIMScheduler(**cfg, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    ref.set_timesteps(10)
    timesteps = [int(t) for t in ref.timesteps[:-1]]  # the last one steps to final_alpha_cumprod
    x = _rand((len(timesteps), 4, 6, 6), 1)  # NCHW for torch
    out = _rand(x.shape, 2)
    ours = NoiseSchedule.from_config(cfg)
    # One batched call with per-sample t, NHWC.
    x0, eps = ours.to_x0_eps(jnp.asarray(out.transpose(0, 2, 3, 1)), jnp.asarray(x.transpose(0, 2, 3, 1)),
                             jnp.asarray(timesteps))
    for i, t in enumerate(timesteps):
        ref._step_index = None
        step = ref.step(torch.from_numpy(out[i:i + 1]), t, torch.from_numpy(x[i:i + 1]), eta=0.0)
        ref_x0 = step.pred_original_sample.numpy()[0]
        ac_prev = float(ref.alphas_cumprod[t - 100])
        ref_eps = (step.prev_sample.numpy()[0] - ac_prev**0.5 * ref_x0) / (1 - ac_prev) ** 0.5
        np.testing.assert_allclose(np.asarray(x0[i]).transpose(2, 0, 1), ref_x0, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(np.asarray(eps[i]).transpose(2, 0, 1), ref_eps, rtol=1e-4, atol=2e-4)


def test_add_noise_matches_diffusers():
    x0, noise = _rand((3, 5, 5, 4), 3), _rand((3, 5, 5, 4), 4)
    t = np.array([0, 500, 999])
    ref = DDPMScheduler(**SDXL).add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    # The schedule is a pytree: it can be a jit argument as well as a closed-over constant.
    ours = jax.jit(lambda s, *a: s.add_noise(*a))(NoiseSchedule.from_config(SDXL), x0, noise, t)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_clean_timestep_convention():
    sched = NoiseSchedule.from_config(SDXL)
    assert float(sched.alpha(CLEAN)) == 1.0 and float(sched.sigma(CLEAN)) == 0.0
    assert float(sched.lam(CLEAN)) == np.inf
    x0, eps = jnp.asarray(_rand((2, 3, 3, 4), 5)), jnp.asarray(_rand((2, 3, 3, 4), 6))
    np.testing.assert_array_equal(np.asarray(ddim_step(sched, x0, eps, jnp.array([CLEAN, CLEAN]))), np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(sched.add_noise(x0, eps, CLEAN)), np.asarray(x0))


def test_lambda_is_half_log_snr():
    sched = NoiseSchedule.from_config(SDXL)
    t = jnp.array([0, 250, 999])
    ac = np.asarray(sched.alphas_cumprod)[[0, 250, 999]].astype(np.float64)
    np.testing.assert_allclose(np.asarray(sched.lam(t)), 0.5 * np.log(ac / (1 - ac)), rtol=1e-5)


def test_from_pretrained_and_config_errors(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SDXL, "_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"}))
    sched = NoiseSchedule.from_pretrained(tmp_path)
    assert sched.prediction_type == "v_prediction"
    direct = NoiseSchedule.from_config(SDXL)
    np.testing.assert_array_equal(np.asarray(sched.alphas_cumprod), np.asarray(direct.alphas_cumprod))
    with pytest.raises(FileNotFoundError, match="nowhere/scheduler/scheduler_config.json"):
        NoiseSchedule.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="beta_schedule='sigmoid'"):
        NoiseSchedule.from_config({**SDXL, "beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        NoiseSchedule.from_config({**SDXL, "prediction_type": "flow"})


def test_solver_grids():
    grid = solver_timesteps(250, 1000)
    assert len(grid) == 250 and grid[0] == 3 and grid[-1] == 999 and np.all(np.diff(grid) == 4)
    prev = solver_prev_timesteps(250, 1000)
    np.testing.assert_array_equal(prev, np.maximum(grid - 4, 0))
    np.testing.assert_array_equal(solver_timesteps(50, 1000)[:3], [19, 39, 59])
    np.testing.assert_array_equal(equidistant_timesteps(4), [999, 751, 499, 251])
    np.testing.assert_array_equal(equidistant_timesteps(5), [999, 799, 599, 399, 199])
    with pytest.raises(ValueError, match="num_solver_steps=2000"):
        solver_timesteps(2000, 1000)


def test_guide_per_sample_weight():
    cond, uncond = jnp.asarray(_rand((3, 2, 2, 4), 7)), jnp.asarray(_rand((3, 2, 2, 4), 8))
    w = jnp.array([0.0, 1.0, 3.5])
    out = np.asarray(guide(cond, uncond, w))
    np.testing.assert_array_equal(out[0], np.asarray(cond[0]))  # w = 0: no CFG for that sample
    np.testing.assert_allclose(out[2], np.asarray(cond[2] + 3.5 * (cond[2] - uncond[2])), rtol=1e-6)
    weights = np.asarray(sample_guidance_weight(jax.random.key(0), 1000, 3.0, 15.0))
    assert weights.shape == (1000,) and weights.min() >= 3.0 and weights.max() <= 15.0
    with pytest.raises(ValueError, match="w_min"):
        sample_guidance_weight(jax.random.key(0), 4, 5.0, 1.0)


def test_consistency_fn_is_ddim_map_and_identity_at_tau_equal_t():
    sched = NoiseSchedule.from_config(SDXL)
    x, out = jnp.asarray(_rand((2, 4, 4, 4), 9)), jnp.asarray(_rand((2, 4, 4, 4), 10))
    t, tau = jnp.array([999, 499]), jnp.array([499, CLEAN])
    x0, eps = sched.to_x0_eps(out, x, t)
    np.testing.assert_allclose(np.asarray(consistency_fn(sched, out, x, t, tau)),
                               np.asarray(ddim_step(sched, x0, eps, tau)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(consistency_fn(sched, out, x, t, t)), np.asarray(x), atol=2e-5)
    np.testing.assert_allclose(np.asarray(consistency_fn(sched, out, x, t, tau)[1]), np.asarray(x0[1]), rtol=1e-6)


def test_lcm_boundary_fn():
    sched = NoiseSchedule.from_config(SDXL)
    c_skip, c_out = lcm_boundary_scalings(jnp.array([0, 1, 999]))
    np.testing.assert_allclose(np.asarray(c_skip), [1.0, 0.25 / (100 + 0.25), 0.25 / (9990.0**2 + 0.25)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c_out), [0.0, 10 / np.sqrt(100.25), 9990 / np.sqrt(9990.0**2 + 0.25)],
                               rtol=1e-6)
    x, out = jnp.asarray(_rand((2, 4, 4, 4), 11)), jnp.asarray(_rand((2, 4, 4, 4), 12))
    t = jnp.array([0, 999])
    f = np.asarray(lcm_boundary_fn(sched, out, x, t))
    np.testing.assert_array_equal(f[0], np.asarray(x[0]))  # boundary condition f(x, 0) = x
    x0, _ = sched.to_x0_eps(out, x, t)
    np.testing.assert_allclose(f[1], float(c_skip[2]) * np.asarray(x[1]) + float(c_out[2]) * np.asarray(x0[1]),
                               rtol=1e-5)
