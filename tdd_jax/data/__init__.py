"""Image-text data for TDD training: readers, SDXL preprocessing, the emoji dataset, the resumable iterator.

``make_train_iterator(config.data)`` is what the trainer uses; see ``default_data_config`` for the fields.
Names are imported on first use, so that the config checks (``tdd_jax.data.config``) and everything that only
samples do not pull in grain and TensorFlow Datasets.
"""

import importlib

_EXPORTS = {
    "CacheSource": "cache", "write_cache": "cache",
    "default_data_config": "config", "validate_data_config": "config",
    "build_emoji_dataset": "emoji", "load_emoji": "emoji",
    "TrainIterator": "loader", "make_train_iterator": "loader",
    "SKIP_REASONS": "preprocess", "SDXLPreprocessor": "preprocess",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
