"""Target-Driven Distillation of SDXL in JAX."""

from tdd_jax.xla_cpu import apply_cpu_defaults

apply_cpu_defaults()  # before jax starts a backend: XLA reads its flags once
