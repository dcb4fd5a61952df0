"""Where a LoRA comes from, a ``.safetensors`` file or a trainer checkpoint, and what it says about its training.

One dispatch for everything that reads a LoRA (the pipeline, the fused-UNet conversion, the sampling job), so a
file and a checkpoint are told apart in one place. Both carry the trainer's metadata
(``training.checkpointing.lora_metadata``): a checkpoint as JSON, an exported file in its safetensors header,
strings as they are and every other value JSON-encoded (``header_metadata``; ``read_header`` reverses it).

Several LoRAs (a distillation LoRA stacked with style LoRAs) are ``LoRASpec`` lists; the sampler defaults come
from the one LoRA whose metadata records distillation settings (``settings_source``), never from a guess.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from tdd_jax.cli import UserError
from tdd_jax.models import lora_formats

# The metadata that says how a LoRA was trained and that sampling needs (None where a LoRA does not record it):
# the guidance range and mode (guidance-scale tuning, paper Eq. 14) and the solver grid of its timesteps.
TRAINED_WITH = ("method", "step", "ema", "w_min", "w_max", "guidance_mode", "solver_steps", "k_min", "k_max")
# The TRAINED_WITH entries that set sampler defaults: a LoRA recording any of them is a distillation LoRA.
SAMPLER_DEFAULTS = ("w_min", "w_max", "guidance_mode", "solver_steps", "k_min", "k_max")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """One LoRA to load: a file or trainer checkpoint (``step``/``ema`` pick its adapter) and its strength."""

    path: str
    scale: float = 1.0
    step: int | None = None
    ema: bool = False

    @classmethod
    def parse(cls, text: str, **checkpoint) -> LoRASpec:
        """``PATH`` or ``PATH:SCALE`` (as ``--lora`` takes it): a number after the last ':' is the strength."""
        path, sep, tail = str(text).rpartition(":")
        try:
            return cls(path, float(tail), **checkpoint) if sep and path else cls(str(text), **checkpoint)
        except ValueError:
            return cls(str(text), **checkpoint)


def as_specs(lora, *, step: int | None = None, ema: bool = False) -> list[LoRASpec]:
    """LoRAs as an API takes them: None, one path, or a sequence of paths and ``LoRASpec``s (bare paths get
    strength 1 and the given checkpoint ``step``/``ema``)."""
    if lora is None:
        return []
    items = [lora] if isinstance(lora, (str, Path, LoRASpec)) else list(lora)
    return [item if isinstance(item, LoRASpec) else LoRASpec(str(item), step=step, ema=ema) for item in items]


def header_metadata(meta: Mapping, extra: Mapping[str, str] = ()) -> dict[str, str]:
    """Training metadata as safetensors header strings (non-strings JSON-encoded), plus ``extra``."""
    out = {"format": "pt"}
    for key, value in meta.items():
        out[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if "targets" in meta:
        out["target_modules"] = out["targets"]
    out.update(extra)
    return out


class LoRAFileError(UserError, ValueError):
    """A LoRA path that does not exist, or a file that is not a readable .safetensors file."""


def _decode(header: Mapping[str, str]) -> dict[str, Any]:
    """``header_metadata`` reversed: JSON values decoded, other strings kept as they are."""
    out = {}
    for key, value in header.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def read_header(path: str | Path) -> dict[str, Any]:
    """The metadata of a LoRA file's safetensors header, JSON values decoded (no tensors are read)."""
    path = Path(path)
    if not path.is_file():
        raise LoRAFileError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return _decode(f.metadata() or {})
    except SafetensorError as e:  # not safetensors, or cut short: its header does not cover the file
        raise LoRAFileError(f"LoRA file {path} is not a readable .safetensors file ({e})") from None


def is_file(path: str | Path) -> bool:
    """A LoRA file (else: a trainer workdir / checkpoint folder); ``LoRAFileError`` when it is neither."""
    path = Path(path)
    if not path.exists():
        raise LoRAFileError(f"LoRA {path} does not exist")
    if not (path.is_file() or path.is_dir()):
        raise LoRAFileError(f"LoRA {path} is neither a .safetensors file nor a trainer checkpoint folder")
    return path.is_file()


def read_metadata(path: str | Path, *, step: int | None = None) -> dict[str, Any]:
    """The metadata of a LoRA file or a checkpoint (at ``step`` or the latest), without reading any weights."""
    if is_file(path):
        return read_header(path)
    from tdd_jax.training.checkpointing import checkpoint_metadata  # orbax: only for trainer checkpoints

    return checkpoint_metadata(path, step=step)


def trained_with(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The ``TRAINED_WITH`` entries of a LoRA's metadata (None where it has none)."""
    return {key: meta.get(key) for key in TRAINED_WITH}


def read_lora(path: str | Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]], *, step: int | None = None,
              ema: bool = False) -> tuple[dict[str, dict[str, lora_formats.ModuleLoRA]], dict[str, Any]]:
    """({component: LoRA} checked against ``shapes`` ({component: layer shapes}), metadata).

    ``path``: a diffusers/PEFT or kohya ``.safetensors`` file (any of ``shapes``' components) or a trainer
    workdir / checkpoint folder (its UNet LoRA, online or EMA, at ``step`` or the latest).
    """
    if is_file(path):
        read_header(path)  # a file that is not safetensors is named here, not deep in the reader
        loras, header = lora_formats.read_lora_file(path, shapes)
        return loras, _decode(header)
    from tdd_jax.training.checkpointing import checkpoint_lora  # orbax: only for trainer checkpoints

    lora, meta = checkpoint_lora(path, step=step, ema=ema)
    try:
        lora_formats.check_fits(lora, shapes["unet"], "the base UNet")
    except lora_formats.LoRAFormatError as e:
        raise lora_formats.LoRAFormatError(f"{path}: {e}") from None
    return {"unet": lora}, meta


def settings_source(metas: Sequence[tuple[str, Mapping[str, Any]]], settings_from: int | None = None) -> int | None:
    """Which of several LoRAs' metadata ((label, metadata) each) sets the sampler defaults (grid, w range).

    ``settings_from`` (an index) when given; else the LoRA whose metadata records distillation settings
    (``SAMPLER_DEFAULTS``), None when none does. Two that record different settings are a ValueError naming both
    (identical records, e.g. the same LoRA twice, agree).
    """
    if settings_from is not None:
        if not 0 <= settings_from < len(metas):
            raise ValueError(f"lora_settings_from={settings_from} is not the index of one of the {len(metas)} "
                             f"LoRAs (0 = the first)")
        return settings_from
    recorded = [i for i, (_, meta) in enumerate(metas) if any(meta.get(k) is not None for k in SAMPLER_DEFAULTS)]
    first = {k: metas[recorded[0]][1].get(k) for k in SAMPLER_DEFAULTS} if recorded else {}
    for i in recorded[1:]:
        other = {k: metas[i][1].get(k) for k in SAMPLER_DEFAULTS}
        differ = [f"{k}={first[k]!r} vs {other[k]!r}" for k in SAMPLER_DEFAULTS if first[k] != other[k]]
        if differ:
            raise ValueError(f"LoRAs {metas[recorded[0]][0]} (index {recorded[0]}) and {metas[i][0]} (index {i}) "
                             f"both record distillation settings and they differ ({', '.join(differ)}): set "
                             "lora_settings_from (--lora_settings_from) to the index of the one that sets the "
                             "sampler defaults")
    return recorded[0] if recorded else None
