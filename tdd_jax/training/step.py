"""The TDD distillation step (the paper's Algorithm 1) as one compiled, sharded function.

Per example: solver index n ~ U{0..N−1}, t_{n+1} = grid[n], t_n = max(t_{n+1} − T/N, 0); a target τ̃ ≤ t_n from
the configured rule (tdd / pcm / lcm / tcd); x_{t_{n+1}} = α·x0 + σ·ε. The teacher (the base UNet, LoRA off)
takes one guided DDIM step to x̂_{t_n}; the loss compares the student f_θ(x_{t_{n+1}}, t_{n+1}, τ̃) with the
target f_θ⁻(x̂_{t_n}, t_n, τ̃), θ⁻ = EMA LoRA (or the online LoRA under stop-gradient when ema_decay = 0).

Empty prompts (probability ρ) follow ``guidance.mode``: 'decoupled' (the paper) conditions those examples on
the zero embedding and gives them w = 0, so the teacher is unguided there; 'official' (train_tdd.py) conditions
them on the encoded "" caption and still guides them against the zero embedding.

All randomness is drawn per example from a per-example key, so the step computes the same numbers whether
the batch is split into microbatches (gradient accumulation, a ``lax.scan``) or over any number of devices.

With ``adv.enabled`` (TDD-adv, PCM's adversarial recipe; see ``adversarial.py``) the step alternates as the
official code does: even steps (state.step % 2 == 0, the first one included) update only the discriminator
heads on the hinge D loss, odd steps only the LoRA on consistency + λ·hinge G loss. Both updates are branches of
one ``lax.cond`` in the one compiled step, so each step runs only its own branch's backward pass (computing both
updates every step would double the adversarial cost for no gain in fidelity). Every step logs both losses
(``g_adv``, ``d_loss``) and the consistency ``loss``; ``d_step`` says which update it made.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from tdd_jax.conditioning import Cond, cfg_pair, split_cfg_pair, unet_output, zero_conditioning
from tdd_jax.diffusion.consistency import consistency_fn, lcm_boundary_fn
from tdd_jax.diffusion.schedule import NoiseSchedule, expand_like
from tdd_jax.diffusion.solver import (ddim_step, guide, sample_guidance_weight, solver_prev_timesteps,
                                      solver_timesteps)
from tdd_jax.diffusion.targets import TargetRule, sample_targets
from tdd_jax.models.lora import new_lora
from tdd_jax.training import sharding
from tdd_jax.training.adversarial import Adversary, hinge_d_loss, hinge_g_loss
from tdd_jax.training.config import validate
from tdd_jax.training.frozen import FrozenPipeline, abstract_unet, lora_config, min_shard_size, model_options
from tdd_jax.training.state import TrainState

# The two kinds of batch the data pipeline yields (other keys, e.g. caption strings, are ignored).
PIXEL_FIELDS = ("pixels", "input_ids", "input_ids_2", "time_ids")
CACHED_FIELDS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "time_ids")


def teacher_outputs(frozen: FrozenPipeline, base_params: dict, x: jax.Array, t: jax.Array,
                    cond: Cond) -> tuple[jax.Array, jax.Array]:
    """(conditional, unconditional) outputs of the frozen base UNet as one 2B-example call.

    The teacher's graph has no LoRA slots, so this is exactly the base model on the student's weights.
    """
    x2, t2, both = cfg_pair((x, t, cond), (x, t, cond.unconditional()))
    return split_cfg_pair(unet_output(frozen.teacher(base_params), x2, t2, both))


def distillation_loss(pred: jax.Array, target: jax.Array, kind: str, huber_c: float) -> jax.Array:
    """Pseudo-Huber mean(√((p − t)² + c²) − c) (official, c = 0.001) or mean squared error."""
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "huber":
        return jnp.mean(jnp.sqrt(diff**2 + huber_c**2) - huber_c)
    return jnp.mean(diff**2)


def make_optimizer(optim, num_train_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW after global-norm clipping, from ``cfg.optim.{lr, b1, b2, eps, weight_decay, grad_clip, schedule,
    warmup_steps}`` (checked by ``config.validate``); grad_clip 0 disables clipping.

    Schedules: 'constant' (official); 'warmup', linear from 0 over warmup_steps, then constant; 'cosine', the
    same warm-up, then a cosine decay to 0 at ``num_train_steps``: a short run ends on averaged-out weights
    instead of wherever the last noisy steps of a constant rate left them.
    """
    peak, warmup = float(optim.lr), int(optim.warmup_steps)
    if optim.schedule == "warmup":
        lr = optax.linear_schedule(0.0, peak, warmup)
    elif optim.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_train_steps, warmup + 1), 0.0)
    else:
        lr = optax.constant_schedule(peak)
    adamw = optax.adamw(lr, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                        weight_decay=float(optim.weight_decay))
    if optim.grad_clip:
        return optax.chain(optax.clip_by_global_norm(float(optim.grad_clip)), adamw), lr
    return adamw, lr


