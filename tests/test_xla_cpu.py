"""tdd_jax/xla_cpu.py: the XLA:CPU settings set at import, only where the jaxlib version has them."""

import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from tdd_jax import xla_cpu

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_flags_added_only_where_known_and_unset():
    assert xla_cpu.cpu_flags("", "0.10.2") == f"{FLAG}=-individual_convolution"
    assert xla_cpu.cpu_flags("--xla_force_host_platform_device_count=8", "0.10.0").split() == [
        "--xla_force_host_platform_device_count=8", f"{FLAG}=-individual_convolution"]
    assert xla_cpu.cpu_flags(f"{FLAG}=dot", "0.10.2") == f"{FLAG}=dot"  # the user's own setting stays
    assert xla_cpu.cpu_flags("", "0.9.1") == "" and xla_cpu.cpu_flags("", "0.11.0") == ""


CHECK = """
import tdd_jax, jax
x = jax.numpy.ones((16, 16, 16, 32)); w = jax.numpy.ones((3, 3, 32, 32))  # a UNet-sized one
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")))
print("ynn" if "__ynn_fusion" in conv.lower(x, w).compile().as_text() else "plain")
"""


@pytest.mark.skipif(xla_cpu.cpu_flags("", version("jaxlib")) == "", reason="no CPU settings for this jaxlib")
def test_importing_tdd_jax_hands_convolutions_to_eigen():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    run = lambda **extra: subprocess.run([sys.executable, "-c", CHECK], env={**env, **extra},  # noqa: E731
                                         capture_output=True, text=True, check=True).stdout.split()[-1]
    assert run() == "plain"
    assert run(TDD_JAX_XLA_CPU_DEFAULTS="0") == "ynn"  # jaxlib's own default, which the setting changes
