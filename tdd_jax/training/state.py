"""The trainer's whole mutable state as one pytree, so it can be donated, sharded and checkpointed as a unit.

The frozen base weights are deliberately *not* part of it: they never change, are loaded from the pipeline
folder on every start, and are passed to the step as a separate argument.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """step: int32 scalar (optimizer updates done); lora: the trained adapter (an nnx.State of LoRAParams);
    ema_lora: its exponential moving average, the target network θ⁻ (None when ``ema_decay`` is 0: the
    target is then the online adapter under stop-gradient, as in the official code); opt_state: optax state;
    rng: raw uint32 PRNG key, split once per step; heads / heads_opt_state: the adversarial variant's trainable
    discriminator heads and their optimizer state (None without ``cfg.adv.enabled``: the discriminator's
    encoder is the frozen base UNet, never part of the state)."""

    step: jax.Array
    lora: nnx.State
    ema_lora: nnx.State | None
    opt_state: Any
    rng: jax.Array
    heads: nnx.State | None = None
    heads_opt_state: Any = None

    @property
    def target_lora(self) -> nnx.State:
        """The adapter of the target network f_θ⁻ (and the one to sample or export with)."""
        return self.lora if self.ema_lora is None else self.ema_lora
