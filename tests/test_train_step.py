"""The compiled TDD step on a tiny random SDXL pipeline (CPU, fp32).

Checks: LoRA-free student = teacher's conditional branch at initialisation; the loss goes down; every target
rule and both guidance modes run through the one step, from pixels or from cached latents; 8-device FSDP
sharding with gradient accumulation reproduces the plain one-device step, and replicating the LoRA state
(``mesh.lora_sharding='replicated'``) instead leaves it unchanged. The multi-device part runs in a subprocess
(tests/_multidevice.py), started first so that it compiles while the other tests run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _step_setup import cached_batch, pixel_batch, save_step_pipeline, setup, step_config

from tdd_jax.diffusion.targets import pcm_edges
from tdd_jax.training import sharding
from tdd_jax.conditioning import Cond, unet_output
from tdd_jax.training.step import build_train_step, compile_train_step, teacher_outputs

MULTIDEVICE_SCRIPT = Path(__file__).with_name("_multidevice.py")
LR = 3e-2  # far above the official 1e-6, so that a few steps visibly move a rank-4 LoRA


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_step_pipeline(tmp_path_factory.mktemp("step_pipeline"))


@pytest.fixture(scope="module", autouse=True)
def multidevice_run(pipeline_dir):
    """The 8-device subprocess, started before the first test of this module and read by the last."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(MULTIDEVICE_SCRIPT), str(pipeline_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(1, 1, jax.devices()[:1])


@pytest.fixture(scope="module")
def tdd(pipeline_dir, mesh):
    """The default (tdd, decoupled) step from cached latents, compiled ahead of time."""
    cfg = step_config(**{"optim.lr": LR})
    frozen, step = setup(cfg, pipeline_dir, mesh, encoders=False)
    batch = sharding.shard_batch(mesh, cached_batch())
    return frozen, step, batch, compile_train_step(step, batch)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def test_student_equals_teacher_conditional_at_init(tdd):
    frozen, step, batch, _ = tdd
    state = step.init_state(jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), batch["latents"].shape)
    t = jnp.array([999, 751, 251, 3], jnp.int32)
    cond = Cond(batch["prompt_embeds"], batch["pooled_prompt_embeds"], batch["time_ids"])

    @jax.jit
    def student_and_teacher(params, lora):
        return unet_output(frozen.unet(params, lora), x, t, cond), teacher_outputs(frozen, params, x, t, cond)

    out, (cond_out, uncond_out) = student_and_teacher(frozen.params, state.lora)
    scale = float(jnp.abs(cond_out).max())
    np.testing.assert_allclose(out, cond_out, atol=1e-6 * scale, rtol=0)
    assert float(jnp.abs(cond_out - uncond_out).max()) > 1e-3 * scale  # the branches really differ

    # The equality comes from lora_B = 0, not from LoRA being ignored: a non-zero adapter changes the student
    # and leaves the teacher exactly as it was.
    out, (cond_out_2, _) = student_and_teacher(frozen.params, jax.tree.map(lambda v: v + 0.1, state.lora))
    assert float(jnp.abs(out - cond_out).max()) > 1e-3 * scale
    np.testing.assert_array_equal(cond_out_2, cond_out)


def _leaves(tree) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(tree)]


def _probe_loss(compiled, state, params, batch) -> float:
    """The step's loss at fixed randomness (the step's own draws with three fixed keys), state untouched."""
    losses = []
    for seed in (11, 12, 13):
        probe = _copy(state).replace(rng=jnp.copy(jax.random.PRNGKey(seed)))
        losses.append(float(compiled.fn(probe, params, batch)[1]["loss"]))
    return float(np.mean(losses))


