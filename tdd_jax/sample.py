"""Batch sampling job: render a prompt file with the TDD sampler into PNGs, a metadata JSONL and a contact sheet.

    python -m tdd_jax.sample --pipeline=DIR --prompts=prompts.txt --out=samples/ [--lora=lora.safetensors]
        [--lora=tdd.safetensors:1.0 --lora=papercut.safetensors:0.8 --lora_settings_from=N]
        [--init_image=photo.png --strength=0.5]
        [--steps=4 --gamma=0.2 --guidance_scale=1.7 --w_prime=auto|W --grid_steps=auto|N --non_equidistant]
        [--seed=0 --height=1024 --width=1024 --batch_size=4 --dtype=bfloat16 --num_shards=N --shard_index=K]
        [--controlnet=DIR --control_image=edges.png --controlnet_scale=0.5 --control_guidance_end=0.8 ...]

Prompts: a .txt file (one per line) or a .jsonl file ({"prompt": ..., "seed": ..., "negative_prompt": ...};
seed and negative prompt optional). Prompt i without a seed gets --seed + i. Every image's file name is its index
plus a digest of everything that decides it (prompt, seed, size, sampler settings, pipeline, LoRA and how it was
trained), so re-running the same job skips what is already written and a changed setting renders anew. Inputs are
checked before anything is written; PNGs appear atomically and each gets its metadata line only once it exists.

ControlNets. ``--controlnet=DIR`` (repeatable) with one ``--control_image`` per ControlNet, in the same order, or a
JSONL prompt's "control_image" (a path, or a list of one per ControlNet, relative to the prompt file's folder);
``--controlnet_scale``, ``--control_guidance_start/end``: one value, or one per ControlNet (diffusers' semantics,
see ``TDDPipeline.__call__``). The ControlNets and control image paths are part of each image's digest.

Settings from the LoRA. ``--grid_steps`` defaults to the solver grid the LoRA records (``solver_steps``), else
250; ``--w_prime=auto`` is w' = (w_min + w_max)/2 of the LoRA's training guidance (paper Eq. 14). w' is refused
on a student distilled in guidance mode 'official' unless ``--allow_w_prime_official``. Each setting's flag,
default and help come from its ``SamplerSettings`` field. With several ``--lora PATH[:STRENGTH]`` (merged into
the weights together, any mix of trainer checkpoints, diffusers/PEFT and kohya files) the settings come from the
one whose metadata records distillation settings; two that record different ones are an error unless
``--lora_settings_from`` names the index of the one to use.

img2img. ``--init_image`` (or an 'init_image' field per JSONL prompt, relative to the prompt file's folder)
starts from that image as diffusers' StableDiffusionXLImg2ImgPipeline does: VAE-encoded, noised to the first of
the last int(steps x ``--strength``) timesteps, which then run. The image size defaults to the init images'
(when they all share one, rounded down to the pipeline's multiple); images of another size are resized to
--height x --width (Lanczos). Every prompt needs an init image once one has.

Several processes, one folder. Process k of n (``--num_shards/--shard_index``, by default jax.process_count()
and jax.process_index()) renders the images whose index is k mod n. They share one ``metadata.jsonl``, appended
one whole line per write under a POSIX lock (``MetadataLog``), so readers keep reading one file whatever the
number of shards, a rerun with any shard count continues the same folder, and no merge step has to know when
every shard is done. Lines are in completion order (sort by ``index``). Shard 0 writes the contact sheet after
waiting up to ``--sheet_wait`` seconds for the other shards' sheet images, from the images that exist then.
PNGs are encoded and written by a background thread while the device renders the next batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import threading
import time
import typing
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image

from tdd_jax import cli, console, control, lora_source
from tdd_jax.atomic import atomic_file
from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.image_grid import to_grid
from tdd_jax.models.layers import ModelOptions
from tdd_jax.pipeline import MAX_SEED, ImageGeometry, TDDPipeline, check_pipeline_dir
from tdd_jax.training import sharding

METADATA = "metadata.jsonl"
CONTACT_SHEET = "contact_sheet.png"
DTYPES = ("float32", "bfloat16")  # float16 overflows in the SDXL VAE (NaN images)
AUTO = "auto"
FROM_LORA = ("grid_steps", "w_prime")  # the settings that can come from the LoRA's metadata
IN_FLIGHT = 2  # batches handed to the PNG writer and not yet written


def _flag(default: Any = dataclasses.MISSING, help: str = "", choices: tuple[str, ...] | None = None):
    """A ``SampleJob`` field that is also a command-line flag of the same name (``define_flags``)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class SampleJob:
    """Everything the job is asked to do: the command-line flags, the sampler's in ``settings``.

    ``from_lora``: the names in ``FROM_LORA`` to fill from the LoRA's metadata (``--grid_steps=auto``, the
    default, falls back to ``settings.grid_steps`` when the LoRA records no grid; ``--w_prime=auto`` does not).
    """

    pipeline: str = _flag(help="diffusers SDXL pipeline folder")
    prompts: str = _flag(help="prompt file: .txt (one per line) or .jsonl")
    out: str = _flag(help="output folder")
    settings: SamplerSettings = SamplerSettings()
    from_lora: frozenset[str] = frozenset({"grid_steps"})
    lora: tuple[str, ...] = _flag((), "PATH[:STRENGTH]: a LoRA .safetensors (diffusers/PEFT/kohya) or trainer "
                                  "workdir / checkpoint folder; repeat the flag to stack LoRAs (strength default 1)")
    lora_scale: float = _flag(1.0, "LoRA multiplier (of every --lora's strength)")
    lora_step: int | None = _flag(None, "checkpoint step of a trainer LoRA (default: the latest)")
    lora_ema: bool = _flag(False, "use the EMA LoRA of a trainer checkpoint")
    lora_settings_from: int | None = _flag(None, "index of the --lora (0 = the first) whose metadata sets the "
                                           "sampler defaults (default: the one recording distillation settings)")
    init_image: str | None = _flag(None, "img2img: init image file for prompts without their own 'init_image'")
    allow_w_prime_official: bool = _flag(False, "use w' on a student trained in guidance mode 'official' anyway "
                                         "(a warning instead of the refusal)")
    negative_prompt: str | None = _flag(None, "negative prompt for prompts without their own (unset: SDXL's "
                                        "all-zero unconditional embedding)")
    seed: int = _flag(0, "seed of prompt 0; prompt i without a seed gets seed + i")
    height: int | None = _flag(None, "image height (default: the UNet's sample_size x the VAE factor)")
    width: int | None = _flag(None, "image width (default: as for height)")
    batch_size: int = _flag(4, "images per compiled call (padded to the device count)")
    dtype: str = _flag("float32", "compute and weight dtype", DTYPES)
    num_shards: int | None = _flag(None, "processes sharing the prompt file (default: jax.process_count())")
    shard_index: int | None = _flag(None, "this process's share: the images whose index is shard_index mod "
                                    "num_shards (default: jax.process_index())")
    cluster: str = _flag("off", "'auto': join a TPU pod / SLURM / MPI cluster (jax.distributed) first, so that "
                         "the shard defaults are its processes", ("off", "auto"))
    sheet_thumb: int = _flag(256, "contact-sheet thumbnail size in pixels")
    sheet_max: int = _flag(64, "images on the contact sheet (the first N)")
    sheet_wait: float = _flag(300.0, "shard 0: seconds to wait for the other shards' contact-sheet images")
    controlnet: tuple[str, ...] = _flag((), "diffusers ControlNet folder (repeatable: several ControlNets, summed as "
                                        "diffusers' MultiControlNet)")
    control_image: tuple[str, ...] = _flag((), "control image file, one per --controlnet in the same order (resized "
                                           "to the image size as diffusers does); a JSONL prompt's 'control_image' "
                                           "overrides it")
    controlnet_scale: tuple[float, ...] = _flag((1.0,), "ControlNet conditioning scale: one for all, or one per "
                                                "--controlnet")
    control_guidance_start: tuple[float, ...] = _flag((0.0,), "ControlNets are off on the steps i with i/N < start: "
                                                      "one for all, or one per --controlnet")
    control_guidance_end: tuple[float, ...] = _flag((1.0,), "ControlNets are off on the steps i with (i+1)/N > end: "
                                                    "one for all, or one per --controlnet")

    def __post_init__(self):
        """One LoRA may be given as a plain string (or None for none)."""
        lora = () if self.lora is None else (self.lora,) if isinstance(self.lora, (str, Path)) else self.lora
        object.__setattr__(self, "lora", tuple(str(item) for item in lora))

    def lora_specs(self) -> list[lora_source.LoRASpec]:
        return [lora_source.LoRASpec.parse(text, step=self.lora_step, ema=self.lora_ema) for text in self.lora]

    def shard(self) -> tuple[int, int]:
        """(num_shards, shard_index), the unset ones from the JAX processes; ValueError for an impossible pair."""
        n = jax.process_count() if self.num_shards is None else self.num_shards
        k = jax.process_index() if self.shard_index is None else self.shard_index
        if n < 1 or not 0 <= k < n:
            raise ValueError(f"num_shards={n}, shard_index={k}: need num_shards >= 1 and 0 <= shard_index < "
                             "num_shards")
        return n, k


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``prepare`` decided: every image's record, this shard's images still to render, the settings."""

    records: list[dict[str, Any]]
    todo: list[dict[str, Any]]
    settings: SamplerSettings
    sources: dict[str, str]  # where grid_steps and w_prime came from
    num_shards: int
    shard_index: int


def read_prompts(path: str | Path, base_seed: int, negative_prompt: str | None = None,
                 init_image: str | None = None) -> list[dict[str, Any]]:
    """[{'prompt', 'seed', 'negative_prompt'} (+ 'init_image')] from a .txt or .jsonl file; blank lines are skipped.

    A JSONL 'negative_prompt': null asks for SDXL's zero unconditional embedding even when a default is given.
    'init_image' (img2img) is there where the prompt or the default ``init_image`` gives one, as an absolute path
    (a JSONL entry's relative to the prompt file's folder).
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
        if init_image is not None:
            spec["init_image"] = str(Path(init_image).resolve())
        if path.suffix == ".jsonl":
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                raise ValueError(f"{path}:{n}: expected an object with a string 'prompt'")
            fields = {"prompt", "seed", "negative_prompt", "init_image", "control_image"}
            unknown = set(entry) - fields
            if unknown:
                raise ValueError(f"{path}:{n}: unknown fields {sorted(unknown)} (expected {sorted(fields)})")
            if "init_image" in entry:
                if not isinstance(entry["init_image"], str):
                    raise ValueError(f"{path}:{n}: 'init_image' must be a file path")
                entry["init_image"] = str((path.parent / entry["init_image"]).resolve())
            negative = entry.get("negative_prompt")
            if not isinstance(entry.get("seed", 0), int) or not (negative is None or isinstance(negative, str)):
                raise ValueError(f"{path}:{n}: 'seed' must be an integer and 'negative_prompt' a string or null")
            spec.update(entry)
            if "control_image" in entry:
                spec["control_image"] = _control_paths(entry["control_image"], path.parent, f"{path}:{n}")
        specs.append(spec)
    return specs


