"""The batch-sampling job (python -m tdd_jax.sample): PNGs + metadata JSONL + contact sheet, resuming and repairing
an interrupted run, the same images on two devices, and input errors that leave nothing behind."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from PIL import Image
from safetensors.numpy import save_file

from tdd_jax import sample
from tdd_jax.sample import CONTACT_SHEET, METADATA, JobError, SampleJob, read_prompts, run

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [{"prompt": "a photo of a cat", "seed": 7}, {"prompt": "a red car", "negative_prompt": "blurry"},
           {"prompt": "a dog in the park"}]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def _job(**fields) -> SampleJob:
    """A job with batch size 2; paths may be given as Path."""
    return SampleJob(**{"batch_size": 2, **{k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}})


def _records(out: Path) -> list[dict]:
    return sorted((json.loads(line) for line in (out / METADATA).read_text().splitlines()), key=lambda r: r["index"])


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _check_outputs(out: Path, sheet: Path) -> None:
    records = _records(out)
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [(r["prompt"], r["seed"], r["negative_prompt"]) for r in records] == [
        ("a photo of a cat", 7, None), ("a red car", 1, "blurry"), ("a dog in the park", 2, None)]
    for r in records:
        assert (r["num_steps"], r["gamma"], r["guidance_scale"], r["final_step"], r["lora"]) == (4, 0.2, 1.7,
                                                                                                "clean", None)
        assert r["timesteps"] == [999, 751, 499, 251] and (r["height"], r["width"]) == (16, 16)
        assert _pixels(out / r["file"]).shape == (16, 16, 3)
    assert sorted(os.listdir(out)) == sorted([r["file"] for r in records] + [METADATA, CONTACT_SHEET])
    assert sheet == out / CONTACT_SHEET and _pixels(sheet).shape == (32, 32, 3)  # 2 x 2 grid, one blank


def _check_resume(job: SampleJob, out: Path, monkeypatch) -> None:
    """Re-running renders nothing; a metadata line cut by a crash is dropped and its image recorded again."""
    pngs = {r["file"]: (out / r["file"]).read_bytes() for r in _records(out)}

    def no_loading(job):
        raise AssertionError("nothing is left to render, the pipeline must not be loaded")

    monkeypatch.setattr(sample, "load_pipeline", no_loading)
    run(job)
    assert len(_records(out)) == 3
    lines = (out / METADATA).read_text().splitlines(keepends=True)
    (out / METADATA).write_text("".join(lines[:-1]) + lines[-1][:25])
    run(job)
    assert {r["file"] for r in _records(out)} == set(pngs) and len(_records(out)) == 3
    assert {f: (out / f).read_bytes() for f in pngs} == pngs


def _check_two_devices(job: SampleJob, out: Path, tmp_path: Path) -> None:
    """The command line with a batch of 3 on 2 devices (padded to 4) reproduces the one-device images."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "tdd_jax.sample", f"--pipeline={job.pipeline}", f"--prompts={job.prompts}",
           f"--out={tmp_path / 'two'}", "--batch_size=3"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "0 already in" in done.stdout and "3 to render" in done.stdout and "sampling" in done.stderr
    for r in _records(out):
        np.testing.assert_array_equal(_pixels(tmp_path / "two" / r["file"]), _pixels(out / r["file"]))


def test_job_writes_resumes_and_shards(tiny_pipeline_dir, prompt_file, tmp_path, monkeypatch):
    """One test, so that the rendered job is shared rather than redone by each pytest-xdist worker."""
    job = _job(pipeline=tiny_pipeline_dir, prompts=prompt_file, out=tmp_path / "out")  # batches of 2 and 1
    sheet = run(job)
    _check_outputs(tmp_path / "out", sheet)
    _check_resume(job, tmp_path / "out", monkeypatch)
    _check_two_devices(job, tmp_path / "out", tmp_path)


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog on the beach  \n")
    assert read_prompts(tmp_path / "p.txt", 5, "ugly") == [
        {"prompt": "a cat", "seed": 5, "negative_prompt": "ugly"},
        {"prompt": "a dog on the beach", "seed": 6, "negative_prompt": "ugly"}]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "seed": 42, "negative_prompt": "blurry"}\n'
                                      '\n{"prompt": "a dog"}\n')
    assert read_prompts(tmp_path / "p.jsonl", 5) == [{"prompt": "a cat", "seed": 42, "negative_prompt": "blurry"},
                                                     {"prompt": "a dog", "seed": 6, "negative_prompt": None}]
    (tmp_path / "q.jsonl").write_text('{"prompt": "a cat", "steps": 8}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:1: unknown fields \['steps'\]"):
        read_prompts(tmp_path / "q.jsonl", 0)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog",\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:3: not a JSON object"):  # the file's line, blanks counted
        read_prompts(tmp_path / "broken.jsonl", 0)
    with pytest.raises(ValueError, match="must be a .txt"):
        read_prompts(tmp_path / "p.csv", 0)


