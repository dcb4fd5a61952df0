"""The shared layout of the teacher's contact sheet and the trainer's side-by-side comparison."""

import numpy as np
import pytest

from tdd_jax.image_grid import labelled_grid


def test_cells_per_line_and_zoom():
    images = np.zeros((3, 2, 8, 8, 3), np.uint8)
    images[2, 1] = 255  # last row, second image: white
    sheet = np.asarray(labelled_grid(images, ["a", "b", "c"], per_row=2, zoom=2))
    # 2 cells a line, each 2 images of 16 px + padding; 2 lines of label + 16 px + padding.
    assert sheet.shape == (2 * (16 + 16 + 8), 2 * (2 * 16 + 8), 3)
    top = 16 + 16 + 8 + 16  # second line of cells, below its label
    assert (sheet[top:top + 16, 16:32] == 255).all() and (sheet[top:top + 16, :16] == 0).all()


def test_column_titles_add_a_header_and_are_drawn():
    images = np.full((2, 3, 8, 8, 3), 128, np.uint8)
    plain = np.asarray(labelled_grid(images, ["a", "b"]))
    titled = np.asarray(labelled_grid(images, ["a", "b"], column_labels=["teacher", "base", "student"]))
    assert titled.shape[0] == plain.shape[0] + 16 and titled.shape[1] == plain.shape[1]
    assert (titled[16:] == plain).all()
    assert (titled[:16] < 255).any()  # the titles' ink


def test_label_counts_must_match():
    images = np.zeros((2, 3, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="3 row labels for 2 rows"):
        labelled_grid(images, ["a", "b", "c"])
    with pytest.raises(ValueError, match="2 column labels for 3 columns"):
        labelled_grid(images, ["a", "b"], column_labels=["x", "y"])
