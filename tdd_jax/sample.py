"""Batch sampling job: render a prompt file with the TDD sampler into PNGs, a metadata JSONL and a contact sheet.

    python -m tdd_jax.sample --pipeline=DIR --prompts=prompts.txt --out=samples/ [--lora=lora.safetensors]
        [--steps=4 --gamma=0.2 --guidance_scale=1.7 --w_prime=... --clip_steps=0 --non_equidistant]
        [--seed=0 --height=1024 --width=1024 --batch_size=4 --dtype=bfloat16]

Prompts: a .txt file (one per line) or a .jsonl file ({"prompt": ..., "seed": ..., "negative_prompt": ...};
seed and negative prompt optional). Prompt i without a seed gets --seed + i. Every image's file name is its index
plus a digest of everything that decides it (prompt, seed, size, sampler settings, pipeline, LoRA), so re-running
the same job skips what is already written and a changed setting renders anew. Inputs are checked before
anything is written; PNGs appear atomically and each gets its metadata line only once it exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image
from tqdm import tqdm

from tdd_jax.atomic import atomic_file
from tdd_jax.diffusion.sampler import FINAL_STEPS, SamplerSettings
from tdd_jax.image_grid import to_grid
from tdd_jax.models.layers import ModelOptions
from tdd_jax.pipeline import MAX_SEED, ImageGeometry, TDDPipeline, check_pipeline_dir

METADATA = "metadata.jsonl"
CONTACT_SHEET = "contact_sheet.png"
DTYPES = ("float32", "bfloat16")  # float16 overflows in the SDXL VAE (NaN images)


@dataclasses.dataclass(frozen=True)
class SampleJob:
    """Everything the job is asked to do (the command-line flags)."""

    pipeline: str
    prompts: str
    out: str
    lora: str | None = None
    lora_scale: float = 1.0
    lora_step: int | None = None
    lora_ema: bool = False
    steps: int = 4
    gamma: float = 0.2
    guidance_scale: float = 1.7
    w_prime: float | None = None
    clip_steps: int = 0
    non_equidistant: bool = False
    final_step: str = "clean"
    grid_steps: int = 250
    negative_prompt: str | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    batch_size: int = 4
    dtype: str = "float32"
    sheet_thumb: int = 256
    sheet_max: int = 64

    def settings(self) -> SamplerSettings:
        return SamplerSettings(num_steps=self.steps, gamma=self.gamma, guidance_scale=self.guidance_scale,
                               w_prime=self.w_prime, non_equidistant=self.non_equidistant,
                               clip_steps=self.clip_steps, final_step=self.final_step,
                               grid_steps=self.grid_steps).validate()


def read_prompts(path: str | Path, base_seed: int, negative_prompt: str | None = None) -> list[dict[str, Any]]:
    """[{'prompt', 'seed', 'negative_prompt'}] from a .txt or .jsonl file; blank lines are skipped.

    A JSONL 'negative_prompt': null asks for SDXL's zero unconditional embedding even when a default is given.
    """
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"prompt file {path} must be a .txt (one prompt per line) or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        raise ValueError(f"prompt file {path} holds no prompts")
    specs = []
    for i, (n, line) in enumerate(lines):
        spec = {"prompt": line, "seed": base_seed + i, "negative_prompt": negative_prompt}
        if path.suffix == ".jsonl":
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                raise ValueError(f"{path}:{n}: expected an object with a string 'prompt'")
            unknown = set(entry) - set(spec)
            if unknown:
                raise ValueError(f"{path}:{n}: unknown fields {sorted(unknown)} (expected {sorted(spec)})")
            negative = entry.get("negative_prompt")
            if not isinstance(entry.get("seed", 0), int) or not (negative is None or isinstance(negative, str)):
                raise ValueError(f"{path}:{n}: 'seed' must be an integer and 'negative_prompt' a string or null")
            spec.update(entry)
        specs.append(spec)
    return specs


def plan_images(job: SampleJob, specs: list[dict[str, Any]], height: int, width: int) -> list[dict[str, Any]]:
    """One metadata record per image, its deterministic ``file`` name included."""
    settings = job.settings()
    common = {"height": height, "width": width, **dataclasses.asdict(settings),
              "timesteps": list(settings.timesteps()), "pipeline": str(Path(job.pipeline).resolve()),
              "lora": None if job.lora is None else str(Path(job.lora).resolve()), "lora_scale": job.lora_scale,
              "lora_step": job.lora_step, "lora_ema": job.lora_ema, "dtype": job.dtype}
    records = []
    for index, spec in enumerate(specs):
        record = {**spec, **common}
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
        records.append({"index": index, "file": f"{index:05d}_{digest}.png", **record})
    return records


def read_metadata(path: Path) -> set[str]:
    """Files already recorded in the metadata JSONL. A last line cut short by a crash is dropped from the file
    (its PNG, if any, is recorded again)."""
    if not path.is_file():
        return set()
    text = path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    if complete != text:
        with atomic_file(path, overwrite=True) as tmp:
            tmp.write_text(complete, encoding="utf-8")
    return {json.loads(line)["file"] for line in complete.splitlines() if line.strip()}


def append_metadata(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def write_png(path: Path, image: np.ndarray) -> None:
    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def contact_sheet(paths: list[Path], thumb: int) -> np.ndarray:
    """The images as thumbnails (longest side ``thumb``) in a near-square grid, white where a row runs short."""
    images = []
    for path in paths:
        with Image.open(path) as im:
            im.thumbnail((thumb, thumb))
            images.append(np.asarray(im.convert("RGB")))
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    blank = np.full_like(images[0], 255)
    images += [blank] * (rows * cols - len(images))
    return to_grid(np.stack(images).reshape(rows, cols, *images[0].shape))


def prepare(job: SampleJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(all image records, those still to render): every input check, nothing written yet."""
    small = [f"{name}={getattr(job, name)}" for name in ("batch_size", "sheet_thumb", "sheet_max")
             if getattr(job, name) <= 0]
    if small:
        raise ValueError(f"{', '.join(small)} must be positive")
    if job.dtype not in DTYPES:
        raise ValueError(f"dtype={job.dtype!r} is not one of {DTYPES}")
    job.settings()
    specs = read_prompts(job.prompts, job.seed, job.negative_prompt)
    bad = [spec["seed"] for spec in specs if not 0 <= spec["seed"] <= MAX_SEED]
    if bad:
        raise ValueError(f"seeds must be in [0, {MAX_SEED}], got {bad[:5]}")
    geometry = ImageGeometry.from_pretrained(check_pipeline_dir(job.pipeline))
    height = geometry.default_size if job.height is None else job.height
    width = geometry.default_size if job.width is None else job.width
    geometry.latent_shape(height, width)
    if job.lora is not None and not Path(job.lora).exists():
        raise FileNotFoundError(f"LoRA {job.lora} does not exist")
    out = Path(job.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    records = plan_images(job, specs, height, width)
    return records, [r for r in records if not (out / r["file"]).is_file()]


def load_pipeline(job: SampleJob) -> TDDPipeline:
    dtype = jnp.dtype(job.dtype)
    return TDDPipeline.from_pretrained(job.pipeline, lora=job.lora, lora_scale=job.lora_scale,
                                       lora_step=job.lora_step, lora_ema=job.lora_ema,
                                       opts=ModelOptions(dtype=dtype, param_dtype=dtype))


def render(job: SampleJob, records: list[dict[str, Any]], todo: list[dict[str, Any]],
           pipe: TDDPipeline | None) -> Path:
    """Render ``todo`` batch by batch, record every image and write the contact sheet; returns the sheet."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    metadata = out / METADATA
    recorded = read_metadata(metadata)
    for record in records:  # PNGs of an interrupted run that never got their line
        if record["file"] not in recorded and (out / record["file"]).is_file():
            append_metadata(metadata, record)
    settings = job.settings()
    with tqdm(total=len(todo), unit="img", desc="sampling") as bar:
        for start in range(0, len(todo), job.batch_size):
            batch = todo[start:start + job.batch_size]
            images = pipe([r["prompt"] for r in batch], settings, seeds=[r["seed"] for r in batch],
                          negative_prompts=[r["negative_prompt"] for r in batch], height=batch[0]["height"],
                          width=batch[0]["width"], batch_size=job.batch_size)
            for record, image in zip(batch, images):
                write_png(out / record["file"], image)
                append_metadata(metadata, record)
            bar.update(len(batch))
    sheet = out / CONTACT_SHEET
    grid = contact_sheet([out / r["file"] for r in records[:job.sheet_max]], job.sheet_thumb)
    with atomic_file(sheet, overwrite=True) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return sheet


class JobError(Exception):
    """A problem with the job's inputs, found before anything was written."""


def run(job: SampleJob) -> Path:
    """The whole job; returns the contact sheet. Input problems raise ``JobError`` before anything is written."""
    try:
        records, todo = prepare(job)
        pipe = load_pipeline(job) if todo else None
    except (FileNotFoundError, ValueError) as e:  # ValueError includes bad weights and LoRA files
        raise JobError(str(e)) from e
    print(f"{len(records)} images: {len(records) - len(todo)} already in {job.out}, {len(todo)} to render",
          flush=True)
    return render(job, records, todo, pipe)


flags.DEFINE_string("pipeline", None, "diffusers SDXL pipeline folder")
flags.DEFINE_string("prompts", None, "prompt file: .txt (one per line) or .jsonl")
flags.DEFINE_string("out", None, "output folder")
flags.DEFINE_string("lora", None, "LoRA .safetensors (diffusers/kohya) or trainer workdir / checkpoint folder")
flags.DEFINE_float("lora_scale", SampleJob.lora_scale, "LoRA multiplier")
flags.DEFINE_integer("lora_step", None, "checkpoint step of a trainer LoRA (default: the latest)")
flags.DEFINE_bool("lora_ema", SampleJob.lora_ema, "use the EMA LoRA of a trainer checkpoint")
flags.DEFINE_integer("steps", SampleJob.steps, "sampling steps")
flags.DEFINE_float("gamma", SampleJob.gamma, "renoise strength γ (0 = deterministic sampling)")
flags.DEFINE_float("guidance_scale", SampleJob.guidance_scale, "classifier-free guidance scale (1 = off)")
flags.DEFINE_float("w_prime", None, "training guidance w' for the guidance-scale tuning (paper Eq. 13/14)")
flags.DEFINE_integer("clip_steps", SampleJob.clip_steps, "dynamic-threshold x0 on the first N steps")
flags.DEFINE_bool("non_equidistant", SampleJob.non_equidistant, "TDD's non-equidistant timestep schedule")
flags.DEFINE_enum("final_step", SampleJob.final_step, FINAL_STEPS,
                  "clean: the last step returns x0 (TDD); tcd: it ends at alpha_bar_0 (diffusers' TCDScheduler)")
flags.DEFINE_integer("grid_steps", SampleJob.grid_steps, "solver grid the LoRA was trained on")
flags.DEFINE_string("negative_prompt", None, "negative prompt for prompts without their own "
                    "(unset: SDXL's all-zero unconditional embedding)")
flags.DEFINE_integer("seed", SampleJob.seed, "seed of prompt 0; prompt i without a seed gets seed + i")
flags.DEFINE_integer("height", None, "image height (default: the UNet's sample_size x the VAE factor)")
flags.DEFINE_integer("width", None, "image width (default: as for height)")
flags.DEFINE_integer("batch_size", SampleJob.batch_size, "images per compiled call (padded to the device count)")
flags.DEFINE_enum("dtype", SampleJob.dtype, DTYPES, "compute and weight dtype")
flags.DEFINE_integer("sheet_thumb", SampleJob.sheet_thumb, "contact-sheet thumbnail size in pixels")
flags.DEFINE_integer("sheet_max", SampleJob.sheet_max, "images on the contact sheet (the first N)")
flags.mark_flags_as_required(["pipeline", "prompts", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    job = SampleJob(**{f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(SampleJob)})
    try:
        sheet = run(job)
    except JobError as e:
        raise app.UsageError(str(e)) from e
    print(f"contact sheet: {sheet}", flush=True)


if __name__ == "__main__":
    app.run(main)
