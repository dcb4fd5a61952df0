"""Where a LoRA to convert comes from (a trainer checkpoint or a LoRA file), and the output dtypes offered."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from tdd_jax.lora_source import read_lora

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def lora_source(path: str | Path, shapes: Mapping[str, tuple[int, ...]], *, step: int | None = None,
                ema: bool = False):
    """(UNet LoRA checked against ``shapes``, metadata) from a ``.safetensors`` LoRA file or a checkpoint."""
    loras, meta = read_lora(path, {"unet": shapes}, step=step, ema=ema)
    return loras["unet"], meta
