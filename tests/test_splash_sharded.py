"""``model.attention_impl='splash'`` under a sharded batch on 4 CPU devices equals the default attention: the
attention and its gradients, one TDD train step (loss, gradient norm, LoRA update) and the sampler's images.

The kernel runs in Pallas interpret mode here, through the ``shard_map`` a TPU mesh needs (the Mosaic kernel
cannot be partitioned by XLA; ``tests/test_compile_check.py`` compiles it for v5e-4). The devices are simulated
in a subprocess (tests/_splash_multidevice.py). Tolerances are fp32 rounding: the kernel's online softmax sums
in another order than XLA's softmax (measured below each bound: attention gradients 7e-7, train step loss 1e-7,
gradient norm 4e-7, LoRA update 2e-6, images 4e-7).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _step_setup import save_step_pipeline

SCRIPT = Path(__file__).with_name("_splash_multidevice.py")
BATCH_AXES = "P(('data', 'fsdp'),)"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pipeline_dir = save_step_pipeline(tmp_path_factory.mktemp("step_pipeline"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(pipeline_dir)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))[len("REPORT "):])


def _relative(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("batch,spec", [("4", BATCH_AXES), ("2", "P()")], ids=["split", "indivisible"])
def test_attention_and_gradients_match(report, batch, spec):
    """A batch the 4 devices divide is split over both mesh axes; 2 examples run whole on every device."""
    splash, default = report["attention"][batch]["splash"], report["attention"][batch]["default"]
    assert default["specs"] == []
    assert splash["specs"][0] == f"({spec}, {spec}, {spec})"  # the forward kernel's q, k, v
    assert splash["loss"] == pytest.approx(default["loss"], rel=1e-5)
    for got, want in zip(splash["grads"], default["grads"]):
        assert _relative(got, want) < 1e-5


def test_every_kernel_ran_per_device(report):
    """Every trace of the kernel, in the attention calls, the sampler (text encoders, UNet, VAE decoder) and the
    train step, ran inside a shard_map over both mesh axes, none as the plain (mesh-less) vmapped kernel."""
    for part, traces in report["kernel_traces"].items():
        assert traces and all(axes == ["data", "fsdp"] for axes in traces), (part, traces)


def test_train_step_matches_default(report):
    splash, default = report["train_step"]["splash"], report["train_step"]["default"]
    assert splash["tau"] == default["tau"] and splash["lora_split"] == default["lora_split"] > 0
    assert splash["loss"] == pytest.approx(default["loss"], rel=1e-5)
    assert splash["grad_norm"] == pytest.approx(default["grad_norm"], rel=1e-5)
    d_splash, d_default = (np.concatenate([np.ravel(d) for d in r["delta"]]) for r in (splash, default))
    assert np.linalg.norm(d_splash - d_default) / np.linalg.norm(d_default) < 2e-5


def test_sampler_images_match(report):
    images = {name: np.asarray(v) for name, v in report["sampler"].items()}
    assert images["default"].shape == (4, 16, 16, 3) and images["default"].std() > 0.05
    assert np.max(np.abs(images["splash"] - images["default"])) < 1e-5  # floats in [0, 1]
