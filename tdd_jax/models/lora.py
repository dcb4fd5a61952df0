"""LoRA adapters on any model built from ``layers.Linear``/``layers.Conv2d`` (PEFT semantics).

Targets are matched like PEFT's ``target_modules``: a module whose dotted path equals a target or ends in
``.<target>``. lora_A ~ kaiming-uniform(a=√5) (bound 1/√fan_in), lora_B = 0, scale = alpha / rank, so a fresh
adapter leaves the model unchanged. The adapter is a separate pytree: ``split_lora`` returns
(graphdef, lora_state, base_state) and ``merge_lora`` rebuilds a model from a base and any LoRA tree (online,
EMA, or a loaded file), which is how the trainer runs student and target on one copy of the base; the teacher is
the graphdef of the same architecture built without LoRA slots, merged with that same base state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tdd_jax.models.layers import Conv2d, Linear, LoRAParam

# The official TDD SDXL training targets (train_tdd.py).
TDD_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
               "time_emb_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 64
    alpha: float | None = None  # None -> PEFT default of 8
    targets: tuple[str, ...] = TDD_TARGETS

    @property
    def scale(self) -> float:
        return (8.0 if self.alpha is None else float(self.alpha)) / self.rank


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def matches_target(path: str, targets: Sequence[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def lora_modules(model: nnx.Module, targets: Sequence[str]):
    """(dotted path, layer) of every Linear/Conv2d that a LoRA on ``targets`` adapts."""
    found = []
    for path, mod in nnx.iter_modules(model):
        if isinstance(mod, (Linear, Conv2d)) and matches_target(_path_str(path), targets):
            found.append((_path_str(path), mod))
    return found


def attach_lora(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs, param_dtype=jnp.float32) -> list[str]:
    """Add LoRA weights to every targeted layer in place; returns the adapted module paths."""
    if cfg.rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {cfg.rank}")
    mods = lora_modules(model, cfg.targets)
    if not mods:
        raise ValueError(f"LoRA targets {cfg.targets} match no Linear/Conv2d layer of {type(model).__name__}")
    for _, mod in mods:
        if isinstance(mod, Linear):
            a_shape, b_shape, fan_in = (cfg.rank, mod.in_features), (mod.out_features, cfg.rank), mod.in_features
        else:
            k = mod.kernel_size
            a_shape = (cfg.rank, mod.in_channels, k, k)
            b_shape = (mod.out_channels, cfg.rank, 1, 1)
            fan_in = mod.in_channels * k * k
        bound = 1.0 / math.sqrt(fan_in)
        mod.lora_A = LoRAParam(jax.random.uniform(rngs.params(), a_shape, param_dtype, -bound, bound))
        mod.lora_B = LoRAParam(jnp.zeros(b_shape, param_dtype))
        mod.lora_alpha_over_rank = cfg.scale
    return [p for p, _ in mods]


def new_lora(model: nnx.Module, cfg: LoRAConfig, key: jax.Array, param_dtype=jnp.float32) -> nnx.State:
    """A fresh LoRA state (``attach_lora``: A uniform, B zero) for ``model``'s architecture, drawn from ``key``.

    ``model`` gets the LoRA attached in place, so pass a throwaway one: an abstract model (``nnx.eval_shape``)
    makes this a LoRA initialiser that never initialises, traces or compiles a base weight.
    """
    attach_lora(model, cfg, nnx.Rngs(key), param_dtype)
    return split_lora(model)[1]


def split_lora(model: nnx.Module):
    """(graphdef, lora_state, base_state): gradients and optimizer state only ever see ``lora_state``."""
    return nnx.split(model, LoRAParam, ...)


def merge_lora(graphdef, lora_state, base_state) -> nnx.Module:
    return nnx.merge(graphdef, lora_state, base_state)


# --- merged LoRA for inference ------------------------------------------------------------------------------

def lora_delta(lora_A: jax.Array, lora_B: jax.Array) -> jax.Array:
    """B·A in the layout of the layer's weight, float32: (out, r) @ (r, in) for a Linear; for a Conv2d, PEFT's
    A conv (the layer's kernel/stride/padding) followed by a 1x1 B conv is one conv with kernel
    Σ_r B[:, r] A[r] of shape (out, in, kh, kw)."""
    up = lora_B.astype(jnp.float32).reshape(lora_B.shape[0], lora_B.shape[1])
    return jnp.tensordot(up, lora_A.astype(jnp.float32), axes=(1, 0))


def merged_weight(weight: jax.Array, deltas: Sequence[tuple[jax.Array, jax.Array, float]]) -> jax.Array:
    """W + Σ scale·B·A over ``deltas`` ((lora_A, lora_B, scale) each, ``scale`` including alpha / rank), computed
    in float32 and stored in W's dtype."""
    merged = weight.astype(jnp.float32)
    for lora_A, lora_B, scale in deltas:
        merged = merged + scale * lora_delta(lora_A, lora_B)
    return merged.astype(weight.dtype)


def detach_lora(model: nnx.Module) -> dict[str, tuple[jax.Array, jax.Array, float]]:
    """Take the LoRA off ``model`` in place: {module path: (lora_A, lora_B, alpha / rank)}.

    The model is left without LoRA slots, so its graphdef is the plain base model's and a LoRA can only be
    applied to it by ``merge_weights``.
    """
    detached = {}
    for path, mod in nnx.iter_modules(model):
        if isinstance(mod, (Linear, Conv2d)) and mod.lora_A is not None:
            detached[_path_str(path)] = (mod.lora_A[...], mod.lora_B[...], mod.lora_alpha_over_rank)
            mod._init_no_lora()
    return detached


def merge_weights(base_state: nnx.State,
                  loras: Sequence[tuple[dict[str, tuple[jax.Array, jax.Array, float]], float]]) -> nnx.State:
    """A copy of ``base_state`` (from a model without LoRA slots) with every adapted layer's weight replaced by
    ``merged_weight`` over the LoRAs adapting it: ``loras`` is (LoRA, strength) pairs, a LoRA being
    {module path: (lora_A, lora_B, alpha / rank)}, so several LoRAs (e.g. a distillation LoRA and a style LoRA)
    add up as in diffusers' ``set_adapters`` + ``fuse_lora``. ``base_state`` itself is untouched, so dropping the
    merged copy restores the base exactly, and other strengths re-merge from it. Unadapted leaves are shared."""
    deltas: dict[str, list[tuple[jax.Array, jax.Array, float]]] = {}
    for lora, strength in loras:
        for module, (lora_A, lora_B, alpha_over_rank) in lora.items():
            deltas.setdefault(module, []).append((lora_A, lora_B, strength * alpha_over_rank))
    found = set()

    def merge(path, var):
        keys = [str(getattr(p, "key", p)) for p in path]
        module = ".".join(keys[:-1])
        if keys[-1] != "weight" or module not in deltas:
            return var
        found.add(module)
        return var.replace(merged_weight(var[...], deltas[module]))

    merged = jax.tree_util.tree_map_with_path(merge, base_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    missing = sorted(set(deltas) - found)
    if missing:
        raise ValueError(f"LoRA modules {missing[:5]} have no weight in the base state ({len(missing)} missing)")
    return merged