def _control_paths(value: Any, folder: Path, where: str) -> list[str]:
    """A JSONL 'control_image' (a path or a list of paths, relative to ``folder``) as absolute paths."""
    paths = [value] if isinstance(value, str) else value
    if not (isinstance(paths, list) and paths and all(isinstance(v, str) for v in paths)):
        raise ValueError(f"{where}: 'control_image' must be a path or a list of paths")
    return [str((folder / v).resolve()) for v in paths]


def _one_or_each(values: tuple, k: int, name: str) -> float | list[float]:
    """A per-ControlNet flag's value for TDDPipeline: one number for all, or a list of one per ControlNet."""
    if len(values) not in (1, k):
        raise ValueError(f"--{name} has {len(values)} values for {k} --controlnet: give one, or one each")
    return values[0] if len(values) == 1 else list(values)


def _control_kwargs(job: SampleJob, num_steps: int) -> dict[str, Any]:
    """TDDPipeline's ControlNet arguments from the flags (the images come per batch), checked: no ControlNet
    gives {}; a scale or window count that fits neither one nor every ControlNet is a ValueError."""
    k = len(job.controlnet)
    if not k:
        return {}
    kwargs = {name: _one_or_each(getattr(job, flag), k, flag) for name, flag in (
        ("controlnet_conditioning_scale", "controlnet_scale"), ("control_guidance_start", "control_guidance_start"),
        ("control_guidance_end", "control_guidance_end"))}
    control.step_scales(num_steps, *([v] * k if not isinstance(v, list) else v for v in kwargs.values()))
    return kwargs