def test_input_errors_leave_nothing_behind(tiny_pipeline_dir, prompt_file, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    shutil.copytree(tiny_pipeline_dir, tmp_path / "partial", ignore=shutil.ignore_patterns("unet"))
    save_file({"not_a_lora": np.zeros(2, np.float32)}, str(tmp_path / "junk.safetensors"))
    cases = [
        (dict(prompts=tmp_path / "missing.txt"), "prompt file .*missing.txt does not exist"),
        (dict(prompts=tmp_path / "empty.txt"), "holds no prompts"),
        (dict(prompts=tmp_path / "bad.jsonl"), "bad.jsonl:2: expected an object with a string 'prompt'"),
        (dict(height=18), "height=18 is not a positive multiple of 4"),
        (dict(pipeline=tmp_path / "partial"), r"missing component folders \['unet'\]"),
        (dict(lora=tmp_path / "missing.safetensors"), "LoRA .* does not exist"),
        (dict(lora=tmp_path / "junk.safetensors"), "not LoRA weights of a known format"),
    ]
    for overrides, message in cases:
        with pytest.raises(JobError, match=message):
            run(_job(**{"pipeline": tiny_pipeline_dir, "prompts": prompt_file, "out": out, **overrides}))
        assert not out.exists(), overrides


def test_command_line_reports_input_errors(tiny_pipeline_dir, tmp_path, capsys):
    argv = ["sample", f"--pipeline={tiny_pipeline_dir}", f"--prompts={tmp_path / 'missing.txt'}",
            f"--out={tmp_path / 'out'}"]
    flags.FLAGS(argv)
    try:
        with pytest.raises(SystemExit) as exit_:
            sample.main(argv[:1])
    finally:
        flags.FLAGS.unparse_flags()
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: prompt file {tmp_path / 'missing.txt'} " \
        "does not exist\n"
    assert not (tmp_path / "out").exists()


def test_command_line_stacks_loras_and_takes_an_init_image(tiny_pipeline_dir, tmp_path):
    """Two --lora PATH:STRENGTH flags (a distillation LoRA, whose metadata sets the grid and w', and a kohya style
    LoRA) and img2img from --init_image/--strength through the real command line: the PNG is TDDPipeline's image
    with the same LoRAs and init image, at the init image's size."""
    from test_lora_stack import DISTILLED, kohya_file, peft_file, unet_shapes

    from tdd_jax.diffusion.sampler import SamplerSettings
    from tdd_jax.lora_source import LoRASpec
    from tdd_jax.models.loading import read_config
    from tdd_jax.pipeline import TDDPipeline

    shapes = unet_shapes(read_config(tiny_pipeline_dir / "unet"))
    tdd = peft_file(tmp_path / "tdd.safetensors", shapes, DISTILLED)
    style = kohya_file(tmp_path / "style.safetensors", shapes)
    init = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)  # 24 wide, 16 high
    Image.fromarray(init).save(tmp_path / "init.png")
    (tmp_path / "p.txt").write_text("a cat\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "tdd_jax.sample", f"--pipeline={tiny_pipeline_dir}", f"--prompts={tmp_path / 'p.txt'}",
           f"--out={tmp_path / 'out'}", f"--lora={tdd}:1.0", f"--lora={style}:0.8", "--w_prime=auto",
           f"--init_image={tmp_path / 'init.png'}", "--strength=0.5"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [record] = _records(tmp_path / "out")
    settings = SamplerSettings(grid_steps=50, w_prime=5.0, strength=0.5)
    assert record["lora"] == [[str(tdd), 1.0], [str(style), 0.8]] and record["lora_trained"]["solver_steps"] == 50
    assert record["timesteps"] == list(settings.timesteps()) == list(SamplerSettings(grid_steps=50).timesteps())[2:]
    assert record["init_image"] == str(tmp_path / "init.png") and (record["width"], record["height"]) == (24, 16)
    pipe = TDDPipeline.from_pretrained(tiny_pipeline_dir, lora=[LoRASpec(str(tdd), 1.0), LoRASpec(str(style), 0.8)])
    expected = pipe(["a cat"], settings, seeds=[0], init_images=init[None])
    np.testing.assert_array_equal(_pixels(tmp_path / "out" / record["file"]), expected[0])


def test_init_images_per_prompt_and_their_errors(tiny_pipeline_dir, tmp_path):
    """A JSONL 'init_image' is relative to the prompt file; --init_image is the default; the size comes from the
    images (rounded down to the pipeline's multiple); every prompt needs one once one has; nothing is written."""
    (tmp_path / "in").mkdir()
    for name, size in (("a.png", (26, 16)), ("b.png", (26, 16)), ("c.png", (16, 16))):
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(tmp_path / "in" / name)
    (tmp_path / "in" / "p.jsonl").write_text('{"prompt": "a cat", "init_image": "a.png"}\n{"prompt": "a dog"}\n')
    specs = read_prompts(tmp_path / "in" / "p.jsonl", 0, init_image=str(tmp_path / "in" / "b.png"))
    assert [s["init_image"] for s in specs] == [str(tmp_path / "in" / "a.png"), str(tmp_path / "in" / "b.png")]
    out = tmp_path / "out"
    job = dict(pipeline=tiny_pipeline_dir, prompts=tmp_path / "in" / "p.jsonl", out=out)
    plan = sample.prepare(_job(**job, init_image=tmp_path / "in" / "b.png"))
    assert {(r["width"], r["height"]) for r in plan.records} == {(24, 16)}  # 26 rounded down to a multiple of 4
    cases = [(dict(), r"prompts \[1\] have no init image while others do"),
             (dict(init_image=tmp_path / "in" / "c.png"), "the init images differ in size: give --height and --width"),
             (dict(init_image=tmp_path / "in" / "p.jsonl"), "p.jsonl cannot be read as an image"),
             (dict(prompts=tmp_path / "in" / "p.jsonl", init_image=tmp_path / "missing.png"), "missing.png cannot be"),
             (dict(prompts=_prompts_txt(tmp_path), settings=sample.SamplerSettings(strength=0.5)),
              r"--strength=0.5 < 1 is img2img: it needs --init_image")]
    for overrides, message in cases:
        with pytest.raises(JobError, match=message):
            run(_job(**{**job, **overrides}))
        assert not out.exists(), overrides


def _prompts_txt(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    return tmp_path / "p.txt"