def test_a_few_steps_decrease_the_loss(tdd):
    frozen, step, batch, compiled = tdd
    state = step.init_state(jax.random.PRNGKey(0))
    before = _probe_loss(compiled, state, frozen.params, batch)
    history = []
    for _ in range(8):
        previous = _leaves(state.lora)
        state, metrics = compiled.fn(state, frozen.params, batch)
        history.append({k: np.asarray(v) for k, v in metrics.items()})
    # Beside the gradient norm: the norm of the update just applied and of the LoRA after it.
    current = _leaves(state.lora)
    norm = lambda leaves: np.sqrt(sum(float(np.sum(np.square(x, dtype=np.float64))) for x in leaves))  # noqa: E731
    assert float(history[-1]["update_norm"]) == pytest.approx(norm([a - b for a, b in zip(current, previous)]),
                                                              rel=1e-4)
    assert float(history[-1]["param_norm"]) == pytest.approx(norm(current), rel=1e-5)
    assert all(int(h["nonfinite"]) == 0 for h in history)
    after = _probe_loss(compiled, state, frozen.params, batch)
    assert after < 0.8 * before, (before, after, [float(h["loss"]) for h in history])
    assert int(state.step) == 8
    last = history[-1]
    assert np.isfinite(last["grad_norm"]) and last["grad_norm"] > 0
    assert float(last["lr"]) == pytest.approx(LR)
    assert last["tau"].shape == last["t_n"].shape == (4,)
    assert np.all(last["tau"] <= last["t_n"])
    assert compiled.memory["total"] > 0 and compiled.flops and compiled.flops > 0


def test_profile_puts_every_unet_call_in_its_part(tdd):
    """The named scopes of the step reach the compiled program: under the profiler, each of the four UNet
    passes (student forward and backward, teacher, target) runs convolutions and matmuls, and none runs
    outside them (the benchmark's step_profile reads its table from these)."""
    from launch import step_profile

    frozen, step, batch, compiled = tdd
    box = {"state": step.init_state(jax.random.PRNGKey(0))}

    def run():
        box["state"], metrics = compiled.fn(box["state"], frozen.params, batch)
        jax.block_until_ready(metrics["loss"])

    run()
    grid = step_profile.xla_step_profile(run, compiled.fn, repeats=1)["grid"]
    for part in ("student forward", "student backward", "teacher", "target"):
        assert grid[part]["conv"] > 0 and grid[part]["matmul"] > 0, (part, grid[part])
    assert grid["rest"]["conv"] == grid["rest"]["matmul"] == 0, grid["rest"]


