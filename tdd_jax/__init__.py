"""Target-Driven Distillation of SDXL in JAX."""

from tdd_jax.platforms import skip_absent_tpu
from tdd_jax.xla_cpu import apply_cpu_defaults

skip_absent_tpu()  # before jax starts a backend: it reads JAX_PLATFORMS once
apply_cpu_defaults()  # likewise for XLA_FLAGS
