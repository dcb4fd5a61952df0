"""TDD-adv: the UNet-encoder discriminator and its D/G alternation in the compiled step (CPU, fp32).

Checks: the encoder features equal diffusers' down/mid block outputs and a head equals PCM's head built in
PyTorch; the discriminator reads the base weights the step is given (no copy in the state); even steps train
only the heads, odd steps only the LoRA; at λ = 0 the LoRA update is the plain step's; a checkpoint resume is
bit-exact with the heads; ``configs/tdd_tiny.py:tdd_adv`` trains through ``python -m tdd_jax.train``.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _step_setup import cached_batch, save_step_pipeline, setup, step_config
from _trainer_runs import red_cat_folder
from flax import nnx

from tdd_jax.conditioning import Cond
from tdd_jax.models.unet import UNet2DConditionModel
from tdd_jax.training import sharding
from tdd_jax.training.adversarial import DiscriminatorHead
from tdd_jax.training.checkpointing import Checkpointer
from tdd_jax.training.config import ConfigError
from tdd_jax.training.report import read_scalars
from tdd_jax.training.state import TrainState
from tdd_jax.training.step import compile_train_step

REPO = Path(__file__).resolve().parents[1]
# AdamW with eps = 1: the first update is ≈ −lr·g/(1 + |g|), smooth in the gradient (see the λ = 0 test).
SMOOTH = {"optim.eps": 1.0, "optim.lr": 1.0}
# 4 groups: 8 channels a group on this 32-channel UNet (see the probe test for what 32 groups do here).
ADV = {"adv.enabled": True, "adv.lr": 1e-2, "adv.head_groups": 4, **SMOOTH}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_step_pipeline(tmp_path_factory.mktemp("adv_pipeline"))


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(1, 1, jax.devices()[:1])


@pytest.fixture(scope="module")
def batch(mesh):
    return sharding.shard_batch(mesh, cached_batch())


def _compiled(pipeline_dir, mesh, batch, **overrides):
    frozen, step = setup(step_config(**overrides), pipeline_dir, mesh, encoders=False)
    return frozen, step, compile_train_step(step, batch).fn


@pytest.fixture(scope="module")
def adv(pipeline_dir, mesh, batch):
    return _compiled(pipeline_dir, mesh, batch, **ADV)


def _leaves(tree) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(tree)]


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _max_change(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def test_encoder_features_match_diffusers_down_and_mid_blocks(tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel as TorchUNet

    torch_unet = TorchUNet.from_pretrained(tiny_pipeline_dir / "unet").eval()
    cfg = dict(torch_unet.config)
    rng = np.random.default_rng(0)
    text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    sample = rng.standard_normal((2, cfg["in_channels"], 16, 16)).astype(np.float32)
    t = np.array([999, 17], np.int64)
    context = rng.standard_normal((2, 7, cfg["cross_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((2, text_dim)).astype(np.float32)
    time_ids = np.array([[64, 64, 0, 0, 64, 64], [48, 32, 4, 8, 64, 64]], np.float32)

    captured = []
    hooks = [b.register_forward_hook(lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o).numpy()))
             for b in [*torch_unet.down_blocks, torch_unet.mid_block]]
    with torch.no_grad():
        torch_unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context),
                   added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)})
    for h in hooks:
        h.remove()

    model = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    features = nnx.jit(lambda m, *a: m.encoder_features(*a))(
        model, jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context),
        {"text_embeds": jnp.asarray(pooled), "time_ids": jnp.asarray(time_ids)})
    assert [f.shape[-1] for f in features] == list(model.feature_channels)
    assert len(features) == len(captured) == len(cfg["block_out_channels"]) + 1
    for i, (ours, theirs) in enumerate(zip(features, captured)):
        theirs = theirs.transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5 * np.abs(theirs).max(), rtol=0,
                                   err_msg=f"feature level {i}")


def test_head_matches_pcm_head_in_pytorch():
    channels = 64
    head = DiscriminatorHead(channels, 32, rngs=nnx.Rngs(0))
    # Non-trivial norm affine parameters, so that a swapped or missing one shows.
    rng = np.random.default_rng(1)
    for norm in (head.norm1, head.norm2):
        norm.weight[...] = jnp.asarray(rng.normal(1.0, 0.3, channels), jnp.float32)
        norm.bias[...] = jnp.asarray(rng.normal(0.0, 0.3, channels), jnp.float32)

    conv = lambda c_out: torch.nn.Conv2d(channels, c_out, 1, 1, 0)  # noqa: E731
    def block():
        return torch.nn.Sequential(conv(channels), torch.nn.GroupNorm(32, channels), torch.nn.LeakyReLU())

    ref = torch.nn.ModuleDict({"conv1": block(), "conv2": block(), "conv_out": conv(1)})
    with torch.no_grad():
        for name, (c, n) in {"conv1": (head.conv1, head.norm1), "conv2": (head.conv2, head.norm2)}.items():
            ref[name][0].weight.copy_(torch.from_numpy(np.asarray(c.weight[...])))
            ref[name][0].bias.copy_(torch.from_numpy(np.asarray(c.bias[...])))
            ref[name][1].weight.copy_(torch.from_numpy(np.asarray(n.weight[...])))
            ref[name][1].bias.copy_(torch.from_numpy(np.asarray(n.bias[...])))
        ref["conv_out"].weight.copy_(torch.from_numpy(np.asarray(head.conv_out.weight[...])))
        ref["conv_out"].bias.copy_(torch.from_numpy(np.asarray(head.conv_out.bias[...])))
        x = torch.from_numpy(rng.standard_normal((2, channels, 5, 5)).astype(np.float32))
        h = ref["conv1"](x)
        expected = ref["conv_out"](ref["conv2"](h) + h).numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(head(jnp.asarray(x.numpy().transpose(0, 2, 3, 1))))
    assert ours.shape == (2, 5, 5, 1)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)


def test_discriminator_shares_the_base_weights(adv, pipeline_dir, mesh, batch):
    frozen, step, _ = adv
    state = step.init_state(jax.random.PRNGKey(0))
    _, plain = setup(step_config(**SMOOTH), pipeline_dir, mesh, encoders=False)
    plain_state = plain.init_state(jax.random.PRNGKey(0))

    # The state is the plain one plus the heads and their optimizer, nothing else; the heads hold exactly
    # PCM's head per feature level (two C×C 1×1 convs, two GroupNorms, a C→1 conv), far less than a UNet.
    def count(tree):
        return sum(int(np.size(x)) for x in jax.tree.leaves(tree))

    channels = frozen.teacher(frozen.params).feature_channels
    assert count(state.heads) == sum(2 * (c * c + c) + 4 * c + c + 1 for c in channels)
    assert count(state) == count(plain_state) + count(state.heads) + count(state.heads_opt_state)
    assert count(state.heads) < count(frozen.params["unet"]) / 4
    for a, b in zip(_leaves(state.lora), _leaves(plain_state.lora), strict=True):  # same LoRA init
        np.testing.assert_array_equal(a, b)
    # No array of the state is a copy of a base UNet weight.
    base = [np.asarray(x) for x in jax.tree.leaves(frozen.params["unet"]) if np.size(x) > 1]
    for leaf in _leaves(state):
        assert not any(leaf.shape == w.shape and np.array_equal(leaf, w) for w in base)

    # The discriminator reads the base weights it is handed: scaling them changes its logits.
    cond = Cond(batch["prompt_embeds"], batch["pooled_prompt_embeds"], batch["time_ids"])
    x = jax.random.normal(jax.random.PRNGKey(3), batch["latents"].shape)
    t = jnp.array([999, 600, 250, 10], jnp.int32)
    logits = jax.jit(lambda p: step.adversary.logits(state.heads, p, x, t, cond))
    scaled = dict(frozen.params, unet=jax.tree.map(lambda w: 1.1 * w, frozen.params["unet"]))
    before, after = logits(frozen.params), logits(scaled)
    assert len(before) == len(channels)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(before, after)) > 1e-3


def test_steps_alternate_discriminator_then_generator(adv, batch):
    frozen, step, fn = adv
    state = step.init_state(jax.random.PRNGKey(0))
    prev = _copy(state)
    history = []
    for i in range(4):
        state, m = fn(state, frozen.params, batch)
        m = {k: np.asarray(v) for k, v in m.items()}
        history.append(m)
        assert int(m["nonfinite"]) == 0 and all(np.isfinite(m[k]) for k in ("loss", "g_adv", "d_loss"))
        if i % 2 == 0:  # D step: only the heads and their optimizer move
            assert int(m["d_step"]) == 1 and float(m["d_grad_norm"]) > 0 and float(m["grad_norm"]) == 0
            assert _max_change(state.heads, prev.heads) > 0
            assert _max_change(state.heads_opt_state, prev.heads_opt_state) > 0
            assert _max_change((state.lora, state.opt_state), (prev.lora, prev.opt_state)) == 0
        else:  # G step: only the LoRA and its optimizer move
            assert int(m["d_step"]) == 0 and float(m["grad_norm"]) > 0 and float(m["d_grad_norm"]) == 0
            assert _max_change(state.lora, prev.lora) > 0
            assert _max_change((state.heads, state.heads_opt_state), (prev.heads, prev.heads_opt_state)) == 0
        # Discriminator timesteps within [τ, min(τ + 250, T)).
        assert np.all((m["tau"] <= m["gan_t"]) & (m["gan_t"] < np.minimum(m["tau"] + 250, 1000)))
        prev = _copy(state)
    assert int(state.step) == 4
    # The D loss is hinge-shaped: 2 at chance (logits near 0), and the heads' updates lower it on its own batch.
    assert 0 < history[0]["d_loss"] < 4


def test_zero_lambda_gives_the_plain_lora_update(adv, pipeline_dir, mesh, batch):
    """At λ = 0 the G step's LoRA update is the plain step's; at λ = 0.1 it is not.

    The fixtures' AdamW eps = 1 matters here: with the default eps, gradient entries near 1e-8 (lora_A's, while
    lora_B is still 0) turn float rounding differences between two compiled programs into ±lr update
    differences, which say nothing about the adversarial term.
    """
    frozen, zero_step, zero_fn = _compiled(pipeline_dir, mesh, batch, **ADV, **{"adv.g_weight": 0.0})
    _, _, plain_fn = _compiled(pipeline_dir, mesh, batch, **SMOOTH)
    _, _, adv_fn = adv

    state = zero_step.init_state(jax.random.PRNGKey(0))
    state, _ = zero_fn(state, frozen.params, batch)  # D step: heads move, the LoRA does not
    after_d = _copy(state)
    zero, _ = zero_fn(_copy(after_d), frozen.params, batch)  # G step at λ = 0
    plain_in = TrainState(step=after_d.step, lora=after_d.lora, ema_lora=None, opt_state=after_d.opt_state,
                          rng=after_d.rng)
    plain, plain_metrics = plain_fn(_copy(plain_in), frozen.params, batch)
    weighted, _ = adv_fn(_copy(after_d), frozen.params, batch)  # the same G step at λ = 0.1

    update = lambda s: [a - b for a, b in zip(_leaves(s.lora), _leaves(after_d.lora), strict=True)]  # noqa: E731
    d_zero, d_plain, d_weighted = update(zero), update(plain), update(weighted)
    size = max(float(np.abs(d).max()) for d in d_plain)
    assert size > 0
    zero_gap = max(float(np.abs(a - b).max()) for a, b in zip(d_zero, d_plain))
    weighted_gap = max(float(np.abs(a - b).max()) for a, b in zip(d_weighted, d_plain))
    # Float rounding of two differently fused programs (measured: 1e-4 of the update) against the adversarial
    # term's real effect at λ = 0.1, which must be far larger.
    assert zero_gap <= 1e-3 * size and weighted_gap > 30 * zero_gap, (zero_gap, weighted_gap, size)
    assert float(plain_metrics["nonfinite"]) == 0


def test_resume_is_bit_exact_with_the_heads(adv, batch, tmp_path):
    frozen, step, fn = adv
    state = step.init_state(jax.random.PRNGKey(5))
    for _ in range(3):  # ends after a G step, so the next is a D step and then a G step
        state, _ = fn(state, frozen.params, batch)
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=1)
    assert ckpt.save(3, state, {"consumed": 3}, {"method": "tdd", "step": 3})
    ckpt.close()

    uninterrupted, losses = _copy(state), []
    for _ in range(2):
        uninterrupted, m = fn(uninterrupted, frozen.params, batch)
        losses.append((float(m["loss"]), float(m["d_loss"]), float(m["g_adv"])))

    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=1)
    restored, data_state, _ = ckpt.restore(step.abstract_state())
    ckpt.close()
    assert data_state == {"consumed": 3}
    assert restored.heads is not None and restored.heads_opt_state is not None
    for a, b in zip(_leaves(restored), _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    resumed_losses = []
    for _ in range(2):
        restored, m = fn(restored, frozen.params, batch)
        resumed_losses.append((float(m["loss"]), float(m["d_loss"]), float(m["g_adv"])))
    assert resumed_losses == losses
    leaves_a, tree_a = jax.tree.flatten(restored)
    leaves_b, tree_b = jax.tree.flatten(uninterrupted)
    assert tree_a == tree_b
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # a trainer start-up and compile in a subprocess: 465 s on the loaded 2-core machine
def test_tdd_tiny_adv_config_trains(tiny_pipeline_dir, tmp_path):
    """``configs/tdd_tiny.py:tdd_adv`` through the trainer's command line, on the random tiny pipeline."""
    data = red_cat_folder(tmp_path / "data", 4)
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "tdd_jax.train", "--config=configs/tdd_tiny.py:tdd_adv", f"--workdir={workdir}",
           f"--config.pipeline_dir={tiny_pipeline_dir}", "--config.resolution=16", "--config.data.source=folder",
           f"--config.data.path={data}", "--config.data.num_threads=1", "--config.batch.global_batch=4",
           "--config.lora.rank=4", "--config.log_every=1", "--config.num_train_steps=4",
           "--config.checkpoint.every=4", "--config.validation.every=1000"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    logged = read_scalars(workdir)
    for tag in ("loss", "g_adv", "d_loss", "d_step"):
        assert sorted(logged[tag]) == [1, 2, 3, 4], (tag, logged.get(tag))
        assert np.all(np.isfinite(list(logged[tag].values()))), (tag, logged[tag])
    assert [logged["d_step"][s] for s in (1, 2, 3, 4)] == [1, 0, 1, 0]  # D first, as the official code
    assert (workdir / "checkpoints" / "4").is_dir()
    # launch/adv_probe.py --runs: the D loss over all 4 steps, and over the last 40 % (steps 3 and 4)
    from launch.adv_probe import run_lines
    row = run_lines([str(workdir)])[2].split(" | ")
    d = logged["d_loss"]
    assert row[1:4] == ["4", f"{np.mean(list(d.values())):.3f}", f"{(d[3] + d[4]) / 2:.3f}"], row



