"""Labelled image grids for people to look at: the teacher's contact sheet and the trainer's side-by-side
comparison share one layout (a caption above each row of images, optional column titles, pixels enlarged with
nearest-neighbour so small samples stay legible)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

LABEL_HEIGHT, CELL_PAD = 16, 8


def to_grid(images: np.ndarray) -> np.ndarray:
    """(rows, cols, H, W, 3) uint8 -> one (rows·H, cols·W, 3) image, no labels or padding."""
    rows, cols, h, w, c = images.shape
    return images.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def labelled_grid(images: np.ndarray, row_labels: Sequence[str], *, column_labels: Sequence[str] | None = None,
                  per_row: int = 1, zoom: int = 2) -> Image.Image:
    """uint8 ``images`` (rows, cols, H, W, 3) as one picture: each row is a cell (its label above its images side
    by side), ``per_row`` cells to a line; ``column_labels`` (one per image column) head every line of cells."""
    rows, cols, h, w, _ = images.shape
    if len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows of images")
    if column_labels is not None and len(column_labels) != cols:
        raise ValueError(f"{len(column_labels)} column labels for {cols} columns of images")
    header = LABEL_HEIGHT if column_labels is not None else 0
    cell_w, cell_h = cols * w * zoom + CELL_PAD, h * zoom + LABEL_HEIGHT + CELL_PAD
    lines = -(-rows // per_row)
    sheet = Image.new("RGB", (per_row * cell_w, header + lines * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    if column_labels is not None:
        for cell in range(min(per_row, rows)):
            for j, label in enumerate(column_labels):
                draw.text((cell * cell_w + j * w * zoom + 2, 2), label, fill="black")
    for i, label in enumerate(row_labels):
        x, y = (i % per_row) * cell_w, header + (i // per_row) * cell_h
        draw.text((x + 2, y + 2), label, fill="black")
        strip = Image.fromarray(np.concatenate(list(images[i]), axis=1))
        sheet.paste(strip.resize((strip.width * zoom, strip.height * zoom), Image.Resampling.NEAREST),
                    (x, y + LABEL_HEIGHT))
    return sheet
