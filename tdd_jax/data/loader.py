"""The training iterator: deterministic, resumable from a small JSON state, and the same global batches on any
number of processes.

The pipeline is a grain ``MapDataset`` (random access end to end), global first and split last:

    source -> shuffle(seed) -> repeat(num_epochs) -> SDXL preprocessing (random_map) -> this process's slice

Element ``j`` of the global stream is a pure function of (config, j): the shuffle reshuffles every epoch from
``seed + epoch`` and the crop/flip randomness is seeded by ``j``. Global batch ``b`` is elements
``[b·B, (b+1)·B)`` (B = ``batch_size``), and process ``p`` of ``P`` takes its contiguous ``B/P`` of them, the
examples its devices hold in ``sharding.shard_batch``. So the global batch sequence depends on the seed and the
step only: one process and several see the same batches, and a run resumed on another process count continues
with the same examples. The iterator's state is the number of global batches consumed (plus counters);
resuming rebuilds the pipeline from that position, without replaying data, whatever ``num_threads`` /
``num_workers`` (which only change throughput) and ``process_count`` are.

Every process indexes all sources' examples (for webdataset: every shard's tar headers, read once in parallel)
but reads and decodes only its own slice. An unusable example (a skip record) is counted here, in the process
that read it; when repeating forever it is replaced by the element at ``j + a·(N+1)`` (N examples, first usable
``a``: another epoch's example at another position), a function of ``j`` alone, so the batches still do not
depend on the process count. A finite pass (``num_epochs`` set, e.g. for caching) drops it instead.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Mapping, Sequence

import grain
import ml_collections
import numpy as np
from absl import logging

from tdd_jax.data.cache import CacheSource
from tdd_jax.data.config import resolve_process, validate_data_config
from tdd_jax.data.emoji import EmojiSource, build_emoji_dataset
from tdd_jax.data.preprocess import SKIP_REASONS, SDXLPreprocessor, fixed_time_ids
from tdd_jax.data.sources import ImageFolderSource, WebDatasetSource, list_shards

Tokenize = Callable[[Sequence[str]], Mapping[str, np.ndarray]]
STATE_VERSION = 2
# Config fields that decide which element comes next; a state saved under other values cannot be resumed.
_ORDER_FIELDS = ("source", "path", "split", "emoji_image_size", "emoji_groups", "resolution", "center_crop",
                 "random_flip", "interpolation", "min_image_size", "batch_size", "seed", "shuffle", "num_epochs")


class ProcessSlice(grain.MapDataset):
    """Process ``index`` of ``count``'s part of each global batch of ``global_batch`` consecutive elements."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int):
        super().__init__(parent)
        self.local_batch = global_batch // count
        self._global_batch, self._offset = global_batch, index * self.local_batch
        full, rest = divmod(len(parent), global_batch)
        self._len = full * self.local_batch + min(self.local_batch, max(0, rest - self._offset))

    def __len__(self) -> int:
        return self._len

    def global_index(self, index: int) -> int:
        batch, k = divmod(index, self.local_batch)
        return batch * self._global_batch + self._offset + k

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self.global_index(index)]

    def __str__(self) -> str:
        return f"ProcessSlice(offset={self._offset}, local_batch={self.local_batch})"


