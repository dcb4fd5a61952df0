"""tdd_jax.sample's settings from the LoRA's metadata, read from real exported files: the solver grid (default
--grid_steps; diffusers' TCDScheduler with original_inference_steps = the recorded grid as the reference),
--w_prime=auto = (w_min + w_max)/2 (paper Eq. 14), the refusal of w' on 'official' students, and the flags,
which are SamplerSettings' fields."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from diffusers import TCDScheduler
from flax import nnx
from PIL import Image

from configs import tdd_tiny
from convert import export_lora
from tdd_jax import lora_source, sample
from tdd_jax.cli import UserError
from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.models import lora_formats
from tdd_jax.models.loading import read_config
from tdd_jax.models.lora import matches_target
from tdd_jax.models.unet import UNet2DConditionModel
from tdd_jax.pipeline import TDDPipeline
from tdd_jax.sample import JobError, SampleJob, prepare, run
from tdd_jax.training.checkpointing import lora_metadata

REPO = Path(__file__).resolve().parents[1]


def export_file(pipeline_dir: Path, path: Path, *, w_min=3.0, w_max=7.0, mode="decoupled",
                with_metadata: bool = True) -> Path:
    """A diffusers LoRA file written by convert.export_lora with the trainer's metadata of configs/tdd_tiny.py
    (its 50-step solver grid), on a few UNet layers with random weights."""
    cfg = tdd_tiny.get_config()
    cfg.guidance.w_min, cfg.guidance.w_max, cfg.guidance.mode = w_min, w_max, mode
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(read_config(pipeline_dir / "unet"), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    lora = {}
    for name, shape in lora_formats.layer_shapes(unet).items():
        if matches_target(name, ("to_q",)):
            lora[name] = lora_formats.ModuleLoRA(0.1 * rng.standard_normal((4, *shape[1:]), np.float32),
                                                 0.1 * rng.standard_normal((shape[0], 4), np.float32), 1.0)
    export_lora.export(lora, lora_metadata(cfg, 7) if with_metadata else {}, diffusers=path)
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.txt"
    path.write_text("a cat\n")
    return path


def job(pipeline, prompts, out, **fields) -> SampleJob:
    return SampleJob(pipeline=str(pipeline), prompts=str(prompts), out=str(out), **fields)


def tcd_timesteps(num_steps: int, original_steps: int) -> list[int]:
    scheduler = TCDScheduler(original_inference_steps=original_steps)
    scheduler.set_timesteps(num_steps)
    return [int(t) for t in scheduler.timesteps]


def test_grid_from_metadata_and_override(tiny_pipeline_dir, prompts, tmp_path):
    assert set(lora_source.TRAINED_WITH) - {"ema"} <= set(lora_metadata(tdd_tiny.get_config(), 0))
    lora = export_file(tiny_pipeline_dir, tmp_path / "lora.safetensors")
    plan = prepare(job(tiny_pipeline_dir, prompts, tmp_path / "out", lora=str(lora)))
    assert plan.settings.grid_steps == 50 and "solver_steps=50" in plan.sources["grid_steps"]
    assert plan.records[0]["timesteps"] == tcd_timesteps(4, 50) != tcd_timesteps(4, 250)
    assert plan.records[0]["grid_steps_from"] == plan.sources["grid_steps"]
    assert plan.records[0]["lora_trained"]["solver_steps"] == 50
    # --grid_steps given: the flag wins.
    plan = prepare(job(tiny_pipeline_dir, prompts, tmp_path / "out", lora=str(lora), from_lora=frozenset(),
                       settings=SamplerSettings(grid_steps=100)))
    assert plan.settings.grid_steps == 100 and plan.sources["grid_steps"] == "--grid_steps"
    assert plan.records[0]["timesteps"] == tcd_timesteps(4, 100)
    # No LoRA, or a LoRA without metadata: today's 250.
    plan = prepare(job(tiny_pipeline_dir, prompts, tmp_path / "out"))
    assert plan.settings.grid_steps == 250 and plan.records[0]["timesteps"] == tcd_timesteps(4, 250)
    bare = export_file(tiny_pipeline_dir, tmp_path / "bare.safetensors", with_metadata=False)
    plan = prepare(job(tiny_pipeline_dir, prompts, tmp_path / "out", lora=str(bare)))
    assert plan.settings.grid_steps == 250 and "records no solver_steps" in plan.sources["grid_steps"]


def test_w_prime_auto_and_the_official_refusal(tiny_pipeline_dir, prompts, tmp_path):
    auto = frozenset({"grid_steps", "w_prime"})
    decoupled = export_file(tiny_pipeline_dir, tmp_path / "decoupled.safetensors", w_min=3.0, w_max=8.0)
    plan = prepare(job(tiny_pipeline_dir, prompts, tmp_path / "out", lora=str(decoupled), from_lora=auto))
    assert plan.settings.w_prime == 5.5 and plan.records[0]["w_prime"] == 5.5
    assert "(3.0 + 8.0)/2" in plan.records[0]["w_prime_from"]
    with pytest.raises(JobError, match=r"--w_prime=auto needs a LoRA .*no --lora given"):
        run(job(tiny_pipeline_dir, prompts, tmp_path / "out", from_lora=auto))
    assert not (tmp_path / "out").exists()

    official = export_file(tiny_pipeline_dir, tmp_path / "official.safetensors", mode="official")
    for fields in (dict(from_lora=auto), dict(settings=SamplerSettings(w_prime=2.0))):
        with pytest.raises(JobError, match=r"refusing w'=.*guidance mode 'official'.*CFG on the empty-prompt "
                                           r"samples.*--allow_w_prime_official"):
            run(job(tiny_pipeline_dir, prompts, tmp_path / "out", lora=str(official), **fields))
        assert not (tmp_path / "out").exists()
        with pytest.warns(UserWarning, match="guidance mode 'official'"):
            plan = prepare(job(tiny_pipeline_dir, prompts, tmp_path / "out", lora=str(official),
                               allow_w_prime_official=True, **fields))
        assert plan.settings.w_prime == (5.0 if "from_lora" in fields else 2.0)
    # No w' on an 'official' student is fine.
    assert prepare(job(tiny_pipeline_dir, prompts, tmp_path / "out", lora=str(official))).settings.w_prime is None


def test_flags_are_the_settings_fields():
    """Every SamplerSettings field has a flag of its name (num_steps: --steps) whose default is the field's."""
    values = flags.FLAGS
    names = {"num_steps": "steps"}
    for field in SamplerSettings.__dataclass_fields__.values():
        flag = values[names.get(field.name, field.name)]
        assert field.metadata["help"] in flag.help
        expected = "auto" if field.name == "grid_steps" else field.default
        assert flag.default == expected, field.name
    argv = ["sample", "--pipeline=p", "--prompts=p.txt", "--out=o", "--steps=6", "--w_prime=auto",
            "--grid_steps=40", "--non_equidistant", "--k_max=7", "--num_shards=3", "--shard_index=2"]
    values(argv)
    try:
        parsed = sample.job_from_flags(values)
        assert parsed == SampleJob(pipeline="p", prompts="p.txt", out="o", num_shards=3, shard_index=2,
                                   settings=SamplerSettings(num_steps=6, grid_steps=40, non_equidistant=True,
                                                            k_max=7),
                                   from_lora=frozenset({"w_prime"}))
        values(["sample", "--grid_steps=many"])
        with pytest.raises(UserError, match="--grid_steps='many' is neither a number nor 'auto'"):
            sample.job_from_flags(values)
    finally:
        values.unparse_flags()


