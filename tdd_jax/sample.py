"""Batch sampling job: render a prompt file with the TDD sampler into PNGs, a metadata JSONL and a contact sheet.

    python -m tdd_jax.sample --pipeline=DIR --prompts=prompts.txt --out=samples/ [--lora=lora.safetensors]
        [--steps=4 --gamma=0.2 --guidance_scale=1.7 --w_prime=auto|W --grid_steps=auto|N --non_equidistant]
        [--seed=0 --height=1024 --width=1024 --batch_size=4 --dtype=bfloat16 --num_shards=N --shard_index=K]

Prompts: a .txt file (one per line) or a .jsonl file ({"prompt": ..., "seed": ..., "negative_prompt": ...};
seed and negative prompt optional). Prompt i without a seed gets --seed + i. Every image's file name is its index
plus a digest of everything that decides it (prompt, seed, size, sampler settings, pipeline, LoRA and how it was
trained), so re-running the same job skips what is already written and a changed setting renders anew. Inputs are
checked before anything is written; PNGs appear atomically and each gets its metadata line only once it exists.

Settings from the LoRA. ``--grid_steps`` defaults to the solver grid the LoRA records (``solver_steps``), else
250; ``--w_prime=auto`` is w' = (w_min + w_max)/2 of the LoRA's training guidance (paper Eq. 14). w' is refused
on a student distilled in guidance mode 'official' unless ``--allow_w_prime_official``. Each setting's flag,
default and help come from its ``SamplerSettings`` field.

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

from tdd_jax import cli, console, lora_source
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
    lora: str | None = _flag(None, "LoRA .safetensors (diffusers/kohya) or trainer workdir / checkpoint folder")
    lora_scale: float = _flag(1.0, "LoRA multiplier")
    lora_step: int | None = _flag(None, "checkpoint step of a trainer LoRA (default: the latest)")
    lora_ema: bool = _flag(False, "use the EMA LoRA of a trainer checkpoint")
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


def resolve_settings(job: SampleJob, meta: dict[str, Any] | None) -> tuple[SamplerSettings, dict[str, str]]:
    """(the sampler settings with ``job.from_lora`` filled from the LoRA's metadata, where each came from).

    ``meta``: the LoRA's metadata (None without a LoRA). ValueError when ``--w_prime=auto`` finds no guidance
    range, or when w' would be used on a student trained in guidance mode 'official' without the override.
    """
    unknown = sorted(job.from_lora - set(FROM_LORA))
    if unknown:
        raise ValueError(f"from_lora={unknown}: only {FROM_LORA} can come from the LoRA's metadata")
    settings, sources, meta = job.settings, {}, meta or {}
    what = f"--lora {job.lora}"
    if "grid_steps" not in job.from_lora:
        sources["grid_steps"] = "--grid_steps"
    elif meta.get("solver_steps") is not None:
        settings = dataclasses.replace(settings, grid_steps=int(meta["solver_steps"]))
        sources["grid_steps"] = f"the LoRA's metadata (solver_steps={settings.grid_steps})"
    else:
        sources["grid_steps"] = f"the default ({'no LoRA' if job.lora is None else what + ' records no solver_steps'})"
    if "w_prime" in job.from_lora:
        if job.lora is None or meta.get("w_min") is None or meta.get("w_max") is None:
            raise ValueError(f"--w_prime=auto needs a LoRA whose metadata records its training guidance range "
                             f"(w_min, w_max); {'no --lora given' if job.lora is None else what + ' has none'}: "
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


def plan_images(job: SampleJob, settings: SamplerSettings, specs: list[dict[str, Any]], height: int, width: int,
                trained: dict[str, Any] | None, sources: dict[str, str]) -> list[dict[str, Any]]:
    """One metadata record per image, its deterministic ``file`` name included. The digest covers what decides
    the image, not where a setting came from or how the job is sharded."""
    common = {"height": height, "width": width, **dataclasses.asdict(settings),
              "timesteps": list(settings.timesteps()), "pipeline": str(Path(job.pipeline).resolve()),
              "lora": None if job.lora is None else str(Path(job.lora).resolve()), "lora_scale": job.lora_scale,
              "lora_step": job.lora_step, "lora_ema": job.lora_ema, "lora_trained": trained, "dtype": job.dtype}
    records = []
    for index, spec in enumerate(specs):
        record = {**spec, **common}
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
    specs = read_prompts(job.prompts, job.seed, job.negative_prompt)
    bad = [spec["seed"] for spec in specs if not 0 <= spec["seed"] <= MAX_SEED]
    if bad:
        raise ValueError(f"seeds must be in [0, {MAX_SEED}], got {bad[:5]}")
    geometry = ImageGeometry.from_pretrained(check_pipeline_dir(job.pipeline))
    height = geometry.default_size if job.height is None else job.height
    width = geometry.default_size if job.width is None else job.width
    geometry.latent_shape(height, width)
    meta = None if job.lora is None else lora_source.read_metadata(job.lora, step=job.lora_step)
    settings, sources = resolve_settings(job, meta)
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
    return TDDPipeline.from_pretrained(job.pipeline, lora=job.lora, lora_scale=job.lora_scale,
                                       lora_step=job.lora_step, lora_ema=job.lora_ema,
                                       opts=ModelOptions(dtype=dtype, param_dtype=dtype),
                                       mesh=sharding.make_mesh(data=-1, fsdp=1, devices=jax.local_devices()))


def _write_batch(out: Path, log: MetadataLog, batch: list[dict[str, Any]], images: np.ndarray) -> None:
    for record, image in zip(batch, images):
        write_png(out / record["file"], image)
        log.add(record)


def _render_todo(job: SampleJob, plan: Plan, pipe: TDDPipeline, log: MetadataLog) -> None:
    """Render ``plan.todo`` batch by batch; a background thread writes each batch while the next one renders."""
    out = Path(job.out)
    start = time.perf_counter()
    first_done = first_count = None
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="png-writer") as writer, \
            console.progress(len(plan.todo), "sampling", "img") as bar:
        pending = collections.deque()
        for begin in range(0, len(plan.todo), job.batch_size):
            batch = plan.todo[begin:begin + job.batch_size]
            images = pipe([r["prompt"] for r in batch], plan.settings, seeds=[r["seed"] for r in batch],
                          negative_prompts=[r["negative_prompt"] for r in batch], height=batch[0]["height"],
                          width=batch[0]["width"], batch_size=job.batch_size)
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
            out.append((field.metadata.get("flag") or field.name, field, kinds[0]))
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
