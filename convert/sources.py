"""Where a LoRA to convert comes from (a trainer checkpoint or a LoRA file), and the output dtypes offered."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from tdd_jax.models import lora_formats
from tdd_jax.training.checkpointing import checkpoint_lora

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def lora_source(path: str | Path, shapes: Mapping[str, tuple[int, ...]], *, step: int | None = None,
                ema: bool = False):
    """(UNet LoRA checked against ``shapes``, metadata) from a ``.safetensors`` LoRA file or a checkpoint."""
    path = Path(path)
    if path.is_file():
        loras, meta = lora_formats.read_lora_file(path, {"unet": shapes})
        return loras["unet"], meta
    lora, meta = checkpoint_lora(path, step=step, ema=ema)
    lora_formats.check_fits(lora, shapes, "the base UNet")
    return lora, meta
