"""Shared by the tests that run the trainer's command line: a tiny image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def red_cat_folder(data: Path, count: int) -> Path:
    """``count`` copies of one 16x16 image (a red square on white) captioned "a red cat", as a folder source."""
    data.mkdir(parents=True, exist_ok=True)
    image = np.full((16, 16, 3), 255, np.uint8)
    image[4:12, 4:12] = (220, 30, 30)
    for i in range(count):
        Image.fromarray(image).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text("a red cat")
    return data
