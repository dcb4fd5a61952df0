"""Image-text data for TDD training: readers, SDXL preprocessing, the emoji dataset, the resumable iterator.

``make_train_iterator(config.data)`` is what the trainer uses; see ``default_data_config`` for the fields.
"""

from tdd_jax.data.cache import CacheSource, write_cache
from tdd_jax.data.config import default_data_config, validate_data_config
from tdd_jax.data.emoji import build_emoji_dataset, load_emoji
from tdd_jax.data.loader import TrainIterator, make_train_iterator
from tdd_jax.data.preprocess import SKIP_REASONS, SDXLPreprocessor

__all__ = [
    "CacheSource", "SDXLPreprocessor", "SKIP_REASONS", "TrainIterator", "build_emoji_dataset",
    "default_data_config", "load_emoji", "make_train_iterator", "validate_data_config", "write_cache",
]
