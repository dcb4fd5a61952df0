"""XLA:CPU settings that this project measured to be faster for its models, set when tdd_jax is imported.

jaxlib 0.10's CPU backend hands each convolution to YNNPACK by default. Inside the tiny SDXL's train step
(batch 16, 2 cores) YNNPACK's convolutions ran 5-10x slower than the same shapes alone (the benchmark's
top-ops table), and at the UNet's and VAE's shapes Eigen's, which the setting below restores, were faster
alone too. Sampling against diffusers went from 0.80-1.07x to 1.05-1.33x in back-to-back runs of
``python -m launch.benchmark`` with and without ``TDD_JAX_XLA_CPU_DEFAULTS=0`` (README, Performance).

The flag exists only in the jaxlib versions of ``VERSIONS`` (XLA aborts on a flag it does not know), so other
versions are left alone, as is an ``XLA_FLAGS`` that already sets it, or ``TDD_JAX_XLA_CPU_DEFAULTS=0``. It
takes effect only if set before jax starts its backends, and touches only the CPU backend.
"""

from __future__ import annotations

import os

FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
VERSIONS = ((0, 10), (0, 11))  # [first, last) jaxlib (major, minor) measured to have the flags


def cpu_flags(xla_flags: str, jaxlib_version: str) -> str:
    """``xla_flags`` with this project's CPU settings added where the version has them and none is set."""
    major_minor = tuple(int(p) for p in jaxlib_version.split(".")[:2])
    if not VERSIONS[0] <= major_minor < VERSIONS[1]:
        return xla_flags
    added = [f for f in FLAGS if f.split("=")[0] not in xla_flags]
    return " ".join([xla_flags, *added]).strip()


def apply_cpu_defaults() -> None:
    if os.environ.get("TDD_JAX_XLA_CPU_DEFAULTS", "1") == "0":
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        jaxlib_version = version("jaxlib")
    except PackageNotFoundError:
        return
    os.environ["XLA_FLAGS"] = cpu_flags(os.environ.get("XLA_FLAGS", ""), jaxlib_version)
