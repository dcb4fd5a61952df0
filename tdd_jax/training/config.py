"""Trainer config checks that run before anything is loaded or compiled.

A typo or an inconsistent value in a pod job should cost seconds, not a compile of SDXL: ``validate`` rejects
unknown fields, wrong types, bad enum values, out-of-range numbers and cross-field inconsistencies (k_min > k_max,
a batch the devices cannot split, a mesh that does not fit, a pipeline folder that is missing a component) with
a ``ConfigError`` that names the field. ``cfg.data`` belongs to the data pipeline and is checked there.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections

from tdd_jax.data.config import validate_data_config
from tdd_jax.diffusion.targets import KINDS, TargetRule
from tdd_jax.models.layers import REMAT_POLICIES
from tdd_jax.training.sharding import LORA_SHARDINGS, mesh_shape

GUIDANCE_MODES = ("decoupled", "official")  # paper: no CFG on empty-prompt samples; official: train_tdd.py
DEFAULT_TIMESTEPS = 1000  # SDXL's, for checks that run without the pipeline folder
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: CPU numerics checks (needs jax_enable_x64)
LOSS_KINDS = ("huber", "l2")
LR_SCHEDULES = ("constant", "warmup", "cosine")
ATTENTION_IMPLS = (None, "xla", "cudnn", "splash")  # splash: Pallas TPU kernel (models.layers.attention)
# Components of a diffusers SDXL folder the trainer reads, with the file that must exist in each.
PIPELINE_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                  "text_encoder_2/config.json", "tokenizer/vocab.json", "tokenizer_2/vocab.json",
                  "scheduler/scheduler_config.json")

# Every trainer field and the values it accepts: a type (int is accepted for float), a tuple of allowed values,
# or (type, None) for optional fields.
FIELDS = {
    "pipeline_dir": str,
    "resolution": int,
    "seed": int,
    "num_train_steps": int,
    "log_every": int,
    "max_nonfinite_steps": int,
    "ema_decay": float,
    "lora.rank": int,
    "lora.alpha": float,
    "lora.targets": tuple,
    "solver.num_steps": int,
    "target.kind": KINDS,
    "target.k_min": int,
    "target.k_max": int,
    "target.bound": (int, None),
    "target.eta": float,
    "target.pcm_phases": int,
    "guidance.w_min": float,
    "guidance.w_max": float,
    "guidance.rho": float,
    "guidance.mode": GUIDANCE_MODES,
    "loss.kind": LOSS_KINDS,
    "loss.huber_c": float,
    "optim.lr": float,
    "optim.b1": float,
    "optim.b2": float,
    "optim.eps": float,
    "optim.weight_decay": float,
    "optim.grad_clip": float,
    "optim.schedule": LR_SCHEDULES,
    "optim.warmup_steps": int,
    "batch.global_batch": int,
    "batch.grad_accum": int,
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.remat": tuple(REMAT_POLICIES),
    "model.attention_impl": ATTENTION_IMPLS,
    "model.scan_blocks": bool,
    "mesh.data": int,
    "mesh.fsdp": int,
    "mesh.min_shard_size": int,
    "mesh.lora_sharding": LORA_SHARDINGS,
    "mesh.windowed_einsum": bool,
    "checkpoint.every": int,
    "checkpoint.keep": int,
    "validation.every": int,
    "validation.prompts": tuple,
    "validation.seed": int,
    "validation.steps": tuple,
    "validation.guidance_scale": float,
    "validation.gamma": float,
    "validation.teacher_steps": int,
    "validation.teacher_guidance_scale": float,
    "adv.enabled": bool,
    "adv.g_weight": float,
    "adv.lr": float,
    "adv.b1": float,
    "adv.b2": float,
    "adv.eps": float,
    "adv.weight_decay": float,
    "adv.grad_clip": float,
    "adv.window": int,
    "adv.head_groups": int,
}
EXTERNAL = ("data",)  # subtrees validated by their own module


class ConfigError(ValueError):
    """An unknown, mistyped or inconsistent config field; the message starts with the field's name."""


def flatten(cfg, prefix: str = "", keep: tuple[str, ...] = ()) -> dict:
    """{'a.b': value} for every leaf field; subtrees named in ``keep`` stay whole."""
    out = {}
    for key, value in cfg.items():
        name = prefix + key
        if isinstance(value, (ml_collections.ConfigDict, dict)) and name not in keep:
            out.update(flatten(value, name + ".", keep))
        else:
            out[name] = value
    return out


