"""Build models from diffusers/transformers-format folders, straight from safetensors, without torch.

Parameters are created abstractly (``nnx.eval_shape``) and each leaf is read from its safetensors file only
when it is placed, through ``jax.make_array_from_callback``: with a sharding passed in, every host reads just
the slices its devices hold, so a 2.6B-parameter UNet is never materialised on one host. Because layer
parameters carry PyTorch names and layouts (see layers.py), the checkpoint key of a leaf is its state path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from tdd_jax.models.layers import LoRAParam, state_key

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


class WeightsError(ValueError):
    """A checkpoint does not fit the model: names the file, the keys and the shapes involved."""


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    with open(path) as f:
        return json.load(f)


def weight_files(folder: str | Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of a diffusers/transformers component folder (single or index-sharded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for name in WEIGHT_NAMES:
        single = folder / f"{name}{suffix}"
        if single.is_file():
            return [single]
        index = folder / f"{name}{suffix}.index.json"
        if index.is_file():
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [folder / s for s in shards]
            missing = [str(p) for p in files if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists missing shard files: {missing}")
            return files
    raise FileNotFoundError(
        f"no safetensors weights in {folder} (looked for {', '.join(n + suffix for n in WEIGHT_NAMES)} "
        "and their .index.json)")


class _TensorSource:
    """Key -> lazily sliced tensor, over safetensors files or an in-memory mapping of arrays."""

    def __init__(self, source: str | Path | list[Path] | Mapping[str, Any]):
        self._arrays: Mapping[str, Any] | None = None
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        if isinstance(source, Mapping):
            self._arrays = source
            self.description = "the given state dict"
            return
        files = [Path(p) for p in source] if isinstance(source, (list, tuple)) else [Path(source)]
        if len(files) == 1 and files[0].is_dir():
            files = weight_files(files[0])
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"weights file not found: {path}")
            handle = safe_open(str(path), framework="numpy")
            self._handles[path] = handle
            for key in handle.keys():
                self._where[key] = path
        self.description = ", ".join(str(p) for p in files)

    def keys(self) -> set[str]:
        return set(self._arrays.keys()) if self._arrays is not None else set(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._arrays is not None:
            return tuple(np.shape(self._arrays[key]))
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def read(self, key: str, index=()) -> np.ndarray:
        if self._arrays is not None:
            return np.asarray(self._arrays[key])[index]
        return self._handles[self._where[key]].get_slice(key)[index]


def checkpoint_keys(source) -> set[str]:
    """The tensor names of a component folder, safetensors file(s) or mapping (only headers are read)."""
    return _TensorSource(source).keys()


def load_state(abstract_state: nnx.State, source, *, prefix: str = "", shardings: Any = None,
               ignore_prefixes: tuple[str, ...] = ()) -> nnx.State:
    """Fill an abstract (or concrete) ``nnx.State`` from checkpoint tensors.

    source: a component folder, a safetensors file or list of files, or a mapping key -> array.
    prefix: prepended to every state path to form the checkpoint key (e.g. 'text_model.' for old CLIP files).
    shardings: None, one ``jax.sharding.Sharding`` for every leaf, or a State-shaped tree of them.
    Every model parameter must be present with its exact shape and every checkpoint key must be used
    (except keys under ``ignore_prefixes``); otherwise a ``WeightsError`` names the offenders.
    """
    src = _TensorSource(source)
    flat = nnx.to_flat_state(abstract_state)
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        leaf_shardings = [shardings] * len(flat)
    else:
        leaf_shardings = [v.get_value() if isinstance(v, nnx.Variable) else v for _, v in nnx.to_flat_state(shardings)]
    wanted = {}
    for path, var in flat:
        if isinstance(var, LoRAParam):
            continue
        wanted[prefix + state_key(path)] = tuple(var.get_value().shape)
    have = {k for k in src.keys() if not k.startswith(ignore_prefixes)}
    missing = sorted(set(wanted) - have)
    unexpected = sorted(have - set(wanted))
    wrong = [(k, src.shape(k), wanted[k]) for k in sorted(set(wanted) & have) if src.shape(k) != wanted[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:5]})")
        if wrong:
            parts.append("shape mismatches: " + "; ".join(
                f"{k}: checkpoint {s} vs model {m}" for k, s, m in wrong[:5]))
        raise WeightsError(f"weights in {src.description} do not fit the model: " + "; ".join(parts))
    out = []
    for (path, var), sharding in zip(flat, leaf_shardings):
        if isinstance(var, LoRAParam):
            out.append((path, var))
            continue
        key = prefix + state_key(path)
        dtype = var.get_value().dtype
        if sharding is None:
            value = jax.numpy.asarray(src.read(key).astype(dtype))
        else:
            value = jax.make_array_from_callback(
                tuple(var.get_value().shape), sharding, lambda idx, k=key, d=dtype: src.read(k, idx).astype(d))
        out.append((path, var.replace(value)))
    return nnx.from_flat_state(out)


def build_model(ctor: Callable[[], nnx.Module], source=None, *, shardings=None, **kwargs) -> nnx.Module:
    """Construct ``ctor()`` abstractly and load its weights from ``source`` (no random init is computed).

    shardings: as ``load_state`` takes them, or a function of the abstract state returning them (a placement
    rule that needs the shapes, e.g. FSDP by size). With ``source=None`` the model is initialised for real
    (random weights, e.g. for shape checks).
    """
    if source is None:
        return ctor()
    abstract = nnx.eval_shape(ctor)
    graphdef, state = nnx.split(abstract)
    if callable(shardings):
        shardings = shardings(state)
    return nnx.merge(graphdef, load_state(state, source, shardings=shardings, **kwargs))


def count_params(ctor: Callable[[], nnx.Module]) -> int:
    """Number of base parameters of a model, from abstract shapes only (nothing allocated)."""
    abstract = nnx.eval_shape(ctor)
    _, params = nnx.split(abstract, nnx.Param)
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(params)
               if not isinstance(v, LoRAParam))
