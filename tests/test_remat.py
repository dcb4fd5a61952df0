"""Gradient checkpointing changes what is stored, never what is computed: every remat policy gives the loss and
LoRA gradients of no remat (tiny SDXL-shaped UNet, fp32, CPU)."""

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


@functools.cache
def _loss_and_grads(remat: str):
    cfg = one_level_unet_config()
    unet = UNet2DConditionModel(cfg, opts=ModelOptions(remat=remat), rngs=nnx.Rngs(0))
    attach_lora(unet, LoRAConfig(rank=2, alpha=2.0, targets=TDD_TARGETS), nnx.Rngs(1))
    graphdef, lora, base = split_lora(unet)
    # Non-zero B (PEFT starts it at 0), so the gradients reach both LoRA factors.
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(lora))))
    lora = jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), lora)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([10, 700], jnp.int32)
    ctx = jnp.asarray(rng.normal(size=(2, 7, cfg["cross_attention_dim"])), jnp.float32)
    pooled_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    added = {"text_embeds": jnp.asarray(rng.normal(size=(2, pooled_dim)), jnp.float32),
             "time_ids": jnp.tile(jnp.float32([16, 16, 0, 0, 16, 16]), (2, 1))}

    def loss_fn(lora):
        out = nnx.merge(graphdef, lora, base)(x, t, ctx, added)
        return jnp.mean(jnp.square(out - x))

    return jax.jit(jax.value_and_grad(loss_fn))(lora)


@pytest.mark.parametrize("remat", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policy_gives_the_loss_and_gradients_of_no_remat(remat):
    loss_ref, grads_ref = _loss_and_grads("none")
    loss, grads = _loss_and_grads(remat)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    flat_ref, flat = jax.tree.leaves(grads_ref), jax.tree.leaves(grads)
    assert len(flat) == len(flat_ref) > 0
    assert all(float(jnp.abs(g).max()) > 0 for g in flat_ref)  # every LoRA factor is reached
    for g, g_ref in zip(flat, flat_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)
