"""Gradient checkpointing and scanned transformer blocks change what is stored and what the compiler sees, never
what is computed: every remat policy, with the blocks unrolled or under ``lax.scan``, gives the loss and LoRA
gradients of unrolled blocks without remat (tiny SDXL-shaped UNet with a 2-deep transformer stack, fp32, CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _step_setup import one_level_unet_config
from flax import nnx

from tdd_jax.models.layers import REMAT_POLICIES, ModelOptions
from tdd_jax.models.lora import TDD_TARGETS, LoRAConfig, attach_lora, split_lora
from tdd_jax.models.unet import UNet2DConditionModel


def _unet_config() -> dict:
    return {**one_level_unet_config(), "transformer_layers_per_block": (2,)}


def _model(opts: ModelOptions, targets=TDD_TARGETS) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(_unet_config(), opts=opts, rngs=nnx.Rngs(0))
    attach_lora(unet, LoRAConfig(rank=2, alpha=2.0, targets=targets), nnx.Rngs(1))
    return unet


def _inputs():
    cfg = _unet_config()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([10, 700], jnp.int32)
    ctx = jnp.asarray(rng.normal(size=(2, 7, cfg["cross_attention_dim"])), jnp.float32)
    pooled_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    added = {"text_embeds": jnp.asarray(rng.normal(size=(2, pooled_dim)), jnp.float32),
             "time_ids": jnp.tile(jnp.float32([16, 16, 0, 0, 16, 16]), (2, 1))}
    return x, t, ctx, added


@functools.cache
def _loss_and_grads(remat: str, scan: bool = False):
    graphdef, lora, base = split_lora(_model(ModelOptions(remat=remat, scan_blocks=scan)))
    # Non-zero B (PEFT starts it at 0), so the gradients reach both LoRA factors.
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(lora))))
    lora = jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), lora)
    x, t, ctx, added = _inputs()

    def loss_fn(lora):
        out = nnx.merge(graphdef, lora, base)(x, t, ctx, added)
        return jnp.mean(jnp.square(out - x))

    jaxpr = str(jax.make_jaxpr(loss_fn)(lora))
    assert ("scan[" in jaxpr) == scan  # the blocks really are (or are not) one scan
    return jax.jit(jax.value_and_grad(loss_fn))(lora)


@pytest.mark.parametrize("remat,scan", [(p, False) for p in REMAT_POLICIES if p != "none"]
                         + [("none", True), ("full", True)])
def test_remat_and_scan_give_the_loss_and_gradients_of_unrolled_no_remat(remat, scan):
    loss_ref, grads_ref = _loss_and_grads("none")
    loss, grads = _loss_and_grads(remat, scan)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    flat_ref, flat = jax.tree.leaves(grads_ref), jax.tree.leaves(grads)
    assert len(flat) == len(flat_ref) > 0
    assert all(float(jnp.abs(g).max()) > 0 for g in flat_ref)  # every LoRA factor is reached
    for g, g_ref in zip(flat, flat_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)


def test_scan_refuses_blocks_that_differ():
    """A LoRA on only some blocks of a stack makes them differ in structure: scanning them is an error that
    names the block, not a silent wrong model."""
    unet = _model(ModelOptions(scan_blocks=True), targets=("transformer_blocks.1.attn1.to_q",))
    with pytest.raises(ValueError, match=r"transformer_blocks\.1 differs"):
        unet(*_inputs())


def test_scanned_clip_layers_equal_unrolled():
    """The CLIP encoder under ``scan_blocks`` (all layers but the last scanned, so the penultimate state SDXL
    reads stays an output) gives the unrolled encoder's states."""
    from tiny_pipeline import tiny_clip_configs

    from tdd_jax.models.clip import CLIPTextModelWithProjection

    cfg = {**tiny_clip_configs()[1], "num_hidden_layers": 4}
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 9)), jnp.int32)
    outs = [CLIPTextModelWithProjection(cfg, opts=ModelOptions(scan_blocks=scan), rngs=nnx.Rngs(0))(ids)
            for scan in (False, True)]
    for name in ("last_hidden_state", "penultimate_hidden_state", "text_embeds"):
        np.testing.assert_allclose(getattr(outs[1], name), getattr(outs[0], name), rtol=1e-5, atol=1e-6)
