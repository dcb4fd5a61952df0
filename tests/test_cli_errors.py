"""Bad input to each command: exit code 2, one line ``error: ...`` naming the flag, file or field (no traceback,
no help text before it), and nothing written. The commands' ``main`` run in this process (the trainer's, whose
flags clash with the compile check's, runs as a subprocess in test_console.py); docs/errors.md lists the same
messages."""

import json

import numpy as np
import pytest
from absl import flags
from PIL import Image
from safetensors.numpy import save_file

from convert import export_lora, fuse_unet, import_checkpoint
from tdd_jax import cli, evaluate, platforms, sample


@pytest.fixture
def files(tmp_path):
    """Inputs a new user gets wrong, and an output folder that must stay absent."""
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "text.safetensors").write_text("not a safetensors file\n")
    save_file({"unet.a.lora_A.weight": np.zeros((4, 64), np.float32)}, str(tmp_path / "whole.safetensors"))
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty_folder").mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    with open(mixed / "metadata.jsonl", "w") as f:
        for i, scale in enumerate((1.7, 3.0)):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / f"{i}.png")
            f.write(json.dumps({"index": i, "file": f"{i}.png", "prompt": "a cat", "seed": i, "num_steps": 4,
                                "guidance_scale": scale, "grid_steps_from": "--grid_steps"}) + "\n")
    return tmp_path


def one_line_error(capsys, call) -> str:
    """The message of ``call``, which must exit with code 2 after printing exactly one ``error:`` line."""
    with pytest.raises(SystemExit) as exit_:
        call()
    captured = capsys.readouterr()
    assert exit_.value.code == cli.EXIT_USER_ERROR and captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err.removeprefix("error: ").strip()


def sample_error(capsys, *argv) -> str:
    flags.FLAGS(["sample", *argv])
    try:
        return one_line_error(capsys, lambda: sample.main(["sample"]))
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("case, message", [
    ("pipeline=nowhere", "pipeline dir {tmp}/nowhere does not exist"),
    ("prompts=missing.txt", "prompt file {tmp}/missing.txt does not exist"),
    ("prompts=empty.txt", "prompt file {tmp}/empty.txt holds no prompts"),
    ("guidance_scale=-1", "sampler field guidance_scale=-1.0 must be >= 1 (1 = no CFG)"),
    ("lora=text.safetensors", "LoRA file {tmp}/text.safetensors is not a readable .safetensors file (Error while "
                              "deserializing header: header too large)"),
    ("lora=truncated.safetensors", "LoRA file {tmp}/truncated.safetensors is not a readable .safetensors file "
                                   "(Error while deserializing header: incomplete metadata, file not fully covered)"),
])
def test_sampler(case, message, files, tiny_pipeline_dir, capsys):
    name, value = case.split("=")
    args = {"pipeline": tiny_pipeline_dir, "prompts": files / "prompts.txt", "out": files / "out"}
    args[name] = value if name == "guidance_scale" else files / value
    assert sample_error(capsys, *(f"--{k}={v}" for k, v in args.items())) == message.format(tmp=files)
    assert not (files / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--samples", "empty_folder", "--reference", "empty_folder"],
     "--samples {tmp}/empty_folder: no metadata.jsonl (expected a folder written by tdd_jax.sample)"),
    (["--samples", "mixed", "--reference", "empty_folder"],
     "--samples {tmp}/mixed holds images of 2 different settings (guidance_scale: 1.7 vs 3.0); sample each "
     "setting into its own --out folder and evaluate those"),
    (["--reference", "emoji"], "the following arguments are required: --samples (--help lists the flags)"),
])
def test_evaluate(argv, message, files, capsys):
    argv = [str(files / a) if a in ("empty_folder", "mixed") else a for a in argv]
    out = files / "results.json"
    assert one_line_error(capsys, lambda: evaluate.main([*argv, "--out", str(out)])) == message.format(tmp=files)
    assert not out.exists()


@pytest.mark.parametrize("command, argv, message", [
    (export_lora, ["--checkpoint", "empty_folder", "--diffusers", "out/lora.safetensors"],
     "no checkpoint in {tmp}/empty_folder"),
    (export_lora, ["--checkpoint", "nowhere", "--diffusers", "out/lora.safetensors"],
     "{tmp}/nowhere is neither a trainer workdir nor a checkpoint folder"),
    (export_lora, ["--checkpoint", "empty_folder"], "give --diffusers and/or --kohya (--help lists the flags)"),
    (fuse_unet, ["--base", "PIPELINE", "--lora", "text.safetensors", "--out", "out/unet"],
     "LoRA file {tmp}/text.safetensors is not a readable .safetensors file (Error while deserializing header: "
     "header too large)"),
    (fuse_unet, ["--base", "empty_folder", "--lora", "text.safetensors", "--out", "out/unet"],
     "--base {tmp}/empty_folder is neither a diffusers UNet folder nor a pipeline folder with unet/"),
    (import_checkpoint, ["--checkpoint", "nowhere.safetensors", "--config", "empty_folder", "--out", "out/sdxl"],
     "--checkpoint {tmp}/nowhere.safetensors: no such file"),
])
def test_conversions(command, argv, message, files, tiny_pipeline_dir, capsys):
    argv = [str(tiny_pipeline_dir) if a == "PIPELINE" else str(files / a) if not a.startswith("--") else a
            for a in argv]
    assert one_line_error(capsys, lambda: command.main(argv)) == message.format(tmp=files)
    assert not (files / "out").exists()


def test_internal_errors_keep_their_traceback():
    def broken():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.guarded(broken)()


def test_fid_from_fewer_images_than_feature_dimensions_is_warned(caplog):
    assert evaluate.warn_if_few("samples", 4, 128) and "FID from 4 images, fewer than the 128" in caplog.text
    assert not evaluate.warn_if_few("samples", 128, 128)


def test_tpu_plugin_skipped_only_where_known(monkeypatch):
    monkeypatch.setattr(platforms.os.path, "exists", lambda path: path == "/dev/nvidiactl")
    assert platforms.startable_platforms(set()) == "cpu"
    assert platforms.startable_platforms({"xla_cuda12"}) == "cuda,cpu"
    assert platforms.startable_platforms({"xla_rocm"}) == "cpu"  # installed, but no ROCm device
    assert platforms.startable_platforms({"someone_elses_plugin"}) is None  # JAX's own choice stays
