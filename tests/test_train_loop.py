"""The trainer end to end through its command line, on the tiny random pipeline and 8 simulated CPU devices.

One uninterrupted reference run (with validation grids) is compared with: a run stopped by SIGTERM and then
resumed from its checkpoint (the losses after the resume must be bit-identical: state, PRNG and data position
all come back). On a folder of 16 different images, a one-process run and the same run on two jax.distributed
processes of 4 devices each log the same losses. The mesh is 2 (data) x 4 (fsdp) with a tiny min_shard_size, so
the base weights and the LoRA really are FSDP-split, across processes in the two-process run.
Every subprocess shares a persistent compilation cache, so the programs are compiled once per topology.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _trainer_runs import red_cat_folder
from PIL import Image

from tdd_jax.training.report import read_scalars

REPO = Path(__file__).resolve().parent.parent
STEPS = 8


@pytest.fixture(scope="module")
def setup(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_loop")
    data = red_cat_folder(root / "data", 16)
    overrides = [
        f"--config.pipeline_dir={tiny_pipeline_dir}", "--config.resolution=16", "--config.data.source=folder",
        f"--config.data.path={data}", "--config.data.num_threads=1", "--config.batch.global_batch=8",
        "--config.lora.rank=4", "--config.optim.lr=1e-3", "--config.log_every=1", "--config.checkpoint.every=4",
        f"--config.num_train_steps={STEPS}", "--config.mesh.data=2", "--config.mesh.fsdp=4",
        "--config.mesh.min_shard_size=64", "--config.validation.every=1000",
        "--config.validation.prompts=('a red cat', 'a blue dog')", "--config.validation.steps=(4,)",
    ]
    return {"root": root, "overrides": overrides, "cache": root / "jax_cache"}


def command(setup, workdir, *extra, process=None):
    cmd = [sys.executable, "-m", "tdd_jax.train", "--config=configs/tdd_tiny.py", f"--workdir={workdir}",
           *setup["overrides"], *extra]
    if process is not None:
        cmd += [f"--coordinator=localhost:{process[0]}", "--num_processes=2", f"--process_id={process[1]}"]
    return cmd


def environment(setup, devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
                XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
                JAX_COMPILATION_CACHE_DIR=str(setup["cache"]), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run(setup, workdir, *extra, timeout=900) -> str:
    """The run's console output followed by its log file."""
    proc = subprocess.run(command(setup, workdir, *extra), cwd=REPO, env=environment(setup, 8),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc.stdout + proc.stderr + (Path(workdir) / "train.log").read_text()


def losses(workdir) -> dict[int, float]:
    """Per-step losses from the TensorBoard event files (float32, exactly as computed)."""
    return read_scalars(workdir)["loss"]


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run, with validation grids at steps 0, 4 and 8."""
    workdir = setup["root"] / "reference"
    log = run(setup, workdir, "--config.validation.every=4")
    return workdir, log


def test_run_logs_decreasing_loss_checkpoints_and_grids(reference):
    workdir, log = reference
    loss = losses(workdir)
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert np.mean([loss[s] for s in (7, 8)]) < np.mean([loss[s] for s in (1, 2)]), loss
    assert "Compiled train step, per device" in log and "FLOPs per step" in log and "steps/s" in log
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 8]
    assert sorted(p.name for p in (workdir / "validation").iterdir()) == [
        "step_00000000.png", "step_00000004.png", "step_00000008.png"]
    first, last = (np.asarray(Image.open(workdir / "validation" / f"step_0000000{s}.png")) for s in (0, 8))
    # Title line, then per prompt a label line, 16 px images enlarged 8x to 128 px and padding; columns: teacher
    # 25 steps, base 4 steps, student 4 steps (configs/tdd_tiny.py with validation.steps=(4,)).
    assert last.shape == (16 + 2 * (16 + 128 + 8), 3 * 128 + 8, 3)
    assert "Validation grid" in log and "teacher 25 | base 4 | TDD 4" in log

    def cell(grid, row, column):
        y = 16 + row * (16 + 128 + 8) + 16
        return grid[y:y + 128, column * 128:(column + 1) * 128]

    for row in range(2):
        assert (cell(first, row, 0) == cell(last, row, 0)).all() and (cell(first, row, 1) == cell(last, row, 1)).all()
        assert (cell(first, row, 2) != cell(last, row, 2)).any()  # only the student changes with training
    comparison = np.asarray(Image.open(workdir / "comparison.png"))
    assert (comparison == last).all() and "Side by side after the last step" in log


def test_sigterm_saves_and_resume_is_bit_identical(setup, reference):
    workdir = setup["root"] / "preempted"
    log_path = setup["root"] / "preempted.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(setup, workdir), cwd=REPO, env=environment(setup, 8), stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 900
        train_log = workdir / "train.log"
        while not train_log.exists() or "step 2:" not in train_log.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-5000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, log_path.read_text()[-5000:]
    text = log_path.read_text()
    assert "SIGTERM" in text and "checkpoint saved" in text  # warnings: on the console
    assert "stopped on request at step" in text  # the closing summary
    stopped = max(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert 2 <= stopped < STEPS, stopped
    assert f"Stopped at step {stopped}" in text

    resumed_log = run(setup, workdir)
    assert f"Resumed from step {stopped}" in resumed_log
    expected, got = losses(reference[0]), losses(workdir)
    after = range(stopped + 1, STEPS + 1)
    assert [got[s] for s in after] == [expected[s] for s in after]  # bit for bit
    assert [got[s] for s in range(1, stopped + 1)] == [expected[s] for s in range(1, stopped + 1)]


def distinct_images(root: Path) -> Path:
    """16 different images and captions (coloured squares at different places), so that a run whose processes
    saw other global batches than a one-process run would log other losses."""
    data = root / "distinct"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
    for i in range(16):
        name = list(colours)[i % 4]
        image = np.full((16, 16, 3), rng.integers(150, 256, 3), np.uint8)
        y, x = rng.integers(0, 9, 2)
        image[y:y + 7, x:x + 7] = colours[name]
        Image.fromarray(image).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(f"a {name} square, {'small' if i < 8 else 'large'}")
    return data


@pytest.mark.multiprocess
def test_two_processes_match_one_on_different_images(setup, reference):
    """1 process x 8 devices and 2 processes x 4 devices see the same global batches of real, different images
    (the global order is a function of seed and step only; each process takes its slice of each batch)."""
    data = f"--config.data.path={distinct_images(setup['root'])}"
    one = setup["root"] / "distinct_one_process"
    run(setup, one, data)
    workdir = setup["root"] / "two_processes"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(command(setup, workdir, data, process=(port, i)), cwd=REPO,
                              env=environment(setup, 4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    assert "over 8 devices in 2 processes" in (workdir / "train.log").read_text()
    assert (workdir / "train.1.log").is_file()
    expected, got = losses(one), losses(workdir)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-5)
    identical = losses(reference[0])  # the one-image data: the images really change the losses
    assert not np.allclose([identical[s] for s in sorted(got)], [got[s] for s in sorted(got)], rtol=1e-3)
    assert sorted(p.name for p in (workdir / "checkpoints" / str(STEPS) / "data").glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


def test_config_error_names_field_before_loading(setup):
    proc = subprocess.run(command(setup, setup["root"] / "bad", "--config.target.k_min=9"), cwd=REPO,
                          env=environment(setup, 8), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "target.k_min" in proc.stderr and "Compiled" not in proc.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.lora.rank=four", "flag --config.lora.rank=four: invalid literal for int()"),
    ("--config.optim.lr=fast", "flag --config.optim.lr=fast: could not convert string to float"),
    ("--config.validation.steps=four", "'four') must be positive step counts"),
])
def test_wrong_type_config_field_is_named_and_nothing_written(setup, override, message):
    workdir = setup["root"] / "wrong_type"
    proc = subprocess.run(command(setup, workdir, override), cwd=REPO, env=environment(setup, 8),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
    assert not workdir.exists()


def test_non_finite_guard_stops_after_the_configured_run():
    from tdd_jax.training.loop import NonFiniteGuard

    def metrics(bad: bool) -> dict:
        return {"nonfinite": np.int32(bad), "loss": np.float32(np.nan if bad else 1.0), "grad_norm": np.float32(1)}

    guard = NonFiniteGuard(3)
    for step, bad in enumerate([True, True, False, True, True], start=1):  # never 3 in a row
        guard(step, metrics(bad))
    assert guard.total == 4
    with pytest.raises(FloatingPointError, match=r"steps 4\.\.6: 3 steps in a row .*max_nonfinite_steps=3"):
        guard(6, metrics(True))
