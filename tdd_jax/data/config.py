"""The ``data`` section of a training config: its fields, defaults and checks.

Checked before any data is read (and so before any compilation), with errors naming the ``data.<field>``.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from tdd_jax.data.preprocess import INTERPOLATIONS

SOURCES = ("emoji", "webdataset", "folder", "cache")


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults for ``cfg.data``; each field's comment says what it means and which sources use it."""
    c = ml_collections.ConfigDict()
    c.source = "emoji"  # 'emoji' | 'webdataset' | 'folder' | 'cache'.
    # emoji: TFDS data_dir ("" = TFDS default); webdataset: .tar shard glob/brace pattern
    # ("/data/laion/{00000..01023}.tar"); folder: root dir of images + same-name .txt; cache: write_cache's out_dir.
    c.path = ""
    c.split = "train"  # emoji only: 'train' or the fixed ~5% held-out 'test'.
    c.emoji_image_size = 64  # emoji only: size the glyphs are rendered at (before the resize to resolution).
    c.emoji_groups = ()  # emoji only: keep just these groups' emoji (names from emoji-test.txt); () = all.
    # Pixel sources: SDXL preprocessing (resize shorter side, crop to resolution², optional flip).
    c.resolution = 1024
    c.center_crop = False  # False = uniform random crop.
    c.random_flip = False
    c.interpolation = "bilinear"  # 'bilinear' | 'bicubic' | 'lanczos' | 'area' (all antialiased).
    # SDXL micro-conditioning: False = time_ids describe each image's real size and crop (SDXL's own training,
    # diffusers' train_text_to_image_sdxl.py); True = fixed (R, R, 0, 0, R, R) for every image, as the official TDD
    # run (--use_fix_crop_and_size); applied at load time, to cached examples too.
    c.fixed_time_ids = False
    c.min_image_size = 0  # Images whose shorter side is below this are skipped (and counted).
    # Batching and order (all sources).
    c.batch_size = 16  # Global examples per step; each process yields its batch_size // process_count of them.
    c.seed = 0  # Shuffle and augmentation seed; the global batches are a function of (seed, step) only.
    c.shuffle = True  # Reshuffled every epoch.
    c.num_epochs = config_dict.placeholder(int)  # None = repeat forever (training); 1 = one pass (caching).
    c.drop_remainder = True  # Drop a last partial batch (only happens when num_epochs is set).
    # Throughput (not part of the order: the same batches come out whatever these are).
    # Decode in this many child processes (0 = in-process threads only). Workers need absl flags parsed
    # (app.run) and the entry point under `if __name__ == "__main__":`.
    c.num_workers = 0
    c.num_threads = 8  # Read/decode threads per process (or per worker).
    c.prefetch_buffer_size = 64  # Examples read ahead per process (or per worker).
    return c


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(index, count) of this process: given explicitly (both or neither; tests fake several) or JAX's."""
    if (process_index is None) != (process_count is None):
        raise ValueError("Pass both process_index and process_count, or neither (to use JAX's).")
    if process_index is None:
        import jax  # Only here, so that readers and tests need no JAX backend.
        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, process_count={process_count}).")
    return process_index, process_count


def validate_data_config(cfg: ml_collections.ConfigDict, process_count: int) -> None:
    """Raise ValueError naming the first unknown, missing or inconsistent ``data.<field>``."""
    expected = set(default_data_config().keys())
    unknown, missing = sorted(set(cfg.keys()) - expected), sorted(expected - set(cfg.keys()))
    if unknown:
        raise ValueError(f"Unknown data config field(s) {['data.' + f for f in unknown]}; "
                         f"known: {sorted(expected)}.")
    if missing:
        raise ValueError(f"Missing data config field(s) {['data.' + f for f in missing]}; "
                         "start from tdd_jax.data.default_data_config().")

    def check(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise ValueError(f"data.{field}={cfg[field]!r}: {why}.")

    check(cfg.source in SOURCES, "source", f"must be one of {SOURCES}")
    check(cfg.source == "emoji" or bool(cfg.path), "path", f"is required for source {cfg.source!r}")
    check(cfg.source == "emoji" or cfg.split == "train", "split", "only the emoji source has other splits")
    check(cfg.emoji_image_size > 0, "emoji_image_size", "must be positive")
    check(cfg.resolution > 0, "resolution", "must be positive")
    check(cfg.interpolation in INTERPOLATIONS, "interpolation", f"must be one of {tuple(INTERPOLATIONS)}")
    check(cfg.min_image_size >= 0, "min_image_size", "must be >= 0")
    check(cfg.batch_size > 0 and cfg.batch_size % process_count == 0, "batch_size",
          f"must be a positive multiple of the process count {process_count}")
    check(0 <= cfg.seed < 2**32, "seed", "must be in [0, 2**32)")
    check(cfg.num_epochs is None or cfg.num_epochs > 0, "num_epochs", "must be None (forever) or positive")
    check(cfg.num_workers >= 0, "num_workers", "must be >= 0")
    check(cfg.num_threads >= 1, "num_threads", "must be >= 1")
    check(cfg.prefetch_buffer_size >= 1, "prefetch_buffer_size", "must be >= 1")