@pytest.mark.parametrize("kind,mode,source,extra", [
    # encoders inside the step; dropped captions get the encoded "" caption and are still guided
    ("pcm", "official", "pixels", {}),
    # a real EMA target network (the other cases use the online LoRA under stop-gradient, ema_decay = 0)
    ("lcm", "decoupled", "cached", {"ema_decay": 0.5}),
    # "" encoded once at load time, text encoders then dropped; linear warm-up of the learning rate
    ("tcd", "official", "cached", {"optim.schedule": "warmup", "optim.warmup_steps": 4}),
])
def test_target_rules_and_guidance_modes(pipeline_dir, mesh, kind, mode, source, extra):
    cfg = step_config(**{"target.kind": kind, "guidance.mode": mode, "guidance.rho": 0.5, "optim.lr": LR, **extra})
    frozen, step = setup(cfg, pipeline_dir, mesh, encoders=source == "pixels")
    assert ("empty_prompt" in frozen.params) == (mode == "official")
    assert frozen.has_encoders == (source == "pixels")
    batch = sharding.shard_batch(mesh, pixel_batch(pipeline_dir) if source == "pixels" else cached_batch())
    state = step.init_state(jax.random.PRNGKey(0))
    loras, emas = [_leaves(state.lora)], [_leaves(state.target_lora)]
    for _ in range(2):
        state, metrics = step.train_step(state, frozen.params, batch)
        loras.append(_leaves(state.lora))
        emas.append(_leaves(state.target_lora))

    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    tau, t_n, w = (np.asarray(metrics[k]) for k in ("tau", "t_n", "w"))
    assert np.all((0 <= tau) & (tau <= t_n))
    if kind == "lcm":
        assert np.all(tau == 0)
    if kind == "pcm":
        assert set(tau.tolist()) <= set(pcm_edges(step.rule).tolist())
    if mode == "official":  # CFG for every example, dropped captions included
        assert np.all(w == cfg.guidance.w_min)
    else:
        assert set(w.tolist()) <= {0.0, cfg.guidance.w_min}
    assert max(np.abs(a - b).max() for a, b in zip(loras[-1], loras[0])) > 0
    if cfg.ema_decay:  # θ⁻ ← μ·θ⁻ + (1 − μ)·θ after every update
        mu = cfg.ema_decay
        for i in (1, 2):
            for e, e_prev, p in zip(emas[i], emas[i - 1], loras[i]):
                np.testing.assert_allclose(e, mu * e_prev + (1 - mu) * p, rtol=1e-6, atol=1e-7)
    else:
        assert state.ema_lora is None and state.target_lora is state.lora
    if cfg.optim.schedule == "warmup":
        assert float(metrics["lr"]) == pytest.approx(LR / 4)  # the second update of a 4-step warm-up

    # A NaN in the batch makes the loss and gradients NaN: the update is not applied (LoRA, EMA, optimizer
    # moments and counts bit-identical), the step says so, and the next finite step trains on.
    nan_times = np.full(batch["time_ids"].shape, np.nan, np.float32)
    bad = dict(batch, time_ids=sharding.shard_batch(mesh, {"time_ids": nan_times})["time_ids"])
    kept = _leaves((state.lora, state.ema_lora, state.opt_state))
    state, metrics = step.train_step(state, frozen.params, bad)
    assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert float(metrics["update_norm"]) == 0.0 and int(state.step) == 3
    for a, b in zip(kept, _leaves((state.lora, state.ema_lora, state.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)
    state, metrics = step.train_step(state, frozen.params, batch)
    assert int(metrics["nonfinite"]) == 0 and float(metrics["update_norm"]) > 0


def test_bf16_frozen_base_is_the_default_step_on_rounded_weights(tdd, pipeline_dir, mesh):
    """``model.param_dtype='bfloat16'`` (the compile check's setting that halves the frozen base's HBM) changes
    nothing but the stored weights: its step equals the default fp32 step run on the same weights rounded to
    bf16, while the LoRA and its optimizer stay fp32."""
    frozen32, step32, batch, compiled32 = tdd
    frozen16, step16 = setup(step_config(**{"optim.lr": LR, "model.param_dtype": "bfloat16"}), pipeline_dir, mesh,
                             encoders=False)
    floats = lambda tree: [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]  # noqa: E731
    base16, base32 = floats(frozen16.params["unet"]), floats(frozen32.params["unet"])
    assert {x.dtype for x in base16} == {jnp.dtype(jnp.bfloat16)} and len(base16) == len(base32)
    for a, b in zip(base16, base32, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b.astype(jnp.bfloat16), np.float32))
    assert sum(x.nbytes for x in base16) * 2 == sum(x.nbytes for x in base32)

    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype)
                           if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen32.params)
    state16, state32 = step16.init_state(jax.random.PRNGKey(5)), step32.init_state(jax.random.PRNGKey(5))
    assert {x.dtype for x in jax.tree.leaves((state16.lora, state16.opt_state)) if x.ndim} == {jnp.dtype(jnp.float32)}
    new16, m16 = step16.train_step(state16, frozen16.params, batch)
    new32, m32 = compiled32.fn(state32, rounded, batch)
    for key in ("loss", "grad_norm", "update_norm"):
        assert float(m16[key]) == pytest.approx(float(m32[key]), rel=1e-5), key
    for a, b in zip(_leaves(new16.lora), _leaves(new32.lora), strict=True):  # Adam's first step ≈ lr·sign(g):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)  # tiny gradients see fp32 fusion rounding
    # ... and the rounding itself moves the step, a little (a measurable difference, not an identical program).
    _, m_full = compiled32.fn(step32.init_state(jax.random.PRNGKey(5)), frozen32.params, batch)
    assert 0 < abs(float(m_full["loss"]) - float(m32["loss"])) < 0.05 * float(m32["loss"])


def test_encode_batch_gives_the_cached_fields(pipeline_dir, mesh):
    cfg = step_config()
    frozen, _ = setup(cfg, pipeline_dir, mesh)
    shapes = jax.eval_shape(frozen.encode_batch, frozen.params, pixel_batch(pipeline_dir), jax.random.PRNGKey(0))
    cached = cached_batch()
    assert {k: v.shape for k, v in shapes.items()} == {k: cached[k].shape for k in shapes}


