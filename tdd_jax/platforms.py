"""Which JAX platforms start: not the TPU plugin on a host without a TPU, set when tdd_jax is imported.

The CPU install brings libtpu for the TPU compile check (``tdd_jax.compile_check``, which loads it itself through
``jax.experimental.topologies``). With ``JAX_PLATFORMS`` unset JAX starts every installed plugin, and libtpu on a
host without a TPU prints error lines on every command (``unexpected worker hostname``, ``Unable to initialize
backend 'tpu'``), and with two commands at once the advice to ``sudo rm /tmp/libtpu_lockfile``, which is wrong
there. So where ``JAX_PLATFORMS`` is unset and nothing says this host has a TPU, it is set to the platforms the
host can start: CUDA / ROCm where their plugin is installed and a device is visible, then CPU.

A TPU is assumed (and nothing changed) where the host has TPU device files (``/dev/accel*``, ``/dev/vfio/N``), a
Google PCI device (JAX's own test), TPU environment variables, or a JAX plugin this module does not know.
"""

from __future__ import annotations

import glob
import os
import pkgutil
import sys
from importlib.metadata import entry_points

TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
TPU_ENV = ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "JAX_FORCE_TPU_INIT")
GOOGLE_PCI_VENDOR = "0x1ae0"  # jax._src.hardware_utils: how JAX counts TPU chips
# Plugin name fragment -> (platform, device files of which one must exist for it to start).
GPU_PLUGINS = {"cuda": ("cuda", ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")),
               "rocm": ("rocm", ("/dev/kfd", "/dev/dxg"))}


def host_has_tpu() -> bool:
    if any(os.environ.get(name) for name in TPU_ENV) or any(glob.glob(p) for p in TPU_DEVICE_FILES):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def installed_plugins() -> set[str]:
    """Names of the JAX PJRT plugins installed (the ``jax_plugins`` namespace and entry points), not imported."""
    names = {ep.value for ep in entry_points(group="jax_plugins")}
    try:
        import jax_plugins
    except ImportError:
        return names
    return names | {name for _, name, _ in pkgutil.iter_modules(jax_plugins.__path__)}


def startable_platforms(plugins: set[str]) -> str | None:
    """``JAX_PLATFORMS`` for a host without a TPU holding ``plugins``; None where a plugin is not known here."""
    platforms = []
    for plugin in plugins:
        known = [(platform, devices) for fragment, (platform, devices) in GPU_PLUGINS.items() if fragment in plugin]
        if not known:
            return None
        platform, devices = known[0]
        if any(os.path.exists(d) for d in devices) and platform not in platforms:
            platforms.append(platform)
    return ",".join(sorted(platforms) + ["cpu"])


def skip_absent_tpu() -> None:
    if os.environ.get("JAX_PLATFORMS") is not None or host_has_tpu():
        return
    platforms = startable_platforms(installed_plugins())
    if platforms is None:
        return
    if "jax" in sys.modules:  # imported before tdd_jax: JAX read the environment already
        import jax

        if jax.config.jax_platforms is None:
            jax.config.update("jax_platforms", platforms)
    else:
        os.environ["JAX_PLATFORMS"] = platforms
