"""Checkpoints: exact round trip of the train state and data position, LoRA export reads, and refusals."""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from tdd_jax.models.layers import LoRAParam
from tdd_jax.training.checkpointing import (CheckpointError, Checkpointer, NonFiniteError, check_compatible,
                                            lora_metadata, restore_lora)
from tdd_jax.training.state import TrainState


class _Adapter(nnx.Module):
    def __init__(self, key):
        a, b = jax.random.split(key)
        self.to_q = nnx.Dict(lora_A=LoRAParam(jax.random.normal(a, (4, 8))),
                             lora_B=LoRAParam(jax.random.normal(b, (8, 4))))
        self.blocks = nnx.List([nnx.Dict(lora_A=LoRAParam(jnp.ones((2, 3))))])


def make_state(seed: int, ema: bool) -> TrainState:
    lora = nnx.state(_Adapter(jax.random.key(seed)))
    tx = optax.adamw(1e-3)
    opt_state = tx.init(lora)
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, lora), opt_state, lora)  # non-trivial moments
    return TrainState(step=jnp.asarray(seed, jnp.int32), lora=lora,
                      ema_lora=jax.tree.map(lambda x: 2 * x, lora) if ema else None,
                      opt_state=opt_state, rng=jax.random.PRNGKey(seed))


META = {"method": "tdd", "rank": 4, "alpha": 8.0, "targets": ["to_q"], "k_min": 4, "k_max": 8, "eta": 0.3,
        "rho": 0.2, "w_min": 3.5, "w_max": 3.5, "step": 3}


def assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_last(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", every=3, keep=2)
    assert ckpt.latest_step() is None
    states = {s: make_state(s, ema=True) for s in (3, 5, 6, 9)}
    for s, state in states.items():
        saved = ckpt.save(s, state, {"consumed": 4 * s}, {**META, "step": s})
        assert saved == (s % 3 == 0)
    ckpt.save(10, make_state(10, ema=True), {"consumed": 40}, {**META, "step": 10}, force=True)
    ckpt.close()

    ckpt = Checkpointer(tmp_path / "checkpoints", every=3, keep=2)
    assert ckpt.latest_step() == 10
    state, data_state, meta = ckpt.restore(make_state(0, ema=True), step=9)
    assert_trees_equal(state, states[9])
    assert data_state == {"consumed": 36} and meta["step"] == 9
    with pytest.raises(CheckpointError):  # kept only the last 2 (9 and 10)
        ckpt.restore(make_state(0, ema=True), step=6)
    ckpt.close()


def test_restore_lora_for_export(tmp_path):
    state = make_state(3, ema=True)
    ckpt = Checkpointer(tmp_path / "checkpoints", every=3, keep=2)
    ckpt.save(3, state, {}, META)
    ckpt.close()
    for where in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "3"):
        lora, meta = restore_lora(where)
        assert meta["step"] == 3 and meta["method"] == "tdd" and meta["ema"] is False
        assert set(lora) == {"to_q", "blocks"} and isinstance(lora["to_q"]["lora_A"], np.ndarray)
        np.testing.assert_array_equal(lora["to_q"]["lora_B"], np.asarray(state.lora["to_q"]["lora_B"][...]))
        np.testing.assert_array_equal(lora["blocks"]["0"]["lora_A"], np.ones((2, 3)))
    ema, meta = restore_lora(tmp_path, ema=True)
    assert meta["ema"] is True
    np.testing.assert_array_equal(ema["to_q"]["lora_A"], 2 * lora["to_q"]["lora_A"])


def test_restore_lora_without_ema_is_an_error(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=1)
    ckpt.save(1, make_state(1, ema=False), {}, META)
    ckpt.close()
    assert restore_lora(tmp_path)[1]["ema"] is False
    with pytest.raises(CheckpointError, match="ema_lora"):
        restore_lora(tmp_path, ema=True)


