"""attention_impl='splash' (Pallas TPU splash attention) against the XLA path of ``jax.nn.dot_product_attention``.

Off TPU the kernel runs in Pallas interpret mode, so these CPU tests execute the kernel code itself; each test
checks that the traced function really contains a ``pallas_call``. Tolerances are fp32 round-off relative to the
scale of the reference (the kernel's online softmax sums in a different order than XLA's softmax).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_pipeline import tiny_unet_config

from tdd_jax.models import layers
from tdd_jax.models.layers import ModelOptions
from tdd_jax.models.unet import UNet2DConditionModel
from tdd_jax.training.config import ATTENTION_IMPLS, FIELDS

RTOL = 2e-5  # of max |reference|

# (name, query tokens, key tokens, heads, head_dim, causal)
CASES = [
    ("self_256", 256, 256, 2, 64, False),  # one 256 block, no padding
    ("cross_77_keys", 256, 77, 2, 64, False),  # keys padded 77 -> 128 and masked out by segment ids
    ("clip_causal_77", 77, 77, 2, 64, True),  # CLIP: queries and keys padded, causal
]


def _qkv(tq, tk, heads, hd, dtype=jnp.float32, batch=2, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, (batch, t, heads * hd), dtype) for key, t in ((kq, tq), (kk, tk), (kv, tk)))


def _attn(impl, heads, causal):
    return lambda q, k, v: layers.attention(q, k, v, heads=heads, impl=impl, is_causal=causal)


def _close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def _uses_kernel(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def _run(fn, *args, kernels: int):
    """jit ``fn`` (traced once), check how many ``pallas_call``s its jaxpr holds, and run it."""
    traced = jax.jit(fn).trace(*args)
    assert str(traced.jaxpr).count("pallas_call") == kernels
    return traced.lower().compile()(*args)


def test_splash_is_a_config_value():
    assert "splash" in ATTENTION_IMPLS and FIELDS["model.attention_impl"] is ATTENTION_IMPLS


@pytest.mark.parametrize("name,tq,tk,heads,hd,causal", CASES, ids=[c[0] for c in CASES])
def test_splash_matches_xla(name, tq, tk, heads, hd, causal):
    assert layers._splash_interpret(jax.sharding.get_abstract_mesh()) == (jax.default_backend() != "tpu")
    q, k, v = _qkv(tq, tk, heads, hd)
    splash, ref = _attn("splash", heads, causal), _attn(None, heads, causal)
    out, ref_out = (_run(splash, q, k, v, kernels=1), _run(ref, q, k, v, kernels=0))
    assert out.shape == q.shape and out.dtype == q.dtype
    _close(out, ref_out)

    # The trainer differentiates through attention: the kernel's custom VJP (Pallas dq/dkv kernels) vs XLA.
    def grads(fn):
        loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731 (a non-uniform cotangent)
        return jax.grad(loss, argnums=(0, 1, 2))

    # forward + backward kernels (dq and dkv: the default, unfused backward)
    for got, want in zip(_run(grads(splash), q, k, v, kernels=3), _run(grads(ref), q, k, v, kernels=0)):
        _close(got, want, rtol=5e-5)


def test_splash_bf16_computes_softmax_in_fp32():
    q, k, v = _qkv(77, 77, 2, 64, dtype=jnp.bfloat16)
    out = jax.jit(_attn("splash", 2, True))(q, k, v)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
    ref32 = _attn(None, 2, True)(*(x.astype(jnp.float32) for x in (q, k, v)))
    _close(out, ref32, rtol=2e-2)  # bf16 output rounding, not bf16 logits
    _close(out, _attn(None, 2, True)(q, k, v), rtol=2e-2)


def test_explicit_mask_falls_back_to_xla():
    q, k, v = _qkv(16, 16, 2, 8)
    mask = jnp.tril(jnp.ones((16, 16), bool))[None, None]
    fn = lambda impl: lambda q, k, v: layers.attention(q, k, v, heads=2, impl=impl, mask=mask)  # noqa: E731
    assert not _uses_kernel(fn("splash"), q, k, v)
    _close(fn("splash")(q, k, v), fn(None)(q, k, v))


def _random_state(abstract_state, seed=0):
    """Weights for an ``nnx.eval_shape`` model drawn in numpy: eager construction compiles every init op on CPU
    (~20 s for the tiny UNet), this takes milliseconds. Fan-in scaled matrices/kernels, norm scales near 1."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if x.ndim >= 2:
            value = rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[1:]))
        else:
            is_scale = path[-1] == "weight" and any("norm" in str(p) for p in path)
            value = (1.0 if is_scale else 0.0) + 0.1 * rng.standard_normal(x.shape)
        return jnp.asarray(value, x.dtype)

    return jax.tree_util.tree_map_with_path(lambda path, x: draw([getattr(p, "key", p) for p in path], x),
                                            abstract_state)


def test_tiny_unet_splash_matches_xla():
    start = time.perf_counter()
    cfg = tiny_unet_config()
    graphdefs, state = {}, None
    for impl in ("splash", None):
        abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, opts=ModelOptions(attention_impl=impl),
                                                               rngs=nnx.Rngs(0)))
        graphdefs[impl], abstract_state = nnx.split(abstract)
        state = _random_state(abstract_state) if state is None else state
    rng = np.random.default_rng(1)
    text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    args = (jnp.asarray(rng.standard_normal((2, 8, 8, cfg["in_channels"])), jnp.float32),
            jnp.array([999.0, 17.0]),
            jnp.asarray(rng.standard_normal((2, 7, cfg["cross_attention_dim"])), jnp.float32),
            {"text_embeds": jnp.asarray(rng.standard_normal((2, text_dim)), jnp.float32),
             "time_ids": jnp.array([[1024.0, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 1024, 1024]])})

    outs = {}
    for impl, graphdef in graphdefs.items():
        traced = jax.jit(lambda state, *a, graphdef=graphdef: nnx.merge(graphdef, state)(*a)).trace(state, *args)
        assert ("pallas_call" in str(traced.jaxpr)) == (impl == "splash")
        outs[impl] = traced.lower().compile()(state, *args)
    assert outs[None].shape == args[0].shape and bool(jnp.all(jnp.isfinite(outs[None])))
    _close(outs["splash"], outs[None], rtol=1e-4)  # through two levels of resnets, norms and 3 transformer blocks
    assert time.perf_counter() - start < 60
