"""The training iterator: deterministic, sharded per process, resumable from a small JSON state.

The pipeline is a grain ``MapDataset`` (random access end to end):

    source -> this process's shard -> shuffle(seed) -> repeat(num_epochs) -> SDXL preprocessing (random_map)

so element ``i`` of the stream is a pure function of (config, process index/count, i): the shuffle reshuffles
every epoch from ``seed + epoch`` and the crop/flip randomness is seeded by ``i``. The iterator's state is
therefore just how many elements it has consumed (plus its counters). Resuming rebuilds the pipeline from
``dataset[consumed:]``, which gives exactly the batches an uninterrupted run would have seen, independent of
``num_threads`` / ``num_workers`` (which only change throughput) and without replaying any data.

Sharding: webdataset shards are split between processes by file (a process opens only its own ``.tar``s);
other sources are split by example (``[process_index::process_count]``), each process reading only its own.
Unusable examples arrive as skip records and are dropped and counted here, in the consuming process, so the
counts are exact, survive a resume (they are in the state) and are logged.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence

import grain
import ml_collections
import numpy as np
from absl import logging

from tdd_jax.data.cache import CacheSource
from tdd_jax.data.config import resolve_process, validate_data_config
from tdd_jax.data.emoji import EmojiSource, build_emoji_dataset
from tdd_jax.data.preprocess import SKIP_REASONS, SDXLPreprocessor
from tdd_jax.data.sources import ImageFolderSource, WebDatasetSource, list_shards

Tokenize = Callable[[Sequence[str]], Mapping[str, np.ndarray]]
STATE_VERSION = 1
# Config fields that decide which element comes next; a state saved under other values cannot be resumed.
_ORDER_FIELDS = ("source", "path", "split", "emoji_image_size", "emoji_groups", "resolution", "center_crop",
                 "random_flip", "interpolation", "min_image_size", "batch_size", "seed", "shuffle", "num_epochs")


class TrainIterator:
    """Yields this process's batches as dicts of numpy arrays; ``get_state``/``set_state`` for checkpoints.

    Pixel sources: ``pixels`` float32 (B,R,R,3) in [-1, 1], ``time_ids`` float32 (B,6), ``captions`` and
    ``keys`` (object arrays of str), plus ``tokenize(captions)``'s arrays. Cache source: the cached arrays
    (``latents``, ``prompt_embeds``, ``pooled_prompt_embeds``, ...), ``time_ids``, ``captions``, ``keys``.
    """

    def __init__(self, dataset: grain.MapDataset, *, shard_size: int, batch_size: int, drop_remainder: bool,
                 read_options: grain.ReadOptions, num_workers: int, tokenize: Tokenize | None,
                 fingerprint: dict):
        self._dataset = dataset
        self._shard_size = shard_size
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._read_options = read_options
        self._num_workers = num_workers
        self._tokenize = tokenize
        self._fingerprint = fingerprint
        self._consumed = 0  # Elements (kept or skipped) taken from the stream.
        self._batches = 0
        self._examples = 0
        self._skipped = collections.Counter()
        self._skip_run = 0  # Consecutive skips: a whole shard's worth means nothing usable is left.
        self._elements = None  # Started lazily, so that set_state before the first batch costs nothing.

    def __iter__(self):
        return self

    def _next_element(self) -> dict:
        if self._elements is None:
            stream = self._dataset[self._consumed:].to_iter_dataset(self._read_options)
            if self._num_workers:
                stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
            self._elements = iter(stream)
        element = next(self._elements)
        self._consumed += 1
        return element

    def _count_skip(self, record: dict) -> None:
        self._skipped[record["skip"]] += 1
        logging.log_every_n_seconds(
            logging.WARNING, "Data: skipped %s (%s%s); skipped so far: %s", 10.0, record["key"], record["skip"],
            f": {record['detail']}" if record["detail"] else "", dict(self._skipped))

    def __next__(self) -> dict[str, np.ndarray]:
        examples = []
        while len(examples) < self._batch_size:
            try:
                element = self._next_element()
            except StopIteration:
                if examples and not self._drop_remainder:
                    break
                raise
            if "skip" in element:
                self._count_skip(element)
                self._skip_run += 1
                if self._skip_run >= self._shard_size:
                    raise ValueError(f"Data: all {self._shard_size} examples of this process's shard of "
                                     f"data.path={self._fingerprint['path']!r} were skipped: {self.stats}.")
            else:
                examples.append(element)
                self._skip_run = 0
        batch = self._collate(examples)
        self._batches += 1
        self._examples += len(examples)
        return batch

    def _collate(self, examples: list[dict]) -> dict[str, np.ndarray]:
        batch = {"keys": np.array([e["key"] for e in examples], dtype=object),
                 "captions": np.array([e["caption"] for e in examples], dtype=object)}
        for name in examples[0]:
            if name not in ("key", "caption"):
                batch[name] = np.stack([e[name] for e in examples])
        if "pixels" in batch:  # uint8 until here: 4x less to move between worker processes.
            batch["pixels"] = batch["pixels"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        if self._tokenize is not None:
            for name, value in self._tokenize(list(batch["captions"])).items():
                value = np.asarray(value)
                if name in batch or value.ndim == 0 or value.shape[0] != len(examples):
                    raise ValueError(f"tokenize returned {name!r} with shape {value.shape}: it must be a new key "
                                     f"with leading dimension {len(examples)}.")
                batch[name] = value
        return batch

    @property
    def stats(self) -> dict:
        """Batches and examples yielded and examples skipped, by reason, since the start of the run."""
        return {"batches": self._batches, "examples": self._examples,
                "skipped": {r: self._skipped[r] for r in SKIP_REASONS},
                "skipped_total": sum(self._skipped.values())}

    def get_state(self) -> dict:
        """JSON-serialisable position and counters; store it with the checkpoint of the step it precedes."""
        return {"version": STATE_VERSION, "consumed": self._consumed, "batches": self._batches,
                "examples": self._examples, "skipped": dict(self._skipped), "config": dict(self._fingerprint)}

    def set_state(self, state: Mapping) -> None:
        """Continue from ``state``; the next batch is the one that followed it in the run that saved it."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Data iterator state version {state.get('version')!r}, expected {STATE_VERSION}.")
        saved = state["config"]
        changed = {f: (saved.get(f), v) for f, v in self._fingerprint.items() if saved.get(f) != v}
        if changed:
            raise ValueError("The data iterator state was saved under a different data order; changed "
                             f"(saved, now): {changed}.")
        self._consumed = int(state["consumed"])
        self._batches, self._examples = int(state["batches"]), int(state["examples"])
        self._skipped = collections.Counter(state["skipped"])
        self._skip_run = 0
        self.close()

    def close(self) -> None:
        """Stop read-ahead threads and worker processes (also done on garbage collection)."""
        if self._elements is not None:
            self._elements.close()
            self._elements = None