def select_batch(batch: dict) -> dict:
    """The array fields the step consumes (pixel or cached kind); drop the rest (captions, keys) before
    ``sharding.shard_batch``."""
    for fields in (PIXEL_FIELDS, CACHED_FIELDS):
        if all(k in batch for k in fields):
            return {k: batch[k] for k in fields}
    raise ValueError(f"batch has fields {sorted(batch)}; expected all of {PIXEL_FIELDS} (pixels and captions) "
                     f"or of {CACHED_FIELDS} (cached latents and embeddings)")


def vae_factor(vae_config: dict) -> int:
    """How much the VAE shrinks each image side (2 per level after the first)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def batch_kind(cfg) -> str:
    """'cached' (latents and embeddings) for ``data.source='cache'``, else 'pixels' (images and token ids)."""
    return "cached" if cfg.data.source == "cache" else "pixels"


def batch_spec(cfg, configs: dict, kind: str) -> dict:
    """ShapeDtypeStructs of the global batch the step consumes, from the config and the pipeline's component
    configs (``configs[name]`` = its config.json), so the step can be compiled before any data arrives:
    'pixels' (uint8 images + both tokenizers' ids) or 'cached' (latents and text embeddings)."""
    b, res = int(cfg.batch.global_batch), int(cfg.resolution)
    f = jax.ShapeDtypeStruct
    time_ids = f((b, 6), jnp.float32)
    if kind == "pixels":
        ids = f((b, int(configs["text_encoder"]["max_position_embeddings"])), jnp.int32)
        return {"pixels": f((b, res, res, 3), jnp.uint8), "input_ids": ids, "input_ids_2": ids,
                "time_ids": time_ids}
    if kind != "cached":
        raise ValueError(f"batch kind {kind!r} is not 'pixels' or 'cached'")
    side, unet = res // vae_factor(configs["vae"]), configs["unet"]
    return {"latents": f((b, side, side, configs["vae"]["latent_channels"]), jnp.float32),
            "prompt_embeds": f((b, int(configs["text_encoder"]["max_position_embeddings"]),
                                unet["cross_attention_dim"]), jnp.float32),
            "pooled_prompt_embeds": f((b, configs["text_encoder_2"]["projection_dim"]), jnp.float32),
            "time_ids": time_ids}


def check_batch(batch: dict, spec: dict) -> None:
    """A clear error when the data pipeline's global batch is not what the step was compiled for."""
    wrong = [f"{k}: {tuple(np.shape(batch[k]))} {batch[k].dtype} (expected {v.shape} {v.dtype})"
             for k, v in spec.items()
             if k in batch and (tuple(np.shape(batch[k])), batch[k].dtype) != (v.shape, v.dtype)]
    missing = sorted(set(spec) - set(batch))
    if wrong or missing:
        raise ValueError("the data pipeline's batch does not match the compiled step (batch.global_batch, "
                         f"resolution, data.source): {'; '.join(wrong)}"
                         + (f"; missing fields {missing}" if missing else ""))


class CompiledStep(NamedTuple):
    """An ahead-of-time compiled step with what the loop logs at start-up (per-device numbers)."""

    fn: Any  # (state, base_params, batch) -> (state, metrics); the state argument is donated
    memory: dict[str, int]  # bytes per device: arguments, outputs, aliased (donated), temporaries, total
    flops: float | None  # XLA's estimate for one step of one device's program; None where the backend has none
    optimal_seconds: float | None  # the backend's cost-model time for that program; None where it has none
    while_loops: int  # while loops in the optimised program (XLA counts each body once in the two above)
    unpriced_ops: int  # ops the TPU cost model prices at -1 s each (UNPRICED_CUSTOM_CALLS): add them back
    mosaic_kernels: int  # Pallas TPU kernel calls (e.g. splash attention) in the optimised program


@dataclasses.dataclass
class TrainStep:
    """The step and its state for one config and frozen pipeline on ``mesh``; built by ``build_train_step``.

    init_state(rng) -> TrainState, created sharded (a fresh LoRA: ``lora.new_lora`` on the abstract UNet, so
    no base weight is initialised; laid out by ``cfg.mesh.lora_sharding``). train_step(state, base_params,
    batch) -> (state, metrics): jitted with the state donated; base_params is ``frozen.params`` and batch a
    dict of global arrays (see ``sharding.shard_batch``). step_fn is the same function un-jitted.
    state_shardings / abstract_state(): the state's shardings, and its shapes with them (for restoring
    checkpoints in place).
    """

    cfg: Any
    frozen: FrozenPipeline
    mesh: Mesh
    schedule: NoiseSchedule
    rule: TargetRule
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    adversary: Adversary | None = None  # the discriminator when cfg.adv.enabled

    def __post_init__(self):
        mesh = self.mesh
        self._grid = solver_timesteps(self.rule.num_solver_steps, self.schedule.num_train_timesteps)
        self._prev = solver_prev_timesteps(self.rule.num_solver_steps, self.schedule.num_train_timesteps)
        self._state_shapes = jax.eval_shape(self._init_state, jax.random.PRNGKey(0))
        self.state_shardings = self._state_shardings()
        base_shardings = jax.tree.map(lambda x: x.sharding, self.frozen.params)
        metric_sharding = sharding.replicated(mesh)
        self.init_state = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self.train_step = jax.jit(
            sharding.traced_on(mesh, self.step_fn),
            in_shardings=(self.state_shardings, base_shardings, sharding.batch_sharding(mesh)),
            out_shardings=(self.state_shardings, metric_sharding), donate_argnums=0)

    # --- state ------------------------------------------------------------------------------------------

    def _init_state(self, rng: jax.Array) -> TrainState:
        lora_key, rng = jax.random.split(rng)
        lora = new_lora(abstract_unet(self.frozen.unet_config, model_options(self.cfg.model)),
                        lora_config(self.cfg.lora), lora_key)
        ema = jax.tree.map(jnp.copy, lora) if self.cfg.ema_decay > 0 else None
        heads = heads_opt = None
        if self.adversary is not None:  # its own key, so the LoRA and the step's draws are as without it
            heads = self.adversary.init_heads(jax.random.fold_in(lora_key, 1))
            heads_opt = self.adversary.tx.init(heads)
        return TrainState(step=jnp.zeros((), jnp.int32), lora=lora, ema_lora=ema, opt_state=self.tx.init(lora),
                          rng=rng, heads=heads, heads_opt_state=heads_opt)

    def _state_shardings(self) -> TrainState:
        """LoRA, EMA, heads and optimizer moments by ``cfg.mesh.lora_sharding`` (``sharding.trainable_shardings``:
        the base weights' size rule, or replicated); step and rng replicated."""
        mesh, shapes = self.mesh, self._state_shapes
        rule, min_size = self.cfg.mesh.lora_sharding, min_shard_size(self.cfg)
        rep = sharding.replicated(mesh)
        weights = lambda tree: sharding.trainable_shardings(mesh, tree, rule, min_size)  # noqa: E731
        return TrainState(step=rep, rng=rep, lora=weights(shapes.lora), ema_lora=weights(shapes.ema_lora),
                          opt_state=weights(shapes.opt_state), heads=weights(shapes.heads),
                          heads_opt_state=weights(shapes.heads_opt_state))

    def abstract_state(self) -> TrainState:
        """The state as ShapeDtypeStructs carrying their shardings: the target of a checkpoint restore and
        the state argument of ahead-of-time compilation."""
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self._state_shapes, self.state_shardings)

    # --- one example's randomness -------------------------------------------------------------------------

    def _draw(self, key: jax.Array, latent_shape: tuple[int, ...]) -> dict:
        """Everything random about one example, from its own key."""
        k_n, k_tau, k_noise, k_w, k_empty = jax.random.split(key, 5)
        g = self.cfg.guidance
        n = jax.random.randint(k_n, (), 0, self.rule.num_solver_steps)
        t_cur = jnp.asarray(self._prev, jnp.int32)[n]
        return {"t_next": jnp.asarray(self._grid, jnp.int32)[n], "t_cur": t_cur,
                "tau": sample_targets(self.rule, k_tau, t_cur),
                "noise": jax.random.normal(k_noise, latent_shape, jnp.float32),
                "w": sample_guidance_weight(k_w, 1, float(g.w_min), float(g.w_max))[0],
                "empty": jax.random.bernoulli(k_empty, float(g.rho))}

    # --- the distillation loss on one microbatch ------------------------------------------------------------

    def _inputs(self, base_params: dict, mb: dict, vae_keys: jax.Array) -> tuple[jax.Array, Cond]:
        """(scaled latents x0, conditioning) of a microbatch, through the frozen encoders if it holds pixels."""
        if "pixels" in mb:
            latents = self.frozen.encode_pixels(base_params, mb["pixels"], vae_keys)
            prompt_embeds, pooled = self.frozen.encode_prompts(base_params, mb["input_ids"], mb["input_ids_2"])
        else:
            latents, prompt_embeds, pooled = mb["latents"], mb["prompt_embeds"], mb["pooled_prompt_embeds"]
        cond = Cond(prompt_embeds, pooled, mb["time_ids"].astype(jnp.float32))
        return jax.lax.stop_gradient((self.frozen.scale_latents(latents), cond))

    def _drop_captions(self, base_params: dict, cond: Cond, w: jax.Array, empty: jax.Array):
        """Replace the captions of the ``empty`` examples as ``guidance.mode`` says; returns (cond, w)."""
        if self.cfg.guidance.mode == "official":
            e = base_params["empty_prompt"]
            pe, pooled = e["prompt_embeds"][None], e["pooled_prompt_embeds"][None]
        else:
            pe, pooled = zero_conditioning(cond.prompt_embeds[:1], cond.pooled[:1])
            w = jnp.where(empty, 0.0, w)
        pe = jnp.where(expand_like(empty, cond.prompt_embeds), pe.astype(cond.prompt_embeds.dtype),
                       cond.prompt_embeds)
        pooled = jnp.where(expand_like(empty, cond.pooled), pooled.astype(cond.pooled.dtype), cond.pooled)
        return Cond(pe, pooled, cond.time_ids), w

    def _consistency(self, out: jax.Array, x: jax.Array, t: jax.Array, tau: jax.Array) -> jax.Array:
        if self.rule.kind == "lcm":
            return lcm_boundary_fn(self.schedule, out, x, t)
        return consistency_fn(self.schedule, out, x, t, tau)

    def teacher_step(self, base_params, x_next, t_next, t_cur, cond: Cond, w) -> jax.Array:
        """x̂_{t_n}: one DDIM step of the guided teacher, CFG (LCM form) on both x̂0 and ε̂."""
        cond_out, uncond_out = teacher_outputs(self.frozen, base_params, x_next, t_next, cond)
        x0_c, eps_c = self.schedule.to_x0_eps(cond_out, x_next, t_next)
        x0_u, eps_u = self.schedule.to_x0_eps(uncond_out, x_next, t_next)
        return ddim_step(self.schedule, guide(x0_c, x0_u, w), guide(eps_c, eps_u, w), t_cur)

    def consistency_target(self, target_lora, base_params, mb: dict, keys: jax.Array):
        """(x_{t_{n+1}}, the examples' draws, conditioning, target f_θ⁻(x̂_{t_n}, t_n, τ̃)) of a microbatch: all of
        the consistency loss but the student. ``keys``: (b, 2, 2), each example's VAE-draw key and key for the rest.
        The draws' ``w`` is the guidance each example got (0 for an emptied caption in 'decoupled' mode)."""
        x0, cond = self._inputs(base_params, mb, keys[:, 0])
        d = jax.vmap(lambda k: self._draw(k, x0.shape[1:]))(keys[:, 1])
        cond, w = self._drop_captions(base_params, cond, d["w"], d["empty"])
        x_next = self.schedule.add_noise(x0, d["noise"], d["t_next"])
        # The named scopes label each op's op_name, so a profile can say which piece its time went to.
        with jax.named_scope("teacher"):
            x_cur = self.teacher_step(base_params, x_next, d["t_next"], d["t_cur"], cond, w)
        with jax.named_scope("target"):
            target_out = unet_output(self.frozen.unet(base_params, target_lora), x_cur, d["t_cur"], cond)
            target = jax.lax.stop_gradient(self._consistency(target_out, x_cur, d["t_cur"], d["tau"]))
        return x_next, d | {"w": w}, cond, target

    def student_prediction(self, lora, base_params, x_next: jax.Array, d: dict, cond: Cond) -> jax.Array:
        """f_θ(x_{t_{n+1}}, t_{n+1}, τ̃): the student's point at the examples' targets."""
        with jax.named_scope("student"):
            out = unet_output(self.frozen.unet(base_params, lora), x_next, d["t_next"], cond)
            return self._consistency(out, x_next, d["t_next"], d["tau"])

    def _microbatch(self, lora, target_lora, heads, base_params, mb: dict, keys: jax.Array, phase: str | None):
        """({'loss': ..., adversarial losses}, gradients, per-example metrics) of one microbatch.

        phase None: no adversary, LoRA gradients of the consistency loss; 'g': LoRA gradients of consistency +
        λ·G loss; 'd': heads gradients of the D loss (the student's prediction under stop-gradient).
        """
        keys = jax.vmap(jax.random.split)(keys)  # (b, 2, 2): a VAE-draw key and a key for the rest
        x_next, d, cond, target = self.consistency_target(target_lora, base_params, mb, keys)
        per_example = {"tau": d["tau"], "t_n": d["t_cur"], "w": d["w"]}

        def predict(lora):
            return self.student_prediction(lora, base_params, x_next, d, cond)

        def consistency_loss(pred):
            return distillation_loss(pred, target, self.cfg.loss.kind, float(self.cfg.loss.huber_c))

        if phase is None:
            loss, grads = jax.value_and_grad(lambda p: consistency_loss(predict(p)))(lora)
            return {"loss": loss}, grads, per_example

        adv = self.adversary
        a = jax.vmap(lambda k, tau: adv.draw(k, tau, x_next.shape[1:]))(keys[:, 1], d["tau"])
        real = adv.renoise(target, d["tau"], a["gan_t"], a["z_real"])
        logits = lambda h, x: adv.logits(h, base_params, x, a["gan_t"], cond)  # noqa: E731
        per_example["gan_t"] = a["gan_t"]
        if phase == "g":
            def g_fn(lora):
                pred = predict(lora)
                fake_logits = logits(heads, adv.renoise(pred, d["tau"], a["gan_t"], a["z_fake"]))
                loss, g_adv = consistency_loss(pred), hinge_g_loss(fake_logits)
                return loss + adv.g_weight * g_adv, (loss, g_adv, fake_logits)

            (_, (loss, g_adv, fake_logits)), grads = jax.value_and_grad(g_fn, has_aux=True)(lora)
            # For the log only (no gradient): what the heads make of the real side at this step.
            d_loss = hinge_d_loss(jax.lax.stop_gradient(fake_logits), logits(heads, real))
        else:
            pred = jax.lax.stop_gradient(predict(lora))
            fake = adv.renoise(pred, d["tau"], a["gan_t"], a["z_fake"])

            def d_fn(heads):
                fake_logits = logits(heads, fake)
                return hinge_d_loss(fake_logits, logits(heads, real)), hinge_g_loss(fake_logits)

            (d_loss, g_adv), grads = jax.value_and_grad(d_fn, has_aux=True)(heads)
            loss = consistency_loss(pred)
        return {"loss": loss, "g_adv": g_adv, "d_loss": d_loss}, grads, per_example

    # --- the step ---------------------------------------------------------------------------------------------

    def _losses_and_grads(self, state: TrainState, base_params, batch: dict, keys: jax.Array, phase: str | None):
        """Mean losses, gradients (of the LoRA, or of the heads in phase 'd') and per-example metrics of the
        global batch: one microbatch, or ``batch.grad_accum`` of them accumulated."""
        accum = int(self.cfg.batch.grad_accum)
        target_lora = jax.lax.stop_gradient(state.target_lora)

        def micro(mb, k):
            return self._microbatch(state.lora, target_lora, state.heads, base_params, mb, k, phase)

        if accum == 1:  # no loop: compiles twice as fast as a one-trip scan on CPU
            return micro(batch, keys)
        return self._accumulate(micro, batch, keys, accum)

    def _accumulate(self, micro, batch: dict, keys: jax.Array, accum: int):
        """Mean losses and gradients over ``accum`` microbatches, one at a time in a ``lax.scan``.

        (B, ...) -> (accum, B/accum, ...): microbatch i takes examples i, i+accum, ...; no data moves between
        devices, since each device keeps its contiguous block of examples.
        """
        size = keys.shape[0]
        micro_sharding = sharding.microbatched_sharding(self.mesh)

        def split(x):
            x = x.reshape((size // accum, accum) + x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, micro_sharding)

        def body(acc, inputs):
            losses, grads, metrics = micro(*inputs)
            return jax.tree.map(jnp.add, acc, (losses, grads)), metrics

        shapes = jax.eval_shape(micro, *jax.tree.map(lambda x: x[:size // accum], (batch, keys)))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[:2])
        (losses, grads), metrics = jax.lax.scan(body, zeros, jax.tree.map(split, (batch, keys)))
        losses, grads = jax.tree.map(lambda x: x / accum, (losses, grads))
        return losses, grads, jax.tree.map(lambda m: m.swapaxes(0, 1).reshape(-1), metrics)  # batch order

    def step_fn(self, state: TrainState, base_params: dict, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer update on a global batch of ``cfg.batch.global_batch`` examples (of the LoRA, or with
        the adversary of the LoRA or of the heads by step parity)."""
        batch, size = select_batch(batch), int(self.cfg.batch.global_batch)
        sizes = {k: v.shape[0] for k, v in batch.items()}
        if set(sizes.values()) != {size}:
            raise ValueError(f"batch leading sizes {sizes} differ from config batch.global_batch={size}")
        rng, step_key = jax.random.split(state.rng)
        keys = jax.lax.with_sharding_constraint(jax.random.split(step_key, size),
                                                sharding.batch_sharding(self.mesh))
        if self.adversary is None:
            new_state, metrics = self._generator_update(state, base_params, batch, keys, None)
        else:
            new_state, metrics = jax.lax.cond(
                state.step % 2 == 0, self._discriminator_update, functools.partial(self._generator_update, phase="g"),
                state, base_params, batch, keys)
        return new_state.replace(step=state.step + 1, rng=rng), metrics

    def _generator_update(self, state: TrainState, base_params, batch, keys, phase):
        """The LoRA update (and EMA), from the consistency loss (+ λ·G loss in phase 'g')."""
        losses, grads, metrics = self._losses_and_grads(state, base_params, batch, keys, phase)
        lora, opt_state, finite, norms = _guarded_update(self.tx, grads, state.opt_state, state.lora, losses)
        ema = state.ema_lora
        if ema is not None:
            mu = float(self.cfg.ema_decay)
            ema = jax.tree.map(lambda e, p: jnp.where(finite, mu * e + (1.0 - mu) * p, e), ema, lora)
        g_updates = state.step // 2 if phase else state.step  # the G optimizer counts only its own updates
        metrics.update(losses, **norms, lr=self.lr_schedule(g_updates), param_norm=optax.global_norm(lora),
                       nonfinite=(~finite).astype(jnp.int32))
        if phase:
            metrics.update(d_step=jnp.zeros((), jnp.int32), d_grad_norm=jnp.zeros(()), d_update_norm=jnp.zeros(()))
        return state.replace(lora=lora, ema_lora=ema, opt_state=opt_state), metrics

    def _discriminator_update(self, state: TrainState, base_params, batch, keys):
        """The heads' update from the D loss; LoRA, EMA and their optimizer untouched."""
        losses, grads, metrics = self._losses_and_grads(state, base_params, batch, keys, "d")
        heads, heads_opt, finite, norms = _guarded_update(self.adversary.tx, grads, state.heads_opt_state,
                                                          state.heads, {"d_loss": losses["d_loss"]})
        metrics.update(losses, lr=self.lr_schedule(state.step // 2), param_norm=optax.global_norm(state.lora),
                       nonfinite=(~finite).astype(jnp.int32), grad_norm=jnp.zeros(()), update_norm=jnp.zeros(()),
                       d_step=jnp.ones((), jnp.int32), d_grad_norm=norms["grad_norm"],
                       d_update_norm=norms["update_norm"])
        return state.replace(heads=heads, heads_opt_state=heads_opt), metrics


def _guarded_update(tx, grads, opt_state, params, losses: dict):
    """(params, opt_state, finite, {'grad_norm', 'update_norm'}) after one ``tx`` update, or the inputs as they
    were when a loss or the gradient is NaN/Inf: such an update is not applied (the step counter and PRNG move
    on, so the next step draws fresh noise); the loop counts these steps."""
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm)
    for loss in jax.tree.leaves(losses):
        finite = finite & jnp.isfinite(loss)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_params, new_opt = jax.tree.map(keep, (new_params, new_opt), (params, opt_state))
    return new_params, new_opt, finite, {"grad_norm": grad_norm,
                                         "update_norm": jnp.where(finite, optax.global_norm(updates), 0.0)}


def build_train_step(cfg, frozen: FrozenPipeline, schedule: NoiseSchedule, mesh: Mesh) -> TrainStep:
    """Validate ``cfg`` (a whole trainer config; ``config.validate`` without the data and pipeline-folder checks,
    which belong to whoever feeds and loaded the step) and build the jitted step on ``mesh`` (the one ``frozen``
    was loaded onto).

    cfg fields used: solver.num_steps, target.{kind, k_min, k_max, bound, eta, pcm_phases},
    guidance.{w_min, w_max, rho, mode}, loss.{kind, huber_c}, optim.{lr, b1, b2, eps, weight_decay,
    grad_clip, schedule, warmup_steps}, num_train_steps, ema_decay, batch.{global_batch, grad_accum},
    adv.{enabled, g_weight, lr, b1, b2, eps, weight_decay, grad_clip, window}, model.*, lora.*,
    mesh.{min_shard_size, lora_sharding}.
    """
    validate(cfg, num_devices=mesh.size, check_pipeline=False, check_data=False)
    if cfg.guidance.mode == "official" and "empty_prompt" not in frozen.params:
        raise ValueError("config guidance.mode='official' needs the encoded empty caption: load the frozen "
                         "pipeline with the same config")
    adversary = Adversary.build(cfg, frozen, schedule) if cfg.adv.enabled else None
    # With the adversary the LoRA is updated on every other step only, and its schedule counts those updates.
    g_steps = int(cfg.num_train_steps) // 2 if adversary else int(cfg.num_train_steps)
    tx, lr = make_optimizer(cfg.optim, max(g_steps, 1))
    return TrainStep(cfg=cfg, frozen=frozen, mesh=mesh, schedule=schedule,
                     rule=TargetRule.from_config(cfg, schedule.num_train_timesteps), tx=tx, lr_schedule=lr,
                     adversary=adversary)


# The TPU compiler's own custom calls that its cost model prices at -1 s each (found on small programs, 2026-12-06:
# a softmax of a bf16 input holds one ConcatBitcast and costs -1 + its work; the tiny step's two ZeroCrops, -2 + its
# work). Their other custom calls (async collectives, gather-index hints) are priced.
UNPRICED_CUSTOM_CALLS = ("ConcatBitcast", "ZeroCrop")


def compiled_analysis(compiled) -> dict:
    """{'memory': per-device bytes (argument, output, alias, temp, generated_code, total), 'flops': XLA's FLOPs,
    'optimal_seconds': the backend's cost-model time (the TPU compiler's; None where the backend has none),
    'while_loops': how many while loops the optimised program holds, 'unpriced_ops': how many ops the TPU cost
    model cannot price, 'mosaic_kernels': how many Pallas TPU kernel calls it holds} of a compiled program. XLA's
    FLOPs and optimal_seconds both count a while loop's body once, and optimal_seconds holds -1 s for each
    unpriced op (``UNPRICED_CUSTOM_CALLS``; ``tests/test_compile_check.py`` shows the count and the offset agree)."""
    mem = compiled.memory_analysis()
    memory = {name: int(getattr(mem, f"{name}_size_in_bytes", 0) or 0)
              for name in ("argument", "output", "alias", "temp", "generated_code")}
    memory["total"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    flops, seconds = cost.get("flops"), cost.get("optimal_seconds")
    text = compiled.as_text()
    return {"memory": memory, "flops": None if flops is None else float(flops),
            "optimal_seconds": None if seconds is None else float(seconds),
            "while_loops": text.count(" while("),
            "unpriced_ops": sum(text.count(f'custom_call_target="{name}"') for name in UNPRICED_CUSTOM_CALLS),
            "mosaic_kernels": text.count('custom_call_target="tpu_custom_call"')}


def compile_train_step(step: TrainStep, batch_shapes: dict,
                       on_lowered: Callable[[], None] | None = None) -> CompiledStep:
    """Lower and compile ``step.train_step`` ahead of time for global batches shaped like ``batch_shapes``
    (arrays or ShapeDtypeStructs), and read XLA's memory and cost analyses for logging. ``on_lowered`` is
    called between lowering and compiling (the compile check reads the host memory there)."""
    mesh = step.mesh
    batch_shapes = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=sharding.batch_sharding(mesh))
                    for k, v in select_batch(batch_shapes).items()}
    lowered = step.train_step.lower(step.abstract_state(), step.frozen.params, batch_shapes)
    if on_lowered is not None:
        on_lowered()
    compiled = lowered.compile(compiler_options=sharding.compiler_options(step.cfg.mesh, mesh))
    return CompiledStep(fn=compiled, **compiled_analysis(compiled))
