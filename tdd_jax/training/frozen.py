"""The frozen SDXL pipeline the trainer distils: graph definitions plus sharded base weights, loaded once.

Each component is split into an nnx graphdef (static structure, closed over by the compiled step) and a
state of base weights (an argument of the step, so it stays sharded and single-copy instead of being baked
into the executable as a constant). The UNet has two graphdefs over the one copy of the base weights: 'unet'
carries LoRA slots (merged with the online LoRA it is the student, with the EMA LoRA the target network) and
'teacher' is the same architecture without them, so which model a compiled function runs is in its graph,
not in a switch read at trace time.

The bundle holds weights and model definitions only: the mesh and the sharding rules are the caller's (passed
to ``load_frozen`` and to the step), and a fresh LoRA is the train state's (``lora.new_lora`` on
``abstract_unet``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from tdd_jax import conditioning
from tdd_jax.models.components import MODELS, load_components
from tdd_jax.models.layers import ModelOptions
from tdd_jax.models.loading import read_config
from tdd_jax.models.lora import LoRAConfig, attach_lora, split_lora
from tdd_jax.models.unet import UNet2DConditionModel
from tdd_jax.models.vae import AutoencoderKL
from tdd_jax.training import sharding

ENCODERS = {name: MODELS[name] for name in ("text_encoder", "text_encoder_2", "vae")}


def model_options(model_cfg) -> ModelOptions:
    """ModelOptions from ``cfg.model`` (dtype, param_dtype, remat, attention_impl, scan_blocks; checked by
    ``config.validate``)."""
    remat = model_cfg.remat
    if isinstance(remat, bool):  # remat on/off switch: on = checkpoint every block
        remat = "full" if remat else "none"
    return ModelOptions(dtype=jnp.dtype(model_cfg.dtype), param_dtype=jnp.dtype(model_cfg.param_dtype),
                        attention_impl=model_cfg.attention_impl, remat=remat, scan_blocks=model_cfg.scan_blocks)


def lora_config(lora_cfg) -> LoRAConfig:
    """LoRAConfig from ``cfg.lora`` (rank, alpha, targets; checked by ``config.validate``)."""
    return LoRAConfig(rank=int(lora_cfg.rank), alpha=lora_cfg.alpha, targets=tuple(lora_cfg.targets))


def min_shard_size(cfg) -> int:
    """``cfg.mesh.min_shard_size`` (optional): arrays smaller than this are replicated, not FSDP-split."""
    return int(cfg.mesh.get("min_shard_size", sharding.DEFAULT_MIN_SHARD_SIZE))


@dataclasses.dataclass(frozen=True)
class FrozenPipeline:
    """graphdefs: component name -> nnx graphdef ('unet' with LoRA slots, 'teacher' without; the encoders when
    loaded). params: component name -> sharded base-weight state, plus 'empty_prompt' (the encoded "" caption,
    only in guidance.mode='official'); pass it to the step as ``base_params``. unet_config: the UNet's
    config.json fields (``abstract_unet`` builds the architecture from it, e.g. to draw a fresh LoRA)."""

    graphdefs: dict[str, Any]
    params: dict[str, Any]
    unet_config: dict[str, Any]
    vae_scaling_factor: float
    vae_shift_factor: float

    @property
    def has_encoders(self) -> bool:
        return all(name in self.params for name in ENCODERS)

    def unet(self, params: dict, lora: nnx.State) -> UNet2DConditionModel:
        """The UNet on the base weights with ``lora``: the student or, with the EMA LoRA, the target network."""
        return nnx.merge(self.graphdefs["unet"], lora, params["unet"])

    def teacher(self, params: dict) -> UNet2DConditionModel:
        """The frozen base UNet (no LoRA slots, so no LoRA computation) on the same base weights."""
        return nnx.merge(self.graphdefs["teacher"], params["unet"])

    def encode_prompts(self, params: dict, input_ids: jax.Array, input_ids_2: jax.Array):
        """(prompt_embeds, pooled_prompt_embeds) from token ids, through both frozen text encoders."""
        self._require_encoders()
        return _encode_prompts(self.graphdefs, params, input_ids, input_ids_2)

    def encode_pixels(self, params: dict, pixels: jax.Array, keys: jax.Array) -> jax.Array:
        """Unscaled VAE posterior draws (B, h, w, C) of images; one PRNG key per example (B, 2).

        pixels are uint8 [0, 255] or floats in [-1, 1]. Per-example keys make the draw independent of how
        the batch is split into microbatches or over devices.
        """
        self._require_encoders()
        if jnp.issubdtype(pixels.dtype, jnp.integer):
            pixels = pixels.astype(jnp.float32) / 127.5 - 1.0
        vae = nnx.merge(self.graphdefs["vae"], params["vae"])
        mean, logvar = vae.encode(pixels)
        mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
        return jax.vmap(AutoencoderKL.sample)(keys, mean, logvar)

    def scale_latents(self, latents: jax.Array) -> jax.Array:
        """Unscaled VAE latents -> the UNet's latent space: (z − shift) · scaling_factor."""
        return (latents.astype(jnp.float32) - self.vae_shift_factor) * self.vae_scaling_factor

    def encode_batch(self, params: dict, batch: dict, key: jax.Array) -> dict:
        """A pixel batch -> the cached-source fields (unscaled ``latents``, ``prompt_embeds``,
        ``pooled_prompt_embeds``): the ``encode_fn`` that fills the latent/embedding cache."""
        keys = jax.random.split(key, batch["pixels"].shape[0])
        prompt_embeds, pooled = self.encode_prompts(params, batch["input_ids"], batch["input_ids_2"])
        return {"latents": self.encode_pixels(params, batch["pixels"], keys),
                "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def _require_encoders(self):
        if not self.has_encoders:
            raise ValueError("the frozen pipeline was loaded without its text encoders and VAE "
                             "(load_frozen(..., encoders=False)); pixel/caption batches need them")


def _encode_prompts(graphdefs: dict, params: dict, input_ids, input_ids_2):
    te1 = nnx.merge(graphdefs["text_encoder"], params["text_encoder"])
    te2 = nnx.merge(graphdefs["text_encoder_2"], params["text_encoder_2"])
    return conditioning.encode_prompts(te1, te2, input_ids, input_ids_2)


def _empty_prompt(pipeline_dir: Path, graphdefs: dict, params: dict, mesh: Mesh) -> dict:
    """The encoded empty caption "" (official mode replaces dropped captions by it), replicated."""
    ids = [conditioning.tokenize(tok, [""]) for tok in conditioning.load_tokenizers(pipeline_dir)]

    def encode(p):
        prompt_embeds, pooled = _encode_prompts(graphdefs, p, *ids)
        return {"prompt_embeds": prompt_embeds[0], "pooled_prompt_embeds": pooled[0]}

    text_params = {k: params[k] for k in ("text_encoder", "text_encoder_2")}
    return jax.jit(sharding.traced_on(mesh, encode), out_shardings=sharding.replicated(mesh))(text_params)


def abstract_unet(unet_config: dict, opts: ModelOptions = ModelOptions()) -> UNet2DConditionModel:
    """The UNet of ``unet_config`` with abstract weights (``nnx.eval_shape``: nothing initialised or allocated)."""
    return nnx.eval_shape(lambda: UNet2DConditionModel(unet_config, opts=opts, rngs=nnx.Rngs(0)))


def unet_definitions(unet_config: dict, opts: ModelOptions, lora_cfg: LoRAConfig):
    """({'unet': graphdef with LoRA slots, 'teacher': graphdef without}, base-weight shapes), built abstractly: no
    base weight is ever initialised, traced or compiled. The base state is the same for both graphdefs."""

    def lora_unet() -> UNet2DConditionModel:
        unet = abstract_unet(unet_config, opts)
        attach_lora(unet, lora_cfg, nnx.Rngs(0))
        return unet

    graphdef, _, base_shapes = split_lora(nnx.eval_shape(lora_unet))
    return {"unet": graphdef, "teacher": nnx.split(abstract_unet(unet_config, opts))[0]}, base_shapes


def load_frozen(pipeline_dir: str | Path, cfg, mesh: Mesh, *, encoders: bool = True) -> FrozenPipeline:
    """Load a diffusers SDXL pipeline folder for training, every weight placed in its sharding on ``mesh``.

    cfg fields used: model.{dtype, param_dtype, remat, attention_impl}, lora.{rank, alpha, targets},
    guidance.mode, mesh.min_shard_size (optional). encoders=False (training from cached latents and
    embeddings) loads only the UNet, plus, in official guidance mode, the text encoders for as long as it
    takes to encode the empty caption.
    """
    pipeline_dir = Path(pipeline_dir)
    if not pipeline_dir.is_dir():
        raise FileNotFoundError(f"config pipeline_dir={str(pipeline_dir)!r} is not a directory")
    official = cfg.guidance.mode == "official"
    opts, min_size = model_options(cfg.model), min_shard_size(cfg)
    unet_config = read_config(pipeline_dir / "unet")
    graphdefs, _ = unet_definitions(unet_config, opts, lora_config(cfg.lora))
    wanted = tuple(ENCODERS) if encoders else (("text_encoder", "text_encoder_2") if official else ())
    models = load_components(pipeline_dir, ("unet", *wanted), opts=opts,
                             shardings=lambda state: sharding.weight_shardings(mesh, state, min_size))
    params = {}
    for name, model in models.items():  # the UNet's own graphdef is graphdefs['teacher']
        graphdef, params[name] = nnx.split(model)
        if name != "unet":
            graphdefs[name] = graphdef
    if official:
        params["empty_prompt"] = _empty_prompt(pipeline_dir, graphdefs, params, mesh)
    if not encoders:
        for name in wanted:
            del graphdefs[name], params[name]
    vae_config = read_config(pipeline_dir / "vae")
    vae = nnx.eval_shape(lambda: AutoencoderKL(vae_config, opts=opts, rngs=nnx.Rngs(0)))  # for its factors
    return FrozenPipeline(graphdefs=graphdefs, params=params, unet_config=unet_config,
                          vae_scaling_factor=vae.scaling_factor, vae_shift_factor=vae.shift_factor)
