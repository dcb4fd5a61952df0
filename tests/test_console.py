"""What a new user sees: the commands run as ``python -m`` on this CPU machine (libtpu installed, JAX_PLATFORMS
unset) print no TPU lines, a 20-step training run prints a short console with a progress bar and a closing
summary (the logs go to the workdir), a refused resume writes nothing, and every file the writers leave is
readable by others as the umask allows.

The trainer and the sampler run at the same time (two commands at once once printed libtpu's lockfile advice);
the tiny random pipeline at 16 px keeps the compile short.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _trainer_runs import red_cat_folder

from convert import export_lora, fuse_unet

REPO = Path(__file__).resolve().parent.parent
STEPS = 20
MAX_TRAIN_LINES = 40


def user_environment() -> dict:
    """The environment of a user's shell: no JAX_PLATFORMS (conftest sets it for the test process)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return env


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *map(str, args)], cwd=REPO, env=user_environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # bytes: text mode turns \r into \n


def finish(proc: subprocess.Popen, timeout: float = 900) -> dict:
    out, err = proc.communicate(timeout=timeout)
    return {"code": proc.returncode, "out": out.decode(), "err": err.decode()}


def console_lines(run: dict) -> list[str]:
    """The lines a terminal shows (a progress bar redraws its line with \\r: one line)."""
    return [line.rsplit("\r", 1)[-1] for line in (run["out"] + run["err"]).rstrip("\n").split("\n")]


def train_command(pipeline, data, workdir, *extra):
    return ["tdd_jax.train", "--config=configs/tdd_tiny.py", f"--workdir={workdir}",
            f"--config.pipeline_dir={pipeline}", "--config.resolution=16", "--config.data.source=folder",
            f"--config.data.path={data}", "--config.data.num_threads=1", "--config.batch.global_batch=2",
            "--config.lora.rank=4", f"--config.num_train_steps={STEPS}", "--config.log_every=5",
            "--config.checkpoint.every=10", "--config.validation.every=1000", *extra]


def snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def runs(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    data = red_cat_folder(root / "data", 4)
    (root / "prompts.txt").write_text("a red cat\na blue dog\na green tree\na cat face\n")
    (root / "a_file").write_text("")
    workdir = root / "workdir"
    train = start(*train_command(tiny_pipeline_dir, data, workdir))
    sample = start("tdd_jax.sample", f"--pipeline={tiny_pipeline_dir}", f"--prompts={root / 'prompts.txt'}",
                   f"--out={root / 'samples'}")
    unwritable = start(*train_command(tiny_pipeline_dir, data, root / "a_file" / "workdir"))
    result = {"root": root, "workdir": workdir, "train": finish(train), "sample": finish(sample),
              "unwritable": finish(unwritable)}
    before = snapshot(workdir)
    result["other_rank"] = finish(start(*train_command(tiny_pipeline_dir, data, workdir, "--config.lora.rank=8")))
    result["untouched"] = snapshot(workdir) == before
    return result


def test_no_tpu_lines_from_commands_on_a_cpu_machine(runs):
    for name in ("train", "sample", "unwritable", "other_rank"):
        tpu = [line for line in console_lines(runs[name]) if re.search("tpu", line, re.IGNORECASE)]
        assert not tpu, (name, tpu)


def test_training_console_is_short_and_ends_with_a_summary(runs):
    run, workdir = runs["train"], runs["workdir"]
    assert run["code"] == 0, run["err"][-3000:]
    lines = console_lines(run)
    assert len(lines) <= MAX_TRAIN_LINES, "\n".join(lines)
    text = "\n".join(lines)
    assert "Traceback" not in text and "orbax" not in text.lower()
    assert re.search(r"compiling the train step\.\.\. done in \d+\.\d s", text)
    assert re.search(rf"train: 100%.*{STEPS}/{STEPS} .*loss=", text)  # the bar's last redraw, with the loss
    checkpoint = workdir / "checkpoints" / str(STEPS)
    assert checkpoint.is_dir() and f"checkpoint   {checkpoint}" in text
    assert f"done: step {STEPS} ({STEPS} steps; " in text and "with start-up and compile, final loss" in text
    assert "comparison   none: validation.every=1000 > num_train_steps=20" in text
    assert "python -m tdd_jax.sample --pipeline=" in text and f"--lora={workdir}" in text
    assert f"python -m convert.export_lora --checkpoint={workdir}" in text
    # The full config and the library logs went to the workdir.
    assert "lora:\n  alpha:" in (workdir / "config.yaml").read_text()
    log = (workdir / "train.log").read_text()
    assert "Compiled train step, per device" in log and "Saving checkpoint at step 10" in log


def test_sampling_console_is_short_and_its_files_readable(runs):
    run = runs["sample"]
    assert run["code"] == 0, run["err"][-3000:]
    lines = console_lines(run)
    assert len(lines) <= 6 and "sampling: 100%" in "\n".join(lines), lines
    assert_readable(runs["root"] / "samples", count=6)  # 4 PNGs, metadata.jsonl, contact sheet


def test_user_errors_of_the_trainer_are_one_line_and_write_nothing(runs):
    unwritable, other_rank = runs["unwritable"], runs["other_rank"]
    assert unwritable["code"] == 2 and unwritable["out"] == ""
    assert re.fullmatch(r"error: --workdir .*a_file/workdir: cannot create it \(Not a directory\)\n",
                        unwritable["err"]), unwritable["err"]
    assert other_rank["code"] == 2 and other_rank["out"] == ""
    assert re.fullmatch(r"error: checkpoint step 20 in .* was trained with lora.rank=4 but the config has "
                        r"lora.rank=8; .*\(nothing was written\).\n", other_rank["err"]), other_rank["err"]
    assert runs["untouched"]


def assert_readable(path: Path, count: int) -> None:
    """Every file under ``path`` (or ``path`` itself) has the read bits the umask allows."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    assert len(files) == count, files
    umask = os.umask(0)
    os.umask(umask)
    wanted = 0o444 & ~umask
    for f in files:
        assert f.stat().st_mode & wanted == wanted, (f, oct(f.stat().st_mode))


def test_exported_and_fused_files_are_readable(runs, tiny_pipeline_dir, tmp_path):
    """safetensors' save_file renames its own 0600 temporary file over the path it is given."""
    lora = tmp_path / "lora.safetensors"
    export_lora.main(["--checkpoint", str(runs["workdir"]), "--diffusers", str(lora)])
    assert_readable(lora, count=1)
    fuse_unet.main(["--base", str(tiny_pipeline_dir), "--lora", str(lora), "--out", str(tmp_path / "unet")])
    assert_readable(tmp_path / "unet", count=2)  # config.json and the weights
