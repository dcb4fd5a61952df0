"""LoRA weights in the files the PyTorch world uses: diffusers/PEFT and kohya, in both directions.

Everything goes through one neutral form, ``{module path: ModuleLoRA}`` (the path is the diffusers module name,
which is also our nnx state path, see layers.py), so exporting, importing, fusing and attaching to a model share
one name resolution and one set of shape checks.

Scales. Our layers compute ``W x + s·B(A x)`` with ``s = alpha / rank`` per module.
- diffusers/PEFT files are written with ``s`` folded into ``lora_B``: a file without alpha information is read
  with ``s = 1`` by diffusers, PEFT, ComfyUI and A1111 alike, so this is the only form every loader reproduces
  exactly (for any alpha ≠ rank). On import, diffusers' own ``lora_adapter_metadata`` (``lora_alpha``,
  ``alpha_pattern``, ``use_rslora``) and per-module ``.alpha`` tensors are honoured.
- kohya files keep A and B as trained and store ``alpha`` per module (``s = alpha / rank``); a module without an
  ``alpha`` tensor has ``s = 1``, as in kohya's loaders.

Names. Dotted files (``unet.<path>.lora_A.weight``, the older ``.lora.down.weight``) name modules directly.
kohya names are ``lora_unet_<path with '_' for '.'>``, either with diffusers module paths (what diffusers,
ComfyUI and A1111 write for diffusers-trained LoRAs) or with the original SGM/LDM UNet names
(``input_blocks_4_1_...``, what kohya's sd-scripts write for SDXL); both are resolved against the model's own
module list, so the '_' ↔ '.' ambiguity never needs guessing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from tdd_jax.models.layers import Conv2d, Linear, LoRAParam, state_key

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                   "lora_te2": "text_encoder_2"}
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoRA config entry in the safetensors header
_SHOW = 5  # offending keys named in an error


class LoRAFormatError(ValueError):
    """A LoRA file does not fit the model; the message names the first offending keys."""


@dataclasses.dataclass(frozen=True)
class ModuleLoRA:
    """One adapted layer, PEFT layouts: down (r, in) or (r, in, kh, kw); up (out, r) or (out, r, 1, 1).

    The layer computes ``W x + scale · up(down(x))``.
    """

    down: np.ndarray
    up: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> np.ndarray:
        """``scale · up @ down`` in the layout of the layer's weight, in float32 (for fusing)."""
        up = self.up.astype(np.float32).reshape(self.up.shape[0], self.rank)
        down = self.down.astype(np.float32)
        return self.scale * np.tensordot(up, down, axes=(1, 0))