def _with_control_images(job: SampleJob, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every spec with its 'control_image' list (one existing file per --controlnet), from the JSONL or the flag."""
    k = len(job.controlnet)
    if not k:
        if job.control_image or any("control_image" in spec for spec in specs):
            raise ValueError("--control_image (or a prompt's 'control_image') needs --controlnet")
        return specs
    default = [str(Path(p).resolve()) for p in job.control_image]
    out = []
    for i, spec in enumerate(specs):
        images = spec.get("control_image", default)
        if len(images) != k:
            what = "--control_image" if "control_image" not in spec else f"prompt {i}'s 'control_image'"
            raise ValueError(f"{what} gives {len(images)} control images for {k} --controlnet")
        missing = [p for p in images if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"control image not found: {missing[0]}")
        out.append({**spec, "control_image": images})
    return out


def resolve_settings(job: SampleJob, meta: dict[str, Any] | None,
                     source: str | None = None) -> tuple[SamplerSettings, dict[str, str]]:
    """(the sampler settings with ``job.from_lora`` filled from the LoRA's metadata, where each came from).

    ``meta``: the metadata of the LoRA ``source`` that sets the sampler defaults (``lora_source.settings_source``;
    None when no LoRA does). ValueError when ``--w_prime=auto`` finds no guidance range, or when w' would be used
    on a student trained in guidance mode 'official' without the override.
    """
    unknown = sorted(job.from_lora - set(FROM_LORA))
    if unknown:
        raise ValueError(f"from_lora={unknown}: only {FROM_LORA} can come from the LoRA's metadata")
    settings, sources, meta = job.settings, {}, meta or {}
    what = f"--lora {source if source is not None else ', '.join(job.lora)}"
    if "grid_steps" not in job.from_lora:
        sources["grid_steps"] = "--grid_steps"
    elif meta.get("solver_steps") is not None:
        settings = dataclasses.replace(settings, grid_steps=int(meta["solver_steps"]))
        sources["grid_steps"] = f"the LoRA's metadata (solver_steps={settings.grid_steps})"
    else:
        sources["grid_steps"] = f"the default ({what + ' records no solver_steps' if job.lora else 'no LoRA'})"
    if "w_prime" in job.from_lora:
        if not job.lora or meta.get("w_min") is None or meta.get("w_max") is None:
            raise ValueError(f"--w_prime=auto needs a LoRA whose metadata records its training guidance range "
                             f"(w_min, w_max); {what + ' has none' if job.lora else 'no --lora given'}: "
                             "pass --w_prime=W")
        w = (float(meta["w_min"]) + float(meta["w_max"])) / 2
        settings = dataclasses.replace(settings, w_prime=w)
        sources["w_prime"] = f"auto: (w_min + w_max)/2 = ({meta['w_min']} + {meta['w_max']})/2 of the LoRA (Eq. 14)"
    elif settings.w_prime:
        sources["w_prime"] = "--w_prime"
    if settings.w_prime and meta.get("guidance_mode") == "official":
        why = (f"{what} was distilled in guidance mode 'official', which trains with CFG on the empty-prompt "
               "samples too, so its unconditional output is not the teacher's ε(∅) and the guidance-scale tuning "
               "of paper Eq. 13/14 (which assumes ε_s(∅) ≈ ε(∅)) does not hold")
        if not job.allow_w_prime_official:
            raise ValueError(f"refusing w'={settings.w_prime}: {why}. Sample without --w_prime, or pass "
                             "--allow_w_prime_official to use it anyway")
        warnings.warn(f"w'={settings.w_prime} used although {why} (--allow_w_prime_official)", stacklevel=2)
    return settings.validate(), sources


def init_image_size(specs: list[dict[str, Any]]) -> tuple[int, int] | None:
    """(width, height) shared by every prompt's init image (None when they differ or there are none);
    ValueError when some prompts have one and others not, or a file is not a readable image."""
    paths = [spec.get("init_image") for spec in specs]
    if not any(paths):
        return None
    if not all(paths):
        lacking = [i for i, p in enumerate(paths) if not p][:5]
        raise ValueError(f"prompts {lacking} have no init image while others do: give --init_image as the "
                         "default or an 'init_image' for every prompt")
    sizes = set()
    for path in dict.fromkeys(paths):
        try:
            with Image.open(path) as im:
                sizes.add(im.size)
        except (OSError, ValueError) as e:
            raise ValueError(f"init image {path} cannot be read as an image ({type(e).__name__}: {e})") from None
    return sizes.pop() if len(sizes) == 1 else None


def load_init_image(path: str | Path, width: int, height: int) -> np.ndarray:
    """An init image as (height, width, 3) uint8 RGB, resized (Lanczos, as diffusers' VaeImageProcessor) if its
    size differs."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (width, height):
            im = im.resize((width, height), Image.Resampling.LANCZOS)
        return np.asarray(im)


def plan_images(job: SampleJob, settings: SamplerSettings, specs: list[dict[str, Any]], height: int, width: int,
                trained: dict[str, Any] | None, sources: dict[str, str]) -> list[dict[str, Any]]:
    """One metadata record per image, its deterministic ``file`` name included. The digest covers what decides
    the image, not where a setting came from or how the job is sharded."""
    common = {"height": height, "width": width, **dataclasses.asdict(settings),
              "timesteps": list(settings.timesteps()), "pipeline": str(Path(job.pipeline).resolve()),
              "lora": [[str(Path(spec.path).resolve()), spec.scale] for spec in job.lora_specs()] or None,
              "lora_scale": job.lora_scale, "lora_step": job.lora_step, "lora_ema": job.lora_ema,
              "lora_settings_from": job.lora_settings_from, "lora_trained": trained, "dtype": job.dtype}
    if job.controlnet:
        common.update({"controlnet": [str(Path(d).resolve()) for d in job.controlnet],
                       "controlnet_scale": list(job.controlnet_scale),
                       "control_guidance_start": list(job.control_guidance_start),
                       "control_guidance_end": list(job.control_guidance_end)})
    records = []
    for index, spec in enumerate(specs):
        record = {**spec, **common}
        if "init_image" in spec:  # the image itself decides the sample, not just its path
            record["init_image_sha256"] = hashlib.sha256(Path(spec["init_image"]).read_bytes()).hexdigest()
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
        records.append({"index": index, "file": f"{index:05d}_{digest}.png", **record,
                        **{f"{name}_from": source for name, source in sources.items()}})
    return records


class MetadataLog:
    """``metadata.jsonl`` shared by every process writing one folder: one JSON line per image, never twice.

    Every access holds a POSIX lock on the file (``fcntl.lockf``: across processes, also on NFS) and a thread
    lock (POSIX locks do not exclude threads of one process). Under the lock the log first reads what other
    processes appended since, so ``add`` skips a file already recorded, and a line cut short by a killed writer
    (only a dead writer can leave one: lines are written whole, under the lock) is cut off before appending.
    """

    def __init__(self, path: Path):
        self.path = path
        self.recorded: set[str] = set()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        self._read = 0  # bytes of whole lines already in ``recorded``
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self):
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                self._catch_up()
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _catch_up(self) -> None:
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, size - self._read, self._read)
        whole = data[: data.rfind(b"\n") + 1]
        for n, line in enumerate(whole.decode("utf-8").splitlines()):
            if line.strip():
                try:
                    self.recorded.add(json.loads(line)["file"])
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{self.path}: line {line[:80]!r} is not an image record") from None
        self._read += len(whole)
        if self._read < size:  # a torn last line: its PNG, if any, is recorded again
            os.ftruncate(self._fd, self._read)

    def refresh(self) -> set[str]:
        """The files recorded by any process so far."""
        with self._locked():
            return set(self.recorded)

    def add(self, record: dict[str, Any]) -> None:
        with self._locked():
            if record["file"] in self.recorded:
                return
            line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
            written = 0
            while written < len(line):
                written += os.write(self._fd, line[written:])
            self._read += len(line)
            self.recorded.add(record["file"])

    def close(self) -> None:
        os.close(self._fd)


def write_png(path: Path, image: np.ndarray) -> None:
    with atomic_file(path, overwrite=True) as tmp:  # a concurrent writer of the same image writes the same bytes
        Image.fromarray(image).save(tmp, format="PNG")


def contact_sheet(paths: list[Path], thumb: int) -> np.ndarray | None:
    """The images as thumbnails (longest side ``thumb``) in a near-square grid, white where a row runs short and
    grey where an image does not exist (yet); None when none exists."""
    images = {}
    for path in paths:
        if path.is_file():
            with Image.open(path) as im:
                im.thumbnail((thumb, thumb))
                images[path] = np.asarray(im.convert("RGB"))
    if not images:
        return None
    like = next(iter(images.values()))
    tiles = [images.get(path, np.full_like(like, 128)) for path in paths]
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    tiles += [np.full_like(like, 255)] * (rows * cols - len(tiles))
    return to_grid(np.stack(tiles).reshape(rows, cols, *like.shape))


def prepare(job: SampleJob) -> Plan:
    """Every input check and decision, nothing written yet."""
    small = [f"{name}={getattr(job, name)}" for name in ("batch_size", "sheet_thumb", "sheet_max")
             if getattr(job, name) <= 0]
    if small:
        raise ValueError(f"{', '.join(small)} must be positive")
    if job.dtype not in DTYPES:
        raise ValueError(f"dtype={job.dtype!r} is not one of {DTYPES}")
    num_shards, shard_index = job.shard()
    specs = _with_control_images(job, read_prompts(job.prompts, job.seed, job.negative_prompt, job.init_image))
    bad = [spec["seed"] for spec in specs if not 0 <= spec["seed"] <= MAX_SEED]
    if bad:
        raise ValueError(f"seeds must be in [0, {MAX_SEED}], got {bad[:5]}")
    geometry = ImageGeometry.from_pretrained(check_pipeline_dir(job.pipeline))
    init_size = init_image_size(specs)
    if "init_image" not in specs[0] and job.settings.strength < 1.0:
        raise ValueError(f"--strength={job.settings.strength} < 1 is img2img: it needs --init_image (or an "
                         "'init_image' per JSONL prompt)")
    if "init_image" in specs[0] and init_size is None and (job.height is None or job.width is None):
        raise ValueError("the init images differ in size: give --height and --width (they are resized to it)")
    default_width, default_height = (geometry.default_size,) * 2 if init_size is None else (
        max(geometry.multiple, v - v % geometry.multiple) for v in init_size)
    height = default_height if job.height is None else job.height
    width = default_width if job.width is None else job.width
    geometry.latent_shape(height, width)
    metas = [(spec.path, lora_source.read_metadata(spec.path, step=spec.step)) for spec in job.lora_specs()]
    source = lora_source.settings_source(metas, job.lora_settings_from)
    meta = None if source is None else metas[source][1]
    settings, sources = resolve_settings(job, meta, None if source is None else metas[source][0])
    _control_kwargs(job, len(settings.timesteps()))
    out = Path(job.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    trained = None if meta is None else lora_source.trained_with(meta)
    records = plan_images(job, settings, specs, height, width, trained, sources)
    todo = [r for r in records if r["index"] % num_shards == shard_index and not (out / r["file"]).is_file()]
    return Plan(records, todo, settings, sources, num_shards, shard_index)


def load_pipeline(job: SampleJob) -> TDDPipeline:
    """The pipeline on this process's devices (each process of a multi-host job renders its own share)."""
    dtype = jnp.dtype(job.dtype)
    return TDDPipeline.from_pretrained(job.pipeline, lora=job.lora_specs(), lora_scale=job.lora_scale,
                                       lora_settings_from=job.lora_settings_from,
                                       opts=ModelOptions(dtype=dtype, param_dtype=dtype),
                                       mesh=sharding.make_mesh(data=-1, fsdp=1, devices=jax.local_devices()),
                                       controlnets=job.controlnet)


def _write_batch(out: Path, log: MetadataLog, batch: list[dict[str, Any]], images: np.ndarray) -> None:
    for record, image in zip(batch, images):
        write_png(out / record["file"], image)
        log.add(record)


def _render_todo(job: SampleJob, plan: Plan, pipe: TDDPipeline, log: MetadataLog) -> None:
    """Render ``plan.todo`` batch by batch; a background thread writes each batch while the next one renders."""
    out = Path(job.out)
    start = time.perf_counter()
    first_done = first_count = None
    control_kwargs = _control_kwargs(job, len(plan.settings.timesteps()))
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="png-writer") as writer, \
            console.progress(len(plan.todo), "sampling", "img") as bar:
        pending = collections.deque()
        for begin in range(0, len(plan.todo), job.batch_size):
            batch = plan.todo[begin:begin + job.batch_size]
            height, width = batch[0]["height"], batch[0]["width"]
            init = (np.stack([load_init_image(r["init_image"], width, height) for r in batch])
                    if "init_image" in batch[0] else None)
            if control_kwargs:  # per ControlNet, the batch's images (one ControlNet: the list itself)
                per_net = [list(paths) for paths in zip(*(r["control_image"] for r in batch))]
                control_kwargs["control_image"] = per_net if len(per_net) > 1 else per_net[0]
            images = pipe([r["prompt"] for r in batch], plan.settings, seeds=[r["seed"] for r in batch],
                          negative_prompts=[r["negative_prompt"] for r in batch], height=height, width=width,
                          init_images=init, batch_size=job.batch_size, **control_kwargs)
            if first_done is None:
                first_done, first_count = time.perf_counter(), len(batch)
            pending.append(writer.submit(_write_batch, out, log, batch, images))
            while len(pending) > IN_FLIGHT:
                pending.popleft().result()
            bar.update(len(batch))
        for done in pending:
            done.result()
    end = time.perf_counter()
    n = len(plan.todo)
    rate = f"{n / (end - start):.3f} images/s"
    if n > first_count:
        rate += f"; {(n - first_count) / (end - first_done):.3f} images/s after the first batch (which compiles)"
    print(f"rendered {n} images in {end - start:.1f} s: {rate}", flush=True)


def render(job: SampleJob, plan: Plan, pipe: TDDPipeline | None) -> Path | None:
    """Render this shard's images, record every image that exists and (shard 0) write the contact sheet;
    returns the sheet (None on other shards, or when no sheet image exists)."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    log = MetadataLog(out / METADATA)
    try:
        recorded = log.refresh()
        for record in plan.records:  # PNGs of an interrupted run (of any shard) that never got their line
            if record["file"] not in recorded and (out / record["file"]).is_file():
                log.add(record)
        if plan.todo:
            _render_todo(job, plan, pipe, log)
    finally:
        log.close()
    if plan.shard_index != 0:
        return None
    paths = [out / r["file"] for r in plan.records[:job.sheet_max]]
    deadline = time.monotonic() + job.sheet_wait
    while not all(p.is_file() for p in paths) and time.monotonic() < deadline:
        time.sleep(1.0)
    missing = sum(not p.is_file() for p in paths)
    if missing:
        print(f"contact sheet: {missing} of its {len(paths)} images do not exist yet (grey); rerun shard 0 when "
              "the other shards are done to complete it", flush=True)
    grid = contact_sheet(paths, job.sheet_thumb)
    if grid is None:
        return None
    sheet = out / CONTACT_SHEET
    with atomic_file(sheet, overwrite=True) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return sheet


class JobError(cli.UserError):
    """A problem with the job's inputs, found before anything was written."""


def run(job: SampleJob) -> Path | None:
    """The whole job of this shard; returns the contact sheet (shard 0). Input problems raise ``JobError``
    before anything is written."""
    sharding.initialize_distributed(auto_detect=job.cluster == "auto")
    try:
        plan = prepare(job)
        pipe = load_pipeline(job) if plan.todo else None
    except (FileNotFoundError, ValueError, cli.UserError) as e:  # ValueError includes bad weights and LoRAs
        raise JobError(str(e)) from e
    settings = ", ".join(f"{name}={getattr(plan.settings, name)} from {plan.sources[name]}"
                         for name in FROM_LORA if name in plan.sources)
    print(f"sampler: timesteps {list(plan.settings.timesteps())}; {settings}", flush=True)
    mine = sum(r["index"] % plan.num_shards == plan.shard_index for r in plan.records)
    print(f"{len(plan.records)} images, shard {plan.shard_index} of {plan.num_shards} renders {mine}: "
          f"{mine - len(plan.todo)} already in {job.out}, {len(plan.todo)} to render", flush=True)
    return render(job, plan, pipe)


# --- command line: the flags are SampleJob's fields and SamplerSettings' fields --------------------------------

_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool, str: flags.DEFINE_string}