def test_checkpoint_from_before_the_heads_restores(tmp_path):
    """A TrainState checkpoint written before the heads fields existed restores with them None (runs started
    on an earlier version resume); one that lacks heads the target needs is refused."""
    from typing import Any

    from flax import struct
    from test_checkpointing import make_state

    from tdd_jax.training.checkpointing import CheckpointError

    @struct.dataclass
    class EarlierState:
        step: jax.Array
        lora: Any
        ema_lora: Any
        opt_state: Any
        rng: jax.Array

    state = make_state(3, ema=True)
    earlier = EarlierState(step=state.step, lora=state.lora, ema_lora=state.ema_lora, opt_state=state.opt_state,
                           rng=state.rng)
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=1)
    ckpt.save(3, earlier, {"consumed": 3}, {"step": 3})
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=1)
    restored, _, _ = ckpt.restore(make_state(0, ema=True))
    assert isinstance(restored, TrainState) and restored.heads is None and restored.heads_opt_state is None
    for a, b in zip(_leaves(restored), _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match="heads"):  # an adversarial run cannot resume it as its own
        ckpt.restore(make_state(0, ema=True).replace(heads={"w": jnp.zeros(3)}, heads_opt_state={"m": jnp.zeros(3)}))
    ckpt.close()


def test_probe_heads_see_a_magnified_gap_and_not_an_absent_one(adv, pipeline_dir, mesh, batch):
    """launch/adv_probe.py: with fake = target (gap 0) both sides are one distribution and fresh heads stay at
    chance; with the untrained LoRA's gap to its target (the unguided teacher's jump against the guided step's
    target) made 300× larger (SNR ~4), heads of 8 channels a group learn it within 40 updates, and heads of one
    channel a group (PCM's 32 groups on this 32-channel UNet) do not: they cannot see it."""
    from launch.adv_probe import heads_optimizer, make_update, probe
    batches = [(batch, jax.random.split(jax.random.PRNGKey(i), 4)) for i in range(40)]

    def run(step, params, gaps):
        lora = step.init_state(jax.random.PRNGKey(0)).lora
        tx = heads_optimizer(step.cfg, 1e-2)
        update = make_update(step, tx)
        return [probe(step, params, lora, batches, gap, tx, update) for gap in gaps]

    frozen, step, _ = adv
    absent, magnified = run(step, frozen.params, (0.0, 300.0))
    assert absent["snr_median"] == 0 and magnified["snr_median"] > 2
    assert absent["d_loss"] > 1.8 and absent["accuracy"] < 0.6, absent
    assert magnified["d_loss"] < 1.5 and magnified["accuracy"] > 0.7, magnified
    frozen, step = setup(step_config(**{**ADV, "adv.head_groups": 32}), pipeline_dir, mesh, encoders=False)
    blind, = run(step, frozen.params, (300.0,))
    assert blind["d_loss"] > 1.9 and blind["accuracy"] < 0.6, blind


def test_head_groups_must_divide_every_level(pipeline_dir, mesh):
    with pytest.raises(ConfigError, match="adv.head_groups: 3 must divide every discriminator head's width; this "
                                          "UNet has a 32-channel feature level"):
        setup(step_config(**{**ADV, "adv.head_groups": 3}), pipeline_dir, mesh, encoders=False)
