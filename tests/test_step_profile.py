"""launch/step_profile.py: a train step's time by part and kind of op, from XLA:CPU and torch profiler traces."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import step_profile  # noqa: E402


def test_innermost_segments_and_shared_time():
    # One thread: a loop w (0-10) with body ops a (2-4) and b (5-8); another thread: c (3-6).
    pieces = step_profile.innermost_segments([(0, 10, "w"), (2, 4, "a"), (5, 8, "b")])
    assert pieces == [(0, 2, "w"), (2, 4, "a"), (4, 5, "w"), (5, 8, "b"), (8, 10, "w")]
    shares = step_profile.shared_wall_time(pieces + step_profile.innermost_segments([(3, 6, "c")]))
    # 3-4: a and c share; 4-5: w and c; 5-6: b and c.
    assert shares == pytest.approx({"w": 4.5, "a": 1.5, "b": 2.5, "c": 1.5})
    assert sum(shares.values()) == pytest.approx(10)


@pytest.mark.parametrize("name,kind", [
    ("aten::convolution_backward", "conv"), ("aten::mkldnn_convolution", "conv"), ("aten::addmm", "matmul"),
    ("aten::bmm", "matmul"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "matmul"),
    ("aten::native_group_norm", "reduce/norm"), ("aten::_softmax", "reduce/norm"), ("aten::sum", "reduce/norm"),
    ("aten::copy_", "data movement"), ("aten::cat", "data movement"), ("aten::silu", "elementwise"),
    ("aten::_foreach_mul_", "elementwise"), ("Optimizer.step#AdamW.step", "other")])
def test_torch_kinds(name, kind):
    assert step_profile.torch_kind(name) == kind


def test_xla_parts_from_named_scopes():
    """Convolutions and matmuls land in the part whose scope issued them, the gradient's in 'student
    backward' (XLA leaves its weight-gradient convolutions without an op_name: they inherit it)."""
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k[0], (8, 16, 16, 16))
    w = jax.random.normal(k[1], (3, 3, 16, 16)) * 0.1
    m = jax.random.normal(k[2], (512, 512))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    @jax.jit
    def step(w, x, m):
        with jax.named_scope("teacher"):
            t = jnp.tanh(m @ m @ m).sum()
        with jax.named_scope("target"):
            target = conv(jnp.flip(x, 1), w) * t  # not the student's conv, which XLA would share

        def loss(w):
            with jax.named_scope("student"):
                return jnp.mean((jax.nn.silu(conv(x, w)) - target) ** 2)

        value, grad = jax.value_and_grad(loss)(w)
        return w - 0.1 * grad, value

    compiled = step.lower(w, x, m).compile()

    def run():
        jax.block_until_ready(compiled(w, x, m))

    run()
    profile = step_profile.xla_step_profile(run, compiled, repeats=2)
    grid = profile["grid"]
    for part in ("student forward", "student backward", "target"):
        assert grid[part]["conv"] > 0, (part, grid)
    assert grid["teacher"]["matmul"] > 0 and grid["teacher"]["conv"] == 0
    assert grid["rest"]["conv"] == grid["rest"]["matmul"] == 0, grid["rest"]
    assert profile["op_s"] == pytest.approx(sum(sum(r.values()) for r in grid.values()))
    assert 0 < profile["op_s"] <= profile["thread_s"] * (1 + 1e-9)
    assert "| student backward |" in step_profile.grid_table({"tdd_jax": profile, "again": profile})
    assert profile["top"][0]["s"] >= profile["top"][-1]["s"] > 0 and "| XLA op |" in step_profile.top_table(profile)


def test_torch_parts_from_record_function():
    import torch
    from torch.profiler import record_function

    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(4, 8, 16, 16)

    def run():
        with torch.no_grad(), record_function("teacher"):
            target = conv(x).detach()
        with record_function("student forward"):
            loss = ((torch.nn.functional.silu(conv(x)) - target) ** 2).mean()
        with record_function("student backward"):
            loss.backward()
        conv.zero_grad()

    run()
    grid = step_profile.torch_step_profile(run, repeats=2)["grid"]
    for part in ("teacher", "student forward", "student backward"):
        assert grid[part]["conv"] > 0, (part, grid)
    assert grid["target"]["conv"] == grid["rest"]["conv"] == 0
    assert grid["student forward"]["elementwise"] > 0