def _flag_fields(cls) -> list[tuple[str, dataclasses.Field, type]]:
    """(flag name, field, value type without None) of each field of ``cls`` that carries help text."""
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        if field.metadata.get("help"):
            kinds = [k for k in typing.get_args(hints[field.name]) if k is not type(None)] or [hints[field.name]]
            out.append((field.metadata.get("flag") or field.name, field, kinds[0]))  # tuple[X, ...]: X
    return out


def define_flags() -> None:
    """Every SampleJob and SamplerSettings field as a flag; the ``FROM_LORA`` settings also take 'auto'."""
    for cls in (SampleJob, SamplerSettings):
        for name, field, kind in _flag_fields(cls):
            help_text, choices = field.metadata["help"], field.metadata.get("choices")
            if cls is SamplerSettings and field.name in FROM_LORA:
                auto = {"grid_steps": "the LoRA's recorded solver_steps, else 250",
                        "w_prime": "(w_min + w_max)/2 of the LoRA's training guidance"}[field.name]
                default = AUTO if field.name in SampleJob.from_lora else field.default
                flags.DEFINE_string(name, default, f"{help_text}: a number, or '{AUTO}' = {auto}")
            elif choices:
                flags.DEFINE_enum(name, field.default, choices, help_text)
            elif isinstance(field.default, tuple):  # a repeatable flag
                define = flags.DEFINE_multi_float if kind is float else flags.DEFINE_multi_string
                define(name, list(field.default) or None, help_text)
            else:
                _DEFINE[kind](name, None if field.default is dataclasses.MISSING else field.default, help_text)
    flags.mark_flags_as_required([f.name for f in dataclasses.fields(SampleJob) if f.default is dataclasses.MISSING])


def job_from_flags(values: flags.FlagValues) -> SampleJob:
    """The SampleJob the parsed flags ask for."""
    settings, from_lora = {}, set()
    for name, field, kind in _flag_fields(SamplerSettings):
        value = values[name].value
        if field.name in FROM_LORA and value == AUTO:
            from_lora.add(field.name)
            continue
        if field.name in FROM_LORA and value is not None:
            try:
                value = kind(value)
            except ValueError:
                raise cli.UserError(f"--{name}={value!r} is neither a number nor '{AUTO}'") from None
        settings[field.name] = value
    job = {field.name: values[name].value for name, field, _ in _flag_fields(SampleJob)}
    job.update({name: tuple(value or ()) for name, value in job.items()
                if isinstance(SampleJob.__dataclass_fields__[name].default, tuple)})
    return SampleJob(**job, settings=SamplerSettings(**settings), from_lora=frozenset(from_lora))


define_flags()


@cli.guarded
def main(argv):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}: every setting is a --flag")
    console.route_logs(console.absl_verbosity(), to_file=False)
    sheet = run(job_from_flags(flags.FLAGS))
    if sheet is not None:
        print(f"contact sheet: {sheet}", flush=True)


if __name__ == "__main__":
    app.run(main)