def _open_source(cfg: ml_collections.ConfigDict, process_index: int, process_count: int) -> tuple[object, bool]:
    """(random-access source, whether it already holds only this process's shard)."""
    if cfg.source == "webdataset":
        shards = list_shards(cfg.path)
        if len(shards) < process_count:
            raise ValueError(f"data.path={cfg.path!r} matches {len(shards)} shards, fewer than the "
                             f"{process_count} processes that each need their own.")
        return WebDatasetSource(shards[process_index::process_count], cfg.num_threads), True
    if cfg.source == "folder":
        return ImageFolderSource(cfg.path), False
    if cfg.source == "emoji":
        return EmojiSource(build_emoji_dataset(cfg.path, cfg.emoji_image_size), cfg.split, cfg.emoji_groups), False
    return CacheSource(cfg.path), False


def make_train_iterator(cfg: ml_collections.ConfigDict, *, tokenize: Tokenize | None = None,
                        process_index: int | None = None, process_count: int | None = None) -> TrainIterator:
    """The batch iterator of this process for ``cfg`` (= ``config.data``, see ``default_data_config``).

    ``process_index``/``process_count`` default to JAX's; pass both to simulate one process of several.
    ``tokenize`` maps the batch's captions to arrays (e.g. ``input_ids``, ``input_ids_2``) merged into it.
    """
    process_index, process_count = resolve_process(process_index, process_count)
    validate_data_config(cfg, process_count)
    source, sharded = _open_source(cfg, process_index, process_count)
    dataset = grain.MapDataset.source(source)
    if not sharded:
        dataset = dataset[process_index::process_count]
    shard_size = len(dataset)
    if shard_size == 0:
        raise ValueError(f"data.path={cfg.path!r} ({cfg.source}) leaves no examples for process "
                         f"{process_index} of {process_count}.")
    logging.info("Data: %s %r, process %d/%d reads %d examples, %d per batch, epochs=%s.", cfg.source, cfg.path,
                 process_index, process_count, shard_size, cfg.batch_size // process_count, cfg.num_epochs)
    if cfg.shuffle:
        dataset = dataset.shuffle(seed=cfg.seed)
    dataset = dataset.repeat(cfg.num_epochs)
    if cfg.source != "cache":
        preprocess = SDXLPreprocessor(cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.interpolation,
                                      cfg.min_image_size)
        augment_seed = int(np.random.SeedSequence([cfg.seed, process_index]).generate_state(1)[0])
        dataset = dataset.random_map(preprocess, seed=augment_seed)
    fingerprint = {f: cfg[f] for f in _ORDER_FIELDS}
    fingerprint["emoji_groups"] = list(cfg.emoji_groups)  # as a checkpoint's JSON reads it back
    fingerprint.update(process_index=process_index, process_count=process_count)
    return TrainIterator(
        dataset, shard_size=shard_size, batch_size=cfg.batch_size // process_count, drop_remainder=cfg.drop_remainder,
        read_options=grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size),
        num_workers=cfg.num_workers, tokenize=tokenize, fingerprint=fingerprint)