def _show(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return f"{keys[:_SHOW]}{more}"


# --- our models ---------------------------------------------------------------------------------------------

def _layers(model: nnx.Module) -> dict[str, Linear | Conv2d]:
    return {state_key(path): mod for path, mod in nnx.iter_modules(model) if isinstance(mod, (Linear, Conv2d))}


def _weight_shape(mod: Linear | Conv2d) -> tuple[int, ...]:
    if isinstance(mod, Linear):
        return (mod.out_features, mod.in_features)
    return (mod.out_channels, mod.in_channels, mod.kernel_size, mod.kernel_size)


def layer_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """{module path: weight shape} of every layer a LoRA can adapt (also works on an abstract model)."""
    return {path: _weight_shape(mod) for path, mod in _layers(model).items()}


def lora_from_model(model: nnx.Module) -> dict[str, ModuleLoRA]:
    """The LoRA currently attached to ``model``."""
    return {path: ModuleLoRA(np.asarray(mod.lora_A[...]), np.asarray(mod.lora_B[...]), mod.lora_alpha_over_rank)
            for path, mod in _layers(model).items() if mod.lora_A is not None}


def lora_from_tree(tree: Mapping, scale: float) -> dict[str, ModuleLoRA]:
    """A LoRA from a nested dict keyed like the nnx state (``...conv1: {lora_A, lora_B}``), one scale for all,
    as ``training.checkpointing.restore_lora`` returns it."""
    out: dict[str, ModuleLoRA] = {}

    def walk(node: Mapping, prefix: tuple[str, ...]):
        if "lora_A" in node or "lora_B" in node:
            if set(node) != {"lora_A", "lora_B"}:
                raise LoRAFormatError(f"LoRA tree node {'.'.join(prefix)} has keys {sorted(map(str, node))}, "
                                      "expected exactly lora_A and lora_B")
            out[".".join(prefix)] = ModuleLoRA(np.asarray(node["lora_A"]), np.asarray(node["lora_B"]), scale)
            return
        for key, child in node.items():
            if not isinstance(child, Mapping):
                raise LoRAFormatError(f"LoRA tree has a stray leaf at {'.'.join((*prefix, str(key)))}")
            walk(child, (*prefix, str(key)))

    walk(tree, ())
    if not out:
        raise LoRAFormatError("the LoRA tree holds no lora_A/lora_B pairs")
    return out


def check_fits(lora: Mapping[str, ModuleLoRA], shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise ``LoRAFormatError`` naming the modules ``what`` lacks and the shape mismatches."""
    missing = [p for p in lora if p not in shapes]
    if missing:
        raise LoRAFormatError(
            f"{len(missing)} LoRA modules do not exist in {what} (first: {_show(missing)}); is this a LoRA for "
            "another architecture (e.g. SD1.5 on SDXL)?")
    wrong = []
    for path, m in sorted(lora.items()):
        w = shapes[path]
        up = (w[0], m.rank) if len(w) == 2 else (w[0], m.rank, 1, 1)
        if m.down.shape != (m.rank, *w[1:]) or m.up.shape != up:
            wrong.append(f"{path}: down {tuple(m.down.shape)}, up {tuple(m.up.shape)} vs weight {tuple(w)}")
    if wrong:
        raise LoRAFormatError(
            f"{len(wrong)} LoRA modules do not fit the shapes of {what} (first: {wrong[:_SHOW]}); is this a LoRA "
            "for another architecture (e.g. SD1.5 on SDXL)?")


def attach(model: nnx.Module, lora: Mapping[str, ModuleLoRA], param_dtype=jnp.float32) -> None:
    """Put ``lora`` on a base ``model`` in place: each module gets the file's rank, weights and scale."""
    layers = _layers(model)
    check_fits(lora, {p: _weight_shape(m) for p, m in layers.items()}, type(model).__name__)
    already = [p for p, m in layers.items() if m.lora_A is not None]
    if already:
        raise LoRAFormatError(f"{type(model).__name__} already carries a LoRA (first: {_show(already)}); "
                              "attach to a base model")
    for path, m in lora.items():
        mod = layers[path]
        mod.lora_A = LoRAParam(jnp.asarray(m.down, param_dtype))
        mod.lora_B = LoRAParam(jnp.asarray(m.up, param_dtype))
        mod.lora_alpha_over_rank = float(m.scale)


# --- export -------------------------------------------------------------------------------------------------

def to_diffusers(lora: Mapping[str, ModuleLoRA], dtype=np.float32) -> dict[str, np.ndarray]:
    """A UNet LoRA as diffusers/PEFT keys (``unet.<path>.lora_A.weight``/``lora_B.weight``), scale folded into B."""
    out = {}
    for path, m in lora.items():
        out[f"unet.{path}.lora_A.weight"] = m.down.astype(dtype)
        out[f"unet.{path}.lora_B.weight"] = (m.up.astype(np.float32) * m.scale).astype(dtype)
    return out


def to_kohya(lora: Mapping[str, ModuleLoRA], dtype=np.float32) -> dict[str, np.ndarray]:
    """A UNet LoRA as kohya keys (``lora_unet_<path_>.lora_down.weight``/``lora_up.weight``/``alpha``), with
    diffusers module names."""
    out = {}
    for path, m in lora.items():
        name = f"lora_unet_{path.replace('.', '_')}"
        out[f"{name}.lora_down.weight"] = m.down.astype(dtype)
        out[f"{name}.lora_up.weight"] = m.up.astype(dtype)
        out[f"{name}.alpha"] = np.asarray(m.scale * m.rank, np.float32)
    return out


# --- SGM (original Stability) UNet names ---------------------------------------------------------------------

_RESNET_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_SGM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _resnet_rest(rest: str | None) -> str | None:
    if rest is None:
        return None
    head, _, tail = rest.partition(".")
    if head not in _RESNET_SGM:
        return None
    return _RESNET_SGM[head] + ("." + tail if tail else "")


def sgm_unet_names(paths: Iterable[str]) -> dict[str, str]:
    """{diffusers UNet name: SGM/LDM name} for module paths or parameter keys (``...conv1.weight`` too).

    The block layout (resnets per level, which up levels have attention) is read from ``paths`` themselves, so
    any UNet2DConditionModel layout maps, not just SDXL's. Names outside the mapped layout are left out.
    """
    paths = list(paths)
    counts: dict[tuple[str, int], set[int]] = {}
    up_attn = set()
    for p in paths:
        m = _BLOCK.match(p)
        if m and m[3] == "resnets":
            counts.setdefault((m[1], int(m[2])), set()).add(int(m[4]))
        if m and m[1] == "up" and m[3] == "attentions":
            up_attn.add(int(m[2]))
    n_res = {key: max(v) + 1 for key, v in counts.items()}

    def start(kind: str, level: int) -> int:
        # input_blocks: conv_in, then per level its resnets and a downsampler; output_blocks: per level resnets.
        if kind == "down":
            return 1 + sum(n_res.get(("down", i), 0) + 1 for i in range(level))
        return sum(n_res.get(("up", i), 0) for i in range(level))

    out = {}
    for p in paths:
        for name, sgm in _TOP_SGM.items():
            if p == name or p.startswith(name + "."):
                out[p] = sgm + p[len(name):]
        m = _BLOCK.match(p)
        if m:
            kind, level, sub, idx, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            blocks = "input_blocks" if kind == "down" else "output_blocks"
            if sub == "resnets" and (r := _resnet_rest(rest)):
                out[p] = f"{blocks}.{start(kind, level) + idx}.0.{r}"
            elif sub == "attentions" and rest:
                out[p] = f"{blocks}.{start(kind, level) + idx}.1.{rest}"
            elif sub == "downsamplers" and rest and rest.split(".")[0] == "conv":
                out[p] = f"input_blocks.{start(kind, level) + n_res.get(('down', level), 0)}.0.op{rest[4:]}"
            elif sub == "upsamplers" and rest and rest.split(".")[0] == "conv":
                last = start(kind, level) + n_res.get(("up", level), 0) - 1
                out[p] = f"output_blocks.{last}.{2 if level in up_attn else 1}.{rest}"
        m = _MID.match(p)
        if m:
            sub, idx, rest = m[1], int(m[2]), m[3]
            if sub == "resnets" and (r := _resnet_rest(rest)):
                out[p] = f"middle_block.{2 * idx}.{r}"
            elif sub == "attentions" and rest:
                out[p] = f"middle_block.1.{rest}"
    return out


# --- import -------------------------------------------------------------------------------------------------

# Adapter kinds other than LoRA, told by the keys LyCORIS, kohya and PEFT write for them: named in the error.
_OTHER_ADAPTERS = {"LoHa": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2"),
                   "LoKr": (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b",
                            ".lokr_t2"),
                   "DoRA": (".dora_scale", ".lora_magnitude_vector"),
                   "LoCon with Tucker decomposition": (".lora_mid.weight",),
                   "OFT/BOFT": (".oft_blocks", ".oft_diag", ".boft_R", ".boft_s"),
                   "full weight difference": (".diff", ".diff_b"),
                   "LoRA bias": (".lora_B.bias", ".lora_up.bias", ".lora.up.bias")}
_DOTTED_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                    ".lora.up.weight": "up", ".alpha": "alpha"}
_KOHYA_KEY = re.compile(r"^(lora_unet|lora_te[12]?)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as numpy, header metadata) of a .safetensors file (any dtype, bf16 via ml_dtypes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _group(tensors: Mapping[str, np.ndarray]):
    """Tensors grouped per adapted module: ({(component, kind, name, label): {'down'|'up'|'alpha': array}},
    {component: its keys}); kind is 'dotted' or 'kohya', label the module's key prefix in the file."""
    groups: dict[tuple[str, str, str, str], dict[str, np.ndarray]] = {}
    keys_of: dict[str, list[str]] = {}
    unknown = []
    for key, value in tensors.items():
        m = _KOHYA_KEY.match(key)
        component, _, rest = key.partition(".")
        suffix = next((s for s in _DOTTED_SUFFIXES if rest.endswith(s)), None)
        if m:
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m[3]]
            group = (_KOHYA_PREFIXES[m[1]], "kohya", m[2], f"{m[1]}_{m[2]}")
        elif component in COMPONENTS and suffix and len(rest) > len(suffix):
            part, name = _DOTTED_SUFFIXES[suffix], rest[: -len(suffix)]
            group = (component, "dotted", name, f"{component}.{name}")
        else:
            unknown.append(key)
            continue
        groups.setdefault(group, {})[part] = value
        keys_of.setdefault(group[0], []).append(key)
    for kind, suffixes in _OTHER_ADAPTERS.items():
        found = [key for key in unknown if key.endswith(suffixes)]
        if found:
            raise LoRAFormatError(f"holds {kind} weights ({len(found)} keys, first: {_show(found)}), not LoRA: "
                                  "only LoRA (LoCon included) files are supported")
    if unknown:
        raise LoRAFormatError(
            f"{len(unknown)} keys are not LoRA weights of a known format (first: {_show(unknown)}); expected "
            "diffusers/PEFT '<unet|text_encoder|text_encoder_2>.<module>.lora_A.weight'/'lora_B.weight' (or "
            "'.lora.down/up.weight', '.alpha') or kohya 'lora_unet_<module>.lora_down.weight'/'lora_up.weight'/"
            "'alpha' (DoRA, LoHa, LoKr and LoRA biases are not supported)")
    incomplete = [label for (*_, label), parts in groups.items() if not {"down", "up"} <= set(parts)]
    if incomplete:
        raise LoRAFormatError(f"{len(incomplete)} LoRA modules lack their down or up weight "
                              f"(first: {_show(incomplete)})")
    return groups, keys_of


def _diffusers_alpha(config: Mapping, path: str, rank: int) -> float:
    """PEFT's scale from a diffusers ``lora_adapter_metadata`` LoraConfig (alpha_pattern as PEFT matches it)."""
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _resolver(component: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[tuple[str, str], str]:
    """(kind, name in a file) -> module path, built from the model's own module list.

    Names a file may use: our paths (= diffusers'); for the UNet also SGM names; for a CLIPTextModel laid out
    flat (transformers >= 5) also 'text_model.<path>', as transformers < 5 and SDXL's LoRAs name it.
    kohya names are the same with '_' for '.'.
    """
    names = [(p, p) for p in shapes]
    if component == "unet":
        names += [(sgm, p) for p, sgm in sgm_unet_names(shapes).items()]
    elif not any(p.startswith("text_model.") for p in shapes):
        names += [("text_model." + p, p) for p in shapes]
    table: dict[tuple[str, str], str] = {}
    for name, path in names:
        for key in (("dotted", name), ("kohya", name.replace(".", "_"))):
            if table.setdefault(key, path) != path:
                raise LoRAFormatError(f"LoRA name {key[1]} is ambiguous: {table[key]} and {path}")
    return table


def lora_from_file_tensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str],
                           shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> dict[str, dict[str, ModuleLoRA]]:
    """{component: LoRA} from a LoRA file's tensors, checked against ``shapes`` ({component: layer shapes}).

    Every key must be understood and every module must exist with fitting shapes in the given components;
    otherwise a ``LoRAFormatError`` names the first offending keys.
    """
    groups, keys_of = _group(tensors)
    if not groups:
        raise LoRAFormatError("the file holds no LoRA weights")
    if "unet" in shapes and "unet" not in keys_of:
        keys = [k for component_keys in keys_of.values() for k in component_keys]
        raise LoRAFormatError(f"adapts only {sorted(keys_of)} (first keys: {_show(keys)}), no UNet layer: "
                              "text-encoder-only LoRAs are not supported")
    absent = sorted(set(keys_of) - set(shapes))
    if absent:
        keys = [k for c in absent for k in keys_of[c]]
        raise LoRAFormatError(f"the LoRA also adapts {absent} (first keys: {_show(keys)}), which were not given")
    resolvers = {c: _resolver(c, shapes[c]) for c in keys_of}
    config_all = json.loads(metadata.get(DIFFUSERS_METADATA_KEY) or "{}")
    out: dict[str, dict[str, ModuleLoRA]] = {}
    unresolved = []
    for (component, kind, name, label), parts in groups.items():
        path = resolvers[component].get((kind, name))
        if path is None:
            unresolved.append(label)
            continue
        down, up = parts["down"], parts["up"]
        rank = int(down.shape[0])
        if "alpha" in parts:
            scale = float(np.asarray(parts["alpha"], np.float64).reshape(-1)[0]) / rank
        else:
            prefix = component + "."
            config = {k[len(prefix):]: v for k, v in config_all.items() if k.startswith(prefix)}
            scale = _diffusers_alpha(config, path, rank) if config else 1.0
        if path in out.get(component, {}):
            raise LoRAFormatError(f"{component} module {path} is given twice in the LoRA file (again as {label})")
        out.setdefault(component, {})[path] = ModuleLoRA(down, up, scale)
    if unresolved:
        raise LoRAFormatError(
            f"{len(unresolved)} LoRA modules name layers the model does not have (first: {_show(unresolved)}); "
            "is this a LoRA for another architecture (e.g. SD1.5 on SDXL)?")
    for component, lora in out.items():
        check_fits(lora, shapes[component], component)
    return out


def read_lora_file(path: str | Path, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]):
    """({component: LoRA}, header metadata) of a .safetensors LoRA file (see ``lora_from_file_tensors``);
    errors name the file."""
    tensors, metadata = read_safetensors(path)
    try:
        return lora_from_file_tensors(tensors, metadata, shapes), metadata
    except LoRAFormatError as e:
        raise LoRAFormatError(f"{path}: {e}") from None


def load_lora_file(path: str | Path, models: Mapping[str, nnx.Module], param_dtype=jnp.float32) -> dict[str, int]:
    """Attach a diffusers/PEFT or kohya LoRA file to base models ({'unet': ..., 'text_encoder': ...}).

    Returns {component: number of adapted modules}. Nothing is attached unless the whole file fits.
    """
    loras, _ = read_lora_file(path, {c: layer_shapes(m) for c, m in models.items()})
    for component, lora in loras.items():
        attach(models[component], lora, param_dtype)
    return {c: len(lora) for c, lora in loras.items()}


def describe(lora: Mapping[str, ModuleLoRA]) -> dict[str, str]:
    """Rank and alpha summary for metadata: the most common values (kohya's ss_network_dim/alpha style)."""
    rank = Counter(m.rank for m in lora.values()).most_common(1)[0][0]
    alpha = Counter(round(m.scale * m.rank, 6) for m in lora.values()).most_common(1)[0][0]
    return {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