class TrainIterator:
    """Yields this process's batches as dicts of numpy arrays; ``get_state``/``set_state`` for checkpoints.

    Pixel sources: ``pixels`` uint8 (B,R,R,3) (4x fewer bytes to the device than floats; the step maps them to
    [-1, 1]), ``time_ids`` float32 (B,6), ``captions`` and ``keys`` (object arrays of str), plus
    ``tokenize(captions)``'s arrays. Cache source: the cached arrays (``latents``, ``prompt_embeds``,
    ``pooled_prompt_embeds``, ...), ``time_ids``, ``captions``, ``keys``.
    """

    def __init__(self, dataset: ProcessSlice, *, num_examples: int, replace_skips: bool, drop_remainder: bool,
                 read_options: grain.ReadOptions, num_workers: int, tokenize: Tokenize | None,
                 fingerprint: dict):
        self._dataset = dataset
        self._global = dataset.parents[0]
        self._num_examples = num_examples
        self._replace_skips = replace_skips
        self._drop_remainder = drop_remainder
        self._read_options = read_options
        self._num_workers = num_workers
        self._tokenize = tokenize
        self._fingerprint = fingerprint
        self._global_batches = 0  # Global batches taken from the stream (by every process alike).
        self._batches = 0
        self._examples = 0
        self._skipped = collections.Counter()
        self._skip_run = 0  # Consecutive skips: as many as there are examples means nothing usable is left.
        self._elements = None  # Started lazily, so that set_state before the first batch costs nothing.

    def __iter__(self):
        return self

    def _stream(self):
        if self._elements is None:
            start = self._global_batches * self._dataset.local_batch
            stream = self._dataset[start:].to_iter_dataset(self._read_options)
            if self._num_workers:
                stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
            self._elements = iter(stream)
        return self._elements

    def _count_skip(self, record: dict) -> None:
        self._skipped[record["skip"]] += 1
        self._skip_run += 1
        logging.log_every_n_seconds(
            logging.WARNING, "Data: skipped %s (%s%s); skipped so far: %s", 10.0, record["key"], record["skip"],
            f": {record['detail']}" if record["detail"] else "", dict(self._skipped))
        if self._skip_run >= self._num_examples:
            raise ValueError(f"Data: {self._skip_run} examples in a row of data.path={self._fingerprint['path']!r} "
                             f"were skipped, as many as it holds: {self.stats}.")

    def _usable(self, element: dict, position: int) -> dict | None:
        """``element`` (at global ``position``) or, if it is a skip record, its replacement (None: dropped)."""
        attempt = 0
        while "skip" in element:
            self._count_skip(element)
            if not self._replace_skips:
                return None
            attempt += 1
            element = self._global[position + attempt * (self._num_examples + 1)]
        self._skip_run = 0
        return element

    def __next__(self) -> dict[str, np.ndarray]:
        local = self._dataset.local_batch
        start = self._global_batches * local
        count = min(local, len(self._dataset) - start)
        if count <= 0 or (count < local and self._drop_remainder):
            raise StopIteration
        stream = self._stream()
        examples = []
        for i in range(start, start + count):
            element = self._usable(next(stream), self._dataset.global_index(i))
            if element is not None:
                examples.append(element)
        self._global_batches += 1
        if not examples:  # a finite pass whose slice of this batch was all unusable
            return next(self)
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
        """Batches and examples yielded and examples skipped (by reason) by this process since the run began."""
        return {"batches": self._batches, "examples": self._examples,
                "skipped": {r: self._skipped[r] for r in SKIP_REASONS},
                "skipped_total": sum(self._skipped.values())}

    def get_state(self) -> dict:
        """JSON-serialisable position and counters; store it with the checkpoint of the step it precedes.

        The position (``global_batches``) is the same on every process and means the same on any process count.
        """
        return {"version": STATE_VERSION, "global_batches": self._global_batches, "batches": self._batches,
                "examples": self._examples, "skipped": dict(self._skipped), "config": dict(self._fingerprint)}

    def set_state(self, state: Mapping) -> None:
        """Continue from ``state`` (saved by any process of a run on any process count): the next global batch
        is the one that followed it in the run that saved it."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Data iterator state version {state.get('version')!r}, expected {STATE_VERSION}.")
        saved = state["config"]
        changed = {f: (saved.get(f), v) for f, v in self._fingerprint.items() if saved.get(f) != v}
        if changed:
            raise ValueError("The data iterator state was saved under a different data order; changed "
                             f"(saved, now): {changed}.")
        self._global_batches = int(state["global_batches"])
        self._batches, self._examples = int(state["batches"]), int(state["examples"])
        self._skipped = collections.Counter(state["skipped"])
        self._skip_run = 0
        self.close()

    def close(self) -> None:
        """Stop read-ahead threads and worker processes (also done on garbage collection)."""
        if self._elements is not None:
            self._elements.close()
            self._elements = None


def _open_source(cfg: ml_collections.ConfigDict):
    """The random-access source of all examples (every process indexes all of them)."""
    if cfg.source == "webdataset":
        return WebDatasetSource(list_shards(cfg.path), cfg.num_threads)
    if cfg.source == "folder":
        return ImageFolderSource(cfg.path)
    if cfg.source == "emoji":
        return EmojiSource(build_emoji_dataset(cfg.path, cfg.emoji_image_size), cfg.split, cfg.emoji_groups)
    return CacheSource(cfg.path)


def make_train_iterator(cfg: ml_collections.ConfigDict, *, tokenize: Tokenize | None = None,
                        process_index: int | None = None, process_count: int | None = None) -> TrainIterator:
    """The batch iterator of this process for ``cfg`` (= ``config.data``, see ``default_data_config``).

    ``process_index``/``process_count`` default to JAX's; pass both to simulate one process of several.
    ``tokenize`` maps the batch's captions to arrays (e.g. ``input_ids``, ``input_ids_2``) merged into it.
    """
    process_index, process_count = resolve_process(process_index, process_count)
    validate_data_config(cfg, process_count)
    dataset = grain.MapDataset.source(_open_source(cfg))
    num_examples = len(dataset)
    logging.info("Data: %s %r, %d examples; process %d/%d takes %d of each batch of %d, epochs=%s.", cfg.source,
                 cfg.path, num_examples, process_index, process_count, cfg.batch_size // process_count,
                 cfg.batch_size, cfg.num_epochs)
    if cfg.shuffle:
        dataset = dataset.shuffle(seed=cfg.seed)
    dataset = dataset.repeat(cfg.num_epochs)
    if cfg.source != "cache":
        preprocess = SDXLPreprocessor(cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.interpolation,
                                      cfg.min_image_size)
        augment_seed = int(np.random.SeedSequence([cfg.seed]).generate_state(1)[0])
        dataset = dataset.random_map(preprocess, seed=augment_seed)
    if cfg.fixed_time_ids:
        dataset = dataset.map(functools.partial(fixed_time_ids, resolution=cfg.resolution))
    dataset = ProcessSlice(dataset, cfg.batch_size, process_index, process_count)
    if len(dataset) == 0:
        raise ValueError(f"data.path={cfg.path!r} ({cfg.source}) leaves no examples for process "
                         f"{process_index} of {process_count}.")
    fingerprint = {f: cfg[f] for f in _ORDER_FIELDS}
    fingerprint["emoji_groups"] = list(cfg.emoji_groups)  # as a checkpoint's JSON reads it back
    return TrainIterator(
        dataset, num_examples=num_examples, replace_skips=cfg.num_epochs is None, drop_remainder=cfg.drop_remainder,
        read_options=grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size),
        num_workers=cfg.num_workers, tokenize=tokenize, fingerprint=fingerprint)