def test_corrupted_checkpoint_is_an_error(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
    ckpt.save(1, make_state(1, ema=False), {}, META)
    ckpt.close()
    for f in (tmp_path / "checkpoints" / "1" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"not a checkpoint")
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
    assert ckpt.latest_step() == 1
    with pytest.raises(CheckpointError, match="step 1 .* cannot be restored"):
        ckpt.restore(make_state(0, ema=False))
    ckpt.close()
    with pytest.raises(CheckpointError, match="cannot be read"):
        restore_lora(tmp_path)


def test_folder_without_complete_checkpoint_is_an_error(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
    ckpt.save(1, make_state(1, ema=False), {}, META)
    ckpt.close()
    shutil.move(tmp_path / "checkpoints" / "1", tmp_path / "checkpoints" / "stray")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Checkpointer(tmp_path / "checkpoints", every=1, keep=3).latest_step()


def test_non_finite_state_is_never_saved(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
    good = make_state(1, ema=True)
    ckpt.save(1, good, {"consumed": 1}, META)
    ckpt.wait()
    bad = make_state(2, ema=True)
    bad = bad.replace(ema_lora=jax.tree.map(lambda x: x.at[0].set(jnp.nan), bad.ema_lora))
    with pytest.raises(NonFiniteError, match=r"step 2 .*ema_lora.*previous checkpoint is kept"):
        ckpt.save(2, bad, {"consumed": 2}, META)
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
    assert ckpt.latest_step() == 1
    assert_trees_equal(ckpt.restore(make_state(0, ema=True))[0], good)
    ckpt.close()


def test_data_state_of_another_process_count_is_read(tmp_path):
    """A checkpoint written by 2 processes resumes on 1: each file holds the same global position."""
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
    ckpt.save(1, make_state(1, ema=False), {"global_batches": 1, "process": 0}, META)
    ckpt.close()
    folder = tmp_path / "checkpoints" / "1" / "data"
    (folder / "process_0-of-1.json").rename(folder / "process_0-of-2.json")
    (folder / "process_1-of-2.json").write_text(json.dumps({"global_batches": 1, "process": 1}))
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
    assert ckpt.restore(make_state(0, ema=False))[1] == {"global_batches": 1, "process": 0}
    ckpt.close()


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Out of disk during an async save (a writer that fails with ENOSPC): the step is never committed and the
    previous one stays the latest, restorable as it was."""
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
    good = make_state(1, ema=False)
    ckpt.save(1, good, {"consumed": 1}, META)
    ckpt.wait()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save(2, make_state(2, ema=False), {"consumed": 2}, META)
        ckpt.wait()
    monkeypatch.undo()
    with contextlib.suppress(OSError):
        ckpt.close()
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
    assert ckpt.latest_step() == 1
    state, data_state, _ = ckpt.restore(make_state(0, ema=False))
    assert_trees_equal(state, good) and data_state == {"consumed": 1}
    ckpt.close()


_SAVER = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from tdd_jax.training.checkpointing import Checkpointer
from tdd_jax.training.state import TrainState

def state(value):  # ~50 MB, so that writing it takes a while
    lora = {"a": jnp.full((3000, 2048), value, jnp.float32), "b": jnp.full((3000, 2048), -value, jnp.float32)}
    return TrainState(step=jnp.asarray(value, jnp.int32), lora=lora, ema_lora=None, opt_state={}, rng=jax.random.PRNGKey(0))

ckpt = Checkpointer(sys.argv[1], every=1, keep=3)
latest = ckpt.latest_step() or 0
ckpt.save(latest + 1, state(latest + 1), {"step": latest + 1}, {"step": latest + 1})
print("SAVING", flush=True)
ckpt.wait()
print("SAVED", flush=True)
time.sleep(60)
"""


def _saver(directory):
    return subprocess.Popen([sys.executable, "-c", _SAVER, str(directory)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint(tmp_path):
    """Real kills at random points of a save: the previous step stays restorable and the next start resumes
    from whatever step was last committed, then saves on top of it."""
    directory = tmp_path / "checkpoints"
    proc = _saver(directory)  # step 1, completed; time it to choose the kill points
    assert proc.stdout.readline().strip() == "SAVING"
    t0 = time.time()
    assert proc.stdout.readline().strip() == "SAVED"
    duration = time.time() - t0
    proc.kill()
    proc.wait()
    rng = np.random.default_rng(0)
    committed, interrupted = 1, 0
    for delay in rng.uniform(0.0, 0.8 * duration, 3):
        proc = _saver(directory)
        assert proc.stdout.readline().strip() == "SAVING"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = Checkpointer(directory, every=1, keep=3)
        latest = ckpt.latest_step()
        assert latest in (committed, committed + 1), (latest, committed, delay)
        target = TrainState(step=jnp.int32(0), lora={"a": jnp.zeros((3000, 2048)), "b": jnp.zeros((3000, 2048))},
                            ema_lora=None, opt_state={}, rng=jax.random.PRNGKey(0))
        state, data_state, meta = ckpt.restore(target)
        assert int(state.step) == latest and data_state == {"step": latest} and meta == {"step": latest}
        np.testing.assert_array_equal(np.asarray(state.lora["a"]), latest)
        ckpt.close()
        interrupted += latest == committed
        committed = latest
    assert interrupted, "no kill landed inside a save"
    proc = _saver(directory)  # and a clean save on top of the debris
    assert proc.stdout.readline().strip() == "SAVING" and proc.stdout.readline().strip() == "SAVED"
    proc.kill()
    proc.wait()
    assert Checkpointer(directory, every=1, keep=3).latest_step() == committed + 1


def test_resume_on_another_mesh(tmp_path):
    """Written on data=2 x fsdp=4 (8 simulated devices), restored onto 1x8, 8x1 and one device: the same values
    in the target layout, and one more AdamW step on it matches that step on the saved values."""
    script = Path(__file__).with_name("_mesh_resume.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "checkpoints")], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert set(report) == {"1x8", "8x1", "one_device"}
    for name, r in report.items():
        assert r["equal"] and r["shardings"] and r["data"] == {"global_batches": 7} and r["step"] == 8, (name, r)
        assert r["continued_max_err"] < 1e-6, (name, r)
    assert report["1x8"]["split"] > 0 and report["8x1"]["split"] == report["one_device"]["split"] == 0


def test_checkpoint_of_another_lora_config_is_refused_before_restoring(tmp_path):
    from _step_setup import step_config

    cfg = step_config()
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
    ckpt.save(1, make_state(1, ema=False), {}, lora_metadata(cfg, 1))
    ckpt.close()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
    check_compatible(ckpt.meta(1), cfg, "step 1")  # the same config resumes
    for field, value in (("rank", 8), ("targets", ("to_q",))):
        other = step_config(**{f"lora.{field}": value})
        with pytest.raises(CheckpointError, match=rf"lora\.{field}=.*but the config has lora\.{field}="):
            check_compatible(ckpt.meta(1), other, "step 1")
    ckpt.close()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
