"""tdd_jax.sample with several processes writing one folder: each renders its share (index mod num_shards), the
shared metadata.jsonl never holds a line twice, a killed process's rerun renders exactly what is missing, and the
images equal a one-process run's.

The real thing (slow): two `python -m tdd_jax.sample` processes on the shipped tiny SDXL, one SIGKILLed mid-run
and rerun. Fast variants: the metadata log under two real processes appending the same records at once, and two
shards run one after the other in this process against a one-shard run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tdd_jax import sample
from tdd_jax.sample import CONTACT_SHEET, METADATA, MetadataLog, SampleJob, run

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "tdd_jax" / "assets" / "tiny_sdxl"
NAMES = ["red heart", "grinning face", "rocket", "sun", "banana", "cat face", "pizza", "snowman", "ghost",
         "rainbow"]


def _env(**extra) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", **extra,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _lines(out: Path) -> list[str]:
    return (out / METADATA).read_text().splitlines()


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _pngs(out: Path) -> set[str]:
    return {p.name for p in out.glob("*.png") if p.name != CONTACT_SHEET}


def _same_folder(out: Path, ref: Path) -> None:
    """The same images and exactly the same metadata lines (in any order, each once) as the reference run."""
    assert _pngs(out) == _pngs(ref)
    lines = _lines(out)
    assert len(lines) == len(set(lines)) == len(_lines(ref))
    assert {json.dumps(json.loads(x), sort_keys=True) for x in lines} == {
        json.dumps(json.loads(x), sort_keys=True) for x in _lines(ref)}
    for name in _pngs(ref):
        np.testing.assert_array_equal(_pixels(out / name), _pixels(ref / name), err_msg=name)


_APPENDER = """
import pathlib, sys, time
from tdd_jax.sample import MetadataLog
path, order, n = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(path.parent / order).touch()
while not all((path.parent / o).exists() for o in ("up", "down")):  # start together
    time.sleep(0.001)
log = MetadataLog(path)
for i in (range(n) if order == "up" else reversed(range(n))):
    log.add({"index": i, "file": f"{i:05d}.png", "prompt": "x" * 3000})
log.close()
"""
N_RECORDS = 2000


def test_metadata_log_two_processes_same_records(tmp_path):
    """Two processes append the same records (3 kB lines) in opposite orders, at once, onto a log whose last
    line a killed writer cut short: every record ends up exactly once, every line whole."""
    path = tmp_path / METADATA
    path.write_text(json.dumps({"index": 0, "file": "00000.png"}) + "\n" + '{"index": 1, "fi')
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), order, str(N_RECORDS)], cwd=REPO, env=_env(),
                              stderr=subprocess.PIPE, text=True) for order in ("up", "down")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["file"] for r in records) == [f"{i:05d}.png" for i in range(N_RECORDS)]
    assert MetadataLog(path).refresh() == {f"{i:05d}.png" for i in range(N_RECORDS)}


def test_shards_in_one_process_equal_one_shard(tiny_pipeline_dir, tmp_path, monkeypatch):
    """Shards 0 and 1 of 2, run one after the other (one compiled pipeline), write the one-shard run's folder."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"{name}\n" for name in NAMES[:5]))
    pipe = sample.load_pipeline(SampleJob(pipeline=str(tiny_pipeline_dir), prompts="", out=""))
    monkeypatch.setattr(sample, "load_pipeline", lambda job: pipe)

    def job(out, **fields):
        return SampleJob(pipeline=str(tiny_pipeline_dir), prompts=str(prompts), out=str(tmp_path / out),
                         batch_size=2, sheet_wait=0, **fields)

    run(job("ref", num_shards=1))
    assert run(job("out", num_shards=2, shard_index=1)) is None  # only shard 0 writes the sheet
    assert sorted(int(name[:5]) for name in _pngs(tmp_path / "out")) == [1, 3]
    assert run(job("out", num_shards=2, shard_index=0)) == tmp_path / "out" / CONTACT_SHEET
    _same_folder(tmp_path / "out", tmp_path / "ref")
    np.testing.assert_array_equal(_pixels(tmp_path / "out" / CONTACT_SHEET), _pixels(tmp_path / "ref" / CONTACT_SHEET))
    with pytest.raises(sample.JobError, match="num_shards=2, shard_index=2"):
        run(job("out", num_shards=2, shard_index=2))


