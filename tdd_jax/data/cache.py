"""Precomputed VAE latents and text embeddings, written once and read by the ``cache`` source instead of pixels.

Encoding each image and caption at every step roughly doubles the cost of a distillation step on pods; the
cache pays it once. Layout of ``out_dir``:

- ``cache-p{process:05d}-s{shard:05d}.array_record``: one record per example, an ``.npz`` of its arrays
  (``time_ids``, ``caption``, ``key`` and whatever ``encode_fn`` returned, e.g. ``latents``, ``prompt_embeds``,
  ``pooled_prompt_embeds``); examples go round-robin over ``num_shards`` files per writing process.
- ``index-p{process:05d}.json``: that process's shards, example counts and feature shapes/dtypes.

Every file is written under a temporary name and renamed when complete, and a process writes its index last,
so a reader never sees a partial cache: without all ``process_count`` indices the cache is an error.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import grain
from array_record.python import array_record_module

from tdd_jax.data.config import resolve_process

FORMAT = "tdd_jax.cache/v1"
# Batch fields carried into the cache from the pixel iterator, and their per-example names.
_CARRIED = {"time_ids": "time_ids", "captions": "caption", "keys": "key"}
_NATIVE_FLOATS = (np.float16, np.float32, np.float64)


def _storable(name: str, value) -> np.ndarray:
    """As a numpy array npz holds without pickle: strings as unicode, non-numpy floats (jax bfloat16) as float32."""
    array = np.asarray(value)
    if name in ("captions", "keys"):
        return array.astype(np.str_)
    if array.dtype.kind == "V" or (array.dtype.kind == "f" and array.dtype.type not in _NATIVE_FLOATS):
        array = array.astype(np.float32)
    if array.dtype == object:
        raise TypeError(f"Cache field {name!r} has dtype object; encode_fn must return numeric arrays.")
    return array


def _serialize(example: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **example)
    return buffer.getvalue()


def _deserialize(record: bytes) -> dict:
    with np.load(io.BytesIO(record), allow_pickle=False) as npz:
        return {k: (str(v) if v.dtype.kind == "U" else v) for k, v in npz.items()}


def write_cache(batches: Iterable[Mapping[str, np.ndarray]],
                encode_fn: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
                out_dir: str, num_shards: int, *,
                process_index: int | None = None, process_count: int | None = None) -> dict:
    """Encode every batch and write this process's part of the cache; returns its index.

    ``batches``: batches of the pixel iterator (``make_train_iterator`` with ``num_epochs=1``,
    ``drop_remainder=False``; on a pod every process passes its own). ``encode_fn(batch)`` returns a dict of
    arrays with the batch's leading dimension. Call it on every process with the same ``num_shards``.
    """
    process_index, process_count = resolve_process(process_index, process_count)
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be >= 1.")
    os.makedirs(out_dir, exist_ok=True)
    names = [f"cache-p{process_index:05d}-s{s:05d}.array_record" for s in range(num_shards)]
    writers = [array_record_module.ArrayRecordWriter(os.path.join(out_dir, n + ".tmp"), "group_size:1")
               for n in names]
    counts, features, total = [0] * num_shards, None, 0
    try:
        for batch_number, batch in enumerate(batches):
            missing = [k for k in _CARRIED if k not in batch]
            if missing:
                raise KeyError(f"write_cache: batch {batch_number} lacks {missing}; pass the pixel iterator's "
                               "batches.")
            encoded = dict(encode_fn(batch))
            clash = sorted(set(encoded) & set(_CARRIED.values()))
            if clash:
                raise KeyError(f"write_cache: encode_fn output {clash} would overwrite carried fields.")
            fields = {_CARRIED[k]: _storable(k, batch[k]) for k in _CARRIED}
            fields.update({k: _storable(k, v) for k, v in encoded.items()})
            size = len(batch["keys"])
            for name, array in fields.items():
                if array.ndim == 0 or array.shape[0] != size:
                    raise ValueError(f"write_cache: field {name!r} has shape {array.shape} in batch "
                                     f"{batch_number}; expected leading dimension {size}.")
            batch_features = {k: {"shape": list(v.shape[1:]), "dtype": v.dtype.str} for k, v in fields.items()
                              if k not in ("caption", "key")}
            if features is None:
                features = batch_features
            elif batch_features != features:
                raise ValueError(f"write_cache: batch {batch_number} features {batch_features} differ from the "
                                 f"first batch's {features}.")
            for i in range(size):
                shard = total % num_shards
                writers[shard].write(_serialize({k: v[i] for k, v in fields.items()}))
                counts[shard] += 1
                total += 1
    finally:
        for writer in writers:
            writer.close()
    for name in names:
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    index = {"format": FORMAT, "process_index": process_index, "process_count": process_count,
             "num_examples": total, "features": features or {},
             "shards": [{"file": n, "num_examples": c} for n, c in zip(names, counts)]}
    index_path = os.path.join(out_dir, f"index-p{process_index:05d}.json")
    with open(index_path + ".tmp", "w") as f:
        json.dump(index, f, indent=1)
    os.replace(index_path + ".tmp", index_path)
    return index


class CacheSource:
    """All examples of a complete cache (every writer's shards, in process then shard order), random access."""

    def __init__(self, cache_dir: str):
        if not os.path.isdir(cache_dir):
            raise FileNotFoundError(f"data.path={cache_dir!r}: cache directory does not exist.")
        index_paths = sorted(glob.glob(os.path.join(cache_dir, "index-p*.json")))
        if not index_paths:
            raise FileNotFoundError(f"data.path={cache_dir!r} has no index-p*.json: write_cache never finished "
                                    "there.")
        indices = []
        for path in index_paths:
            with open(path) as f:
                index = json.load(f)
            if index.get("format") != FORMAT:
                raise ValueError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}.")
            indices.append(index)
        count = indices[0]["process_count"]
        found = sorted(i["process_index"] for i in indices)
        if found != list(range(count)) or any(i["process_count"] != count for i in indices):
            raise ValueError(f"data.path={cache_dir!r} is incomplete: indices of processes {found} of "
                             f"{count} writers.")
        if any(i["features"] != indices[0]["features"] for i in indices):
            raise ValueError(f"data.path={cache_dir!r}: writers disagree on features.")
        self.features = indices[0]["features"]
        files = [os.path.join(cache_dir, s["file"]) for i in indices for s in i["shards"] if s["num_examples"]]
        if not files:
            raise ValueError(f"data.path={cache_dir!r}: the cache holds no examples.")
        self._records = grain.sources.ArrayRecordDataSource(files)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return _deserialize(self._records[index])