def test_config_errors_name_the_field(tdd):
    frozen, step, _, _ = tdd
    for overrides, field in [({"batch.grad_accum": 3}, "batch.grad_accum"),
                             ({"loss.kind": "l1"}, "loss.kind"),
                             ({"guidance.w_min": 5.0}, "guidance.w_min"),
                             ({"optim.schedule": "exponential"}, "optim.schedule"),
                             ({"target.k_min": 9}, "k_min")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            build_train_step(step_config(**overrides), frozen, step.schedule, step.mesh)
    with pytest.raises(ValueError, match=r"mesh\.data"):
        sharding.mesh_shape(3, -1, 8)


def _delta(run) -> np.ndarray:
    return np.concatenate([np.ravel(d) for d in run["delta"]])


def test_accumulation_and_eight_devices_match_one_device(multidevice_run):
    """Slowest part last: the subprocess has been compiling since the module started."""
    out, err = multidevice_run.communicate(timeout=900)
    assert multidevice_run.returncode == 0, err[-4000:]
    report = json.loads(next(line for line in out.splitlines() if line.startswith("REPORT "))[len("REPORT "):])
    full, eight = report["full_1dev"], report["accum_8dev"]

    # 8 FSDP devices x 2 accumulated microbatches = 1 device, whole batch (same per-example randomness), in
    # float64 (see _multidevice.py): loss, gradient norm and LoRA update (≈ lr·gradient) to 1e-5 relative.
    assert eight["tau"] == full["tau"]
    assert eight["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert eight["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-5)
    d_eight, d_full = _delta(eight), _delta(full)
    update_error = np.linalg.norm(d_eight - d_full) / np.linalg.norm(d_full)
    print(f"8 devices vs 1: loss {abs(eight['loss'] / full['loss'] - 1):.2e}, grad norm "
          f"{abs(eight['grad_norm'] / full['grad_norm'] - 1):.2e}, LoRA update {update_error:.2e} (relative)")
    assert update_error <= 1e-5

    # On 8 devices every base weight, and the LoRA and its Adam moments, are really split.
    assert eight["base_split"] == eight["base_leaves"] and full["base_split"] == 0
    assert eight["lora_split"] > 0 and eight["moments_split"] > 0
    assert eight["memory"]["argument"] < full["memory"]["argument"]

    # mesh.lora_sharding='replicated': the LoRA and its moments whole on every device, the base still split;
    # the same step to float64 rounding (only the order of the gradient reductions differs).
    rep = report["replicated_8dev"]
    assert rep["lora_specs"] == rep["moment_specs"] == ["()"]  # PartitionSpec(): replicated
    assert rep["lora_split"] == rep["moments_split"] == 0 and rep["base_split"] == rep["base_leaves"]
    assert rep["tau"] == eight["tau"]
    assert rep["loss"] == pytest.approx(eight["loss"], rel=1e-12)
    assert rep["grad_norm"] == pytest.approx(eight["grad_norm"], rel=1e-10)
    d_rep = _delta(rep)
    rep_error = np.linalg.norm(d_rep - d_eight) / np.linalg.norm(d_eight)
    print(f"replicated vs FSDP LoRA state: loss {abs(rep['loss'] / eight['loss'] - 1):.2e}, LoRA update "
          f"{rep_error:.2e} (relative)")
    assert rep_error <= 1e-10
    assert rep["memory"]["argument"] > eight["memory"]["argument"]  # every device holds the whole LoRA state

    # The rule covers all the trained state of a TDD-adv step with an EMA: LoRA, EMA, heads and both optimizers.
    specs = report["adv_specs"]
    assert all(v == ["()"] for v in specs["replicated"].values()), specs["replicated"]
    for name in ("lora", "ema_lora", "opt_state", "heads", "heads_opt_state"):
        assert any(s != "()" for s in specs["fsdp"][name]), (name, specs["fsdp"][name])
    assert specs["fsdp"]["step"] == specs["fsdp"]["rng"] == ["()"]
