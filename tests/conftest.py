"""Shared test settings and fixtures: JAX on CPU in fp32 with exact matmuls, and the tiny SDXL pipeline."""

import logging
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from tiny_pipeline import save_tiny_sdxl_pipeline  # noqa: E402

# Parity tests compare fp32 against PyTorch fp32; never let an accelerator drop matmuls to TF32/bf16 passes.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def restore_logging():
    """A command's main run in this process routes the logs (``tdd_jax.console.route_logs``): undone after each
    test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A random tiny SDXL pipeline saved in diffusers format (one per test process)."""
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl"))
