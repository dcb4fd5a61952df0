"""Matmul and convolution FLOPs of a JAX function, counted from its jaxpr's shapes.

Why not only XLA's ``cost_analysis()``: XLA counts the body of a while loop once, whatever its trip count, so
for programs built on ``lax.scan`` (the sampler's steps, ``model.scan_blocks``, gradient accumulation) its
figure is short by the loop bodies' repeats. The jaxpr still has every ``scan`` with its ``length``, so a count
over ``dot_general`` and ``conv_general_dilated`` (2 FLOPs per multiply-add) with each scan body multiplied by
its length is exact for the work that dominates a UNet. Elementwise work (norms, softmax, activations) is not
counted: XLA's figure on a loop-free program is the cross-check (``tests/test_flops.py``).
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core


class UncountableLoop(ValueError):
    """A ``while`` loop with matmuls in its body: its trip count is a runtime value, so its FLOPs are unknown."""


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
    return 2 * math.prod(lhs) * math.prod(rhs_free)


def _conv_flops(eqn) -> int:
    # Each output element takes one multiply-add per kernel element feeding it: prod(kernel) / out_features.
    rhs = eqn.invars[1].aval.shape
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // out_features


def _sub_jaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> int:
    """FLOPs of matmuls and convolutions in ``jaxpr`` (a Jaxpr or ClosedJaxpr), scans times their length,
    ``cond`` as its most expensive branch."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in eqn.params["branches"])
        elif name == "pallas_call":
            raise ValueError("a Pallas kernel (e.g. model.attention_impl='splash') is opaque to the FLOP count: "
                             "count the program with the XLA attention")
        elif name == "while":
            if jaxpr_flops(eqn.params["body_jaxpr"]) or jaxpr_flops(eqn.params["cond_jaxpr"]):
                raise UncountableLoop("a while loop with matmuls/convolutions has no static trip count; "
                                      "use lax.scan (or fori_loop with static bounds)")
        else:
            inner = sum(jaxpr_flops(sub) for value in eqn.params.values() for sub in _sub_jaxprs(value))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def function_flops(fn, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)``; arguments may be ``jax.ShapeDtypeStruct``s (nothing is computed)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