@pytest.mark.slow
def test_two_processes_one_killed_and_rerun(tmp_path):
    """Two real processes on the shipped tiny SDXL write one folder; shard 1 is SIGKILLed after its first image
    and rerun: it renders exactly its missing images, and the folder equals a one-process run's (PNGs, metadata
    lines; the contact sheet once shard 0 is rerun after both are done). ~70 s on 2 cores."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"{name}\n" for name in NAMES))
    env = _env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")  # the reference run compiles, the shards reuse it

    def cmd(out, shards, index):
        return [sys.executable, "-m", "tdd_jax.sample", f"--pipeline={SHIPPED}", f"--prompts={prompts}",
                f"--out={tmp_path / out}", "--steps=2", "--batch_size=2", "--sheet_wait=0",
                f"--num_shards={shards}", f"--shard_index={index}"]

    def finish(args):
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    assert "images/s" in finish(cmd("ref", 1, 0))
    out = tmp_path / "out"
    shard0 = subprocess.Popen(cmd("out", 2, 0), cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    shard1 = subprocess.Popen(cmd("out", 2, 1), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not any(int(name[:5]) % 2 for name in (_pngs(out) if out.is_dir() else ())):
        assert shard1.poll() is None and time.monotonic() < deadline, "shard 1 wrote no image"
        time.sleep(0.01)
    shard1.send_signal(signal.SIGKILL)
    shard1.wait()
    stdout, stderr = shard0.communicate(timeout=300)
    assert shard0.returncode == 0, stderr[-3000:]
    odd = {name for name in _pngs(tmp_path / "ref") if int(name[:5]) % 2}
    written = odd & _pngs(out)
    assert 0 < len(written) < len(odd), "the kill must come mid-run"
    assert len(_lines(out)) == len(set(_lines(out)))

    rerun = finish(cmd("out", 2, 1))
    assert f"renders {len(odd)}: {len(written)} already in {out}, {len(odd - written)} to render" in rerun
    _same_folder(out, tmp_path / "ref")
    finish(cmd("out", 2, 0))  # nothing left to render: completes the contact sheet
    np.testing.assert_array_equal(_pixels(out / CONTACT_SHEET), _pixels(tmp_path / "ref" / CONTACT_SHEET))


def test_png_writing_overlaps_the_next_batch(tmp_path, monkeypatch):
    """With a device call and a batch's PNG writing of 0.2 s each, 5 batches take about 6 x 0.2 s, not 10 x."""
    delay, batches, size = 0.2, 5, 2

    def fake_pipe(prompts, settings, **kwargs):
        time.sleep(delay)
        return np.zeros((len(prompts), 8, 8, 3), np.uint8)

    def slow_png(path, image):
        time.sleep(delay / size)
        path.write_bytes(b"png")

    monkeypatch.setattr(sample, "write_png", slow_png)
    records = [{"index": i, "file": f"{i:05d}.png", "prompt": "x", "seed": i, "negative_prompt": None,
                "height": 8, "width": 8} for i in range(batches * size)]
    plan = sample.Plan(records, records, sample.SamplerSettings(), {}, 1, 0)
    log = MetadataLog(tmp_path / METADATA)
    start = time.perf_counter()
    sample._render_todo(SampleJob(pipeline="", prompts="", out=str(tmp_path), batch_size=size), plan, fake_pipe, log)
    elapsed = time.perf_counter() - start
    log.close()
    assert len(_lines(tmp_path)) == len(records) and _pngs(tmp_path) == {r["file"] for r in records}
    assert elapsed < 0.75 * 2 * batches * delay, elapsed  # serial: 2.0 s; overlapped: ~1.2 s