def test_command_line_renders_with_the_lora_settings(tiny_pipeline_dir, prompts, tmp_path):
    """python -m tdd_jax.sample --w_prime=auto: the image equals the pipeline's own with w' = 5 on the 50-grid."""
    lora = export_file(tiny_pipeline_dir, tmp_path / "lora.safetensors")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "tdd_jax.sample", f"--pipeline={tiny_pipeline_dir}", f"--prompts={prompts}",
           f"--out={tmp_path / 'out'}", f"--lora={lora}", "--w_prime=auto", "--steps=2", "--gamma=0"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "grid_steps=50 from the LoRA's metadata (solver_steps=50)" in done.stdout
    assert "w_prime=5.0 from auto" in done.stdout and "images/s" in done.stdout
    (record,) = [json.loads(line) for line in (tmp_path / "out" / sample.METADATA).read_text().splitlines()]
    assert (record["grid_steps"], record["w_prime"], record["timesteps"]) == (50, 5.0, tcd_timesteps(2, 50))
    settings = SamplerSettings(num_steps=2, gamma=0.0, w_prime=5.0, grid_steps=50)
    expected = TDDPipeline.from_pretrained(tiny_pipeline_dir, lora=lora)(["a cat"], settings, seeds=[0])[0]
    with Image.open(tmp_path / "out" / record["file"]) as im:
        np.testing.assert_array_equal(np.asarray(im), expected)