def _check_type(name: str, value, spec) -> None:
    if isinstance(spec, tuple) and spec and isinstance(spec[0], type):  # (type, None): optional
        if value is None:
            return
        spec = spec[0]
    if isinstance(spec, tuple):
        if value not in spec:
            raise ConfigError(f"{name}={value!r} is not one of {spec}")
        return
    ok = isinstance(value, spec) and not (spec is int and isinstance(value, bool))
    if spec is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec is tuple:
        ok = isinstance(value, (tuple, list))
    if not ok:
        raise ConfigError(f"{name}={value!r} must be a {spec.__name__}")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def per_device_batch(cfg, num_devices: int) -> int:
    """Micro-batch per device: global_batch = per_device × devices × grad_accum."""
    return cfg.batch.global_batch // (num_devices * cfg.batch.grad_accum)


def validate(cfg, *, num_devices: int | None = None, process_count: int | None = None,
             check_pipeline: bool = True, check_data: bool = True) -> None:
    """Raise ``ConfigError`` naming the first bad field; cheap, touches no model or device memory.

    check_pipeline / check_data: also check the pipeline folder / ``cfg.data`` (the train step alone, built on
    an already loaded pipeline and fed by the caller, checks neither)."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    flat = flatten(cfg, keep=EXTERNAL)
    unknown = sorted(set(flat) - set(FIELDS) - set(EXTERNAL))
    _require(not unknown, unknown[0] if unknown else "", "unknown config field")
    missing = sorted(set(FIELDS) - set(flat) | set(EXTERNAL) - set(flat))
    _require(not missing, missing[0] if missing else "", "missing config field")
    for name, spec in FIELDS.items():
        _check_type(name, flat[name], spec)

    if check_pipeline:
        _require(bool(cfg.pipeline_dir), "pipeline_dir",
                 "is not set (a diffusers SDXL folder; e.g. --config.pipeline_dir=$SDXL_DIR)")
        root = Path(cfg.pipeline_dir)
        _require(root.is_dir(), "pipeline_dir", f"{root} is not a directory")
        absent = [f for f in PIPELINE_FILES if not (root / f).is_file()]
        _require(not absent, "pipeline_dir", f"{root} lacks pipeline files {absent}")

    positive = ("resolution", "num_train_steps", "log_every", "max_nonfinite_steps", "lora.rank", "solver.num_steps",
                "target.k_min", "target.pcm_phases", "batch.global_batch", "batch.grad_accum",
                "checkpoint.every", "checkpoint.keep", "validation.every")
    for name in positive:
        _require(flat[name] > 0, name, f"{flat[name]} must be > 0")
    _require(flat["mesh.min_shard_size"] >= 0, "mesh.min_shard_size",
             f"{flat['mesh.min_shard_size']} must be >= 0 (0: split every divisible array)")
    _require(flat["lora.alpha"] > 0, "lora.alpha", f"{flat['lora.alpha']} must be > 0")
    _require(len(flat["lora.targets"]) > 0, "lora.targets", "must name at least one module")
    _require(cfg.resolution % 8 == 0, "resolution", f"{cfg.resolution} must be a multiple of 8 (VAE factor)")
    _require(0.0 <= cfg.ema_decay < 1.0, "ema_decay", f"{cfg.ema_decay} must be in [0, 1) (0: online LoRA target)")

    try:  # the target rule's own checks, with its timestep count from the pipeline when it is read
        TargetRule.from_config(cfg, _num_train_timesteps(cfg) if check_pipeline else DEFAULT_TIMESTEPS)
    except ValueError as e:
        raise ConfigError(str(e)) from e

    g = cfg.guidance
    _require(g.w_min >= 0, "guidance.w_min", f"{g.w_min} must be >= 0")
    _require(g.w_min <= g.w_max, "guidance.w_min", f"w_min={g.w_min} > guidance.w_max={g.w_max}")
    _require(0.0 <= g.rho <= 1.0, "guidance.rho", f"{g.rho} must be in [0, 1]")
    _require(cfg.loss.huber_c > 0, "loss.huber_c", f"{cfg.loss.huber_c} must be > 0")

    o = cfg.optim
    _require(o.lr > 0, "optim.lr", f"{o.lr} must be > 0")
    for name in ("b1", "b2"):
        _require(0.0 <= o[name] < 1.0, f"optim.{name}", f"{o[name]} must be in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"{o.weight_decay} must be >= 0")
    _require(o.eps > 0, "optim.eps", f"{o.eps} must be > 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"{o.grad_clip} must be >= 0 (0: no clipping)")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"{o.warmup_steps} must be >= 0")
    _require(o.schedule != "warmup" or o.warmup_steps > 0, "optim.warmup_steps",
             "must be > 0 with optim.schedule='warmup'")

    b = cfg.batch
    _require(b.global_batch % (num_devices * b.grad_accum) == 0, "batch.global_batch",
             f"{b.global_batch} is not divisible by {num_devices} devices x batch.grad_accum={b.grad_accum}")
    try:
        mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, num_devices)
    except ValueError as e:
        raise ConfigError(str(e).removeprefix("config ")) from e

    a = cfg.adv
    _require(a.g_weight >= 0, "adv.g_weight", f"{a.g_weight} must be >= 0 (0: the heads train, the LoRA ignores them)")
    _require(a.lr > 0, "adv.lr", f"{a.lr} must be > 0")
    for name in ("b1", "b2"):
        _require(0.0 <= a[name] < 1.0, f"adv.{name}", f"{a[name]} must be in [0, 1)")
    _require(a.eps > 0, "adv.eps", f"{a.eps} must be > 0")
    _require(a.weight_decay >= 0, "adv.weight_decay", f"{a.weight_decay} must be >= 0")
    _require(a.grad_clip >= 0, "adv.grad_clip", f"{a.grad_clip} must be >= 0 (0: no clipping)")
    _require(a.window > 0, "adv.window", f"{a.window} must be > 0 (gan_t ~ U{{tau .. min(tau + window, T) - 1}})")
    _require(a.head_groups > 0, "adv.head_groups", f"{a.head_groups} must be > 0 (and divide every head's width)")
    if check_pipeline and a.enabled:
        check_head_groups(a.head_groups, _unet_widths(cfg))

    if check_data:
        _validate_data(cfg, process_count)

    v = cfg.validation
    _require(len(v.prompts) > 0, "validation.prompts", "needs at least one prompt")
    _require(all(isinstance(n, int) and n > 0 for n in v.steps), "validation.steps",
             f"{v.steps} must be positive step counts")
    _require(0.0 <= v.gamma <= 1.0, "validation.gamma", f"{v.gamma} must be in [0, 1]")
    _require(v.guidance_scale >= 1.0, "validation.guidance_scale", f"{v.guidance_scale} must be >= 1 (1: no CFG)")
    _require(v.teacher_steps >= 0, "validation.teacher_steps", f"{v.teacher_steps} must be >= 0 (0: no teacher column)")
    _require(v.teacher_guidance_scale >= 1.0, "validation.teacher_guidance_scale",
             f"{v.teacher_guidance_scale} must be >= 1 (1: no CFG)")


def check_head_groups(groups: int, widths) -> None:
    """The discriminator heads' GroupNorm groups must divide every feature level's width (``adv.head_groups``)."""
    odd = [c for c in widths if c % groups]
    _require(not odd, "adv.head_groups", f"{groups} must divide every discriminator head's width; this UNet has a "
             f"{odd[0] if odd else 0}-channel feature level")


def _pipeline_json(cfg, component: str) -> dict:
    """A JSON file of the pipeline folder (checked to exist before this runs), or a ConfigError naming it."""
    import json

    path = Path(cfg.pipeline_dir) / component
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"pipeline_dir: cannot read {path}: {e}") from e


def _unet_widths(cfg) -> list[int]:
    """The widths of the UNet encoder's feature levels (its down blocks and mid block)."""
    channels = list(_pipeline_json(cfg, "unet/config.json").get("block_out_channels", ()))
    _require(bool(channels), "pipeline_dir", f"{cfg.pipeline_dir}/unet/config.json has no block_out_channels")
    return channels + channels[-1:]


def _num_train_timesteps(cfg) -> int:
    """The pipeline scheduler's training timestep count."""
    return int(_pipeline_json(cfg, "scheduler/scheduler_config.json").get("num_train_timesteps", DEFAULT_TIMESTEPS))


def _validate_data(cfg, process_count: int) -> None:
    """``cfg.data`` against the rest of the config, then by the data pipeline's own rules."""
    batch = cfg.batch.global_batch
    _require(cfg.data.batch_size == batch, "data.batch_size",
             f"{cfg.data.batch_size} != batch.global_batch={batch} (one step reads one global batch)")
    _require(cfg.data.resolution == cfg.resolution, "data.resolution",
             f"{cfg.data.resolution} != resolution={cfg.resolution}")
    try:
        validate_data_config(cfg.data, process_count)
    except ValueError as e:
        raise ConfigError(str(e)) from e
