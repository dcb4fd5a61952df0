"""SDXL text-to-image with the TDD sampler: prompts -> both CLIP text encoders -> few-step sampler -> VAE -> images.

Why our own pipeline rather than diffusers': text encoding, the whole denoising loop and the VAE decode are one
compiled function per (sampler settings, batch shape), with the weights passed in as arguments (replicated over
the mesh, never baked into the executable) and the batch split over the devices' data axis. An image depends only
on (prompt, negative prompt, seed, settings, size): its initial noise and its renoise stream both come from its
own seed, never from its batch neighbours or its position. Conditioning is diffusers' StableDiffusionXLPipeline's
(see conditioning.py): time ids (H, W, 0, 0, H, W) for both branches and SDXL's all-zero unconditional embeddings
unless a negative prompt is given, so with ``final_step='tcd'`` it reproduces diffusers with
``TCDScheduler(original_inference_steps=250)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tdd_jax import conditioning, control, lora_source
from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.diffusion.schedule import NoiseSchedule
from tdd_jax.models import lora as lora_lib
from tdd_jax.models import lora_formats
from tdd_jax.models.components import MODELS, load_components
from tdd_jax.models.controlnet import ControlNetModel
from tdd_jax.models.layers import ModelOptions
from tdd_jax.models.loading import read_config
from tdd_jax.render import OUTPUT_TYPES, render
from tdd_jax.training import sharding

COMPONENTS = (*MODELS, *conditioning.TOKENIZER_FOLDERS, "scheduler")
MAX_SEED = 2**32 - 1


def check_pipeline_dir(pipeline_dir: str | Path) -> Path:
    """The pipeline folder, or a FileNotFoundError naming every SDXL component folder it lacks."""
    folder = Path(pipeline_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"pipeline dir {folder} does not exist")
    missing = [name for name in COMPONENTS if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"pipeline dir {folder} is not a complete SDXL diffusers pipeline: "
                                f"missing component folders {missing}")
    return folder


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
    """Image <-> latent sizes of a pipeline, from its configs alone (so a bad size fails before weights load).

    Sides must be multiples of vae_factor · unet_factor: the VAE divides by vae_factor and every UNet level
    halves the latent again, and sizes that halve exactly are the ones SDXL was trained on (SDXL: 8 · 4 = 32).
    """

    vae_factor: int
    unet_factor: int
    latent_channels: int
    default_size: int

    @classmethod
    def from_pretrained(cls, pipeline_dir: str | Path) -> ImageGeometry:
        folder = Path(pipeline_dir)
        vae, unet = read_config(folder / "vae"), read_config(folder / "unet")
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        unet_factor = 2 ** (len(unet["block_out_channels"]) - 1)
        return cls(vae_factor, unet_factor, int(unet["in_channels"]), int(unet["sample_size"]) * vae_factor)

    @property
    def multiple(self) -> int:
        return self.vae_factor * self.unet_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(h, w, C) of the latents for an image size; ValueError for a size the pipeline cannot produce."""
        bad = [f"{name}={v}" for name, v in (("height", height), ("width", width)) if v <= 0 or v % self.multiple]
        if bad:
            raise ValueError(f"image size {', '.join(bad)} is not a positive multiple of {self.multiple} (VAE "
                             f"factor {self.vae_factor} x UNet downsampling {self.unet_factor})")
        return height // self.vae_factor, width // self.vae_factor, self.latent_channels


def _lora_info(path: str | Path, loras: dict[str, dict], meta: dict[str, Any]) -> dict[str, Any]:
    """What metadata should say about one LoRA: its path, adapted modules per component and how it was trained
    (``lora_source.TRAINED_WITH``: the distillation guidance w' and teacher grid among them)."""
    return {"lora": str(path), "modules": {name: len(lora) for name, lora in loras.items()},
            **lora_source.trained_with(meta)}


def _shapes(models: dict[str, nnx.Module]) -> dict[str, dict[str, tuple[int, ...]]]:
    return {name: lora_formats.layer_shapes(models[name]) for name in lora_formats.COMPONENTS if name in models}


def load_lora(path: str | Path, models: dict[str, nnx.Module], *, step: int | None = None,
              ema: bool = False) -> dict[str, Any]:
    """Attach one LoRA (``lora_source.read_lora``: a file or a trainer checkpoint) to the loaded models in place,
    as unfused branches; returns ``_lora_info``. (``TDDPipeline`` merges LoRAs into the weights instead.)"""
    loras, meta = lora_source.read_lora(path, _shapes(models), step=step, ema=ema)
    for name, lora in loras.items():
        lora_formats.attach(models[name], lora)
    return _lora_info(path, loras, meta)


def read_loras(specs: Sequence[lora_source.LoRASpec], models: dict[str, nnx.Module], *,
               settings_from: int | None = None) -> tuple[list[dict[str, dict]], dict[str, Any] | None]:
    """Read and check every LoRA against the models before any weight changes: ([{component: LoRA}] per spec,
    lora_info). lora_info holds the ``TRAINED_WITH`` entries of the LoRA that sets the sampler defaults
    (``lora_source.settings_source``; all None when no LoRA records them), its index as ``settings_from``, and
    per LoRA ``_lora_info`` plus its ``scale``; None without LoRAs."""
    if not specs:
        return [], None
    shapes = _shapes(models)
    read = [lora_source.read_lora(spec.path, shapes, step=spec.step, ema=spec.ema) for spec in specs]
    source = lora_source.settings_source([(spec.path, meta) for spec, (_, meta) in zip(specs, read)],
                                         settings_from)
    info = {**lora_source.trained_with({} if source is None else read[source][1]), "settings_from": source,
            "loras": [{**_lora_info(spec.path, loras, meta), "scale": spec.scale}
                      for spec, (loras, meta) in zip(specs, read)]}
    return [loras for loras, _ in read], info


def _as_list(value, n: int, name: str) -> list:
    """A per-image list from one value or a sequence of length n."""
    if value is None or isinstance(value, (str, int, np.integer)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
    return value


def _as_images(images: np.ndarray, n: int) -> np.ndarray:
    """(n, H, W, 3) float32 in [0, 1] from uint8 or float images, one (H, W, 3) image repeated for all."""
    images = np.asarray(images)
    images = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    images = np.broadcast_to(images, (n, *images.shape)) if images.ndim == 3 else images
    if images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3:
        raise ValueError(f"init_images have shape {images.shape}, expected ({n}, H, W, 3) or (H, W, 3)")
    if images.min() < 0.0 or images.max() > 1.0:
        raise ValueError("float init_images must be in [0, 1]")
    return images


def load_controlnets(folders: Sequence[str | Path], unet: nnx.Module, geometry: ImageGeometry, *,
                     opts: ModelOptions, shardings: Any = None, variant: str | None = None) -> list[ControlNetModel]:
    """diffusers ControlNet folders (``variant`` e.g. 'fp16'), each checked to fit the UNet's skip connections
    and to read control images at the VAE's resolution."""
    nets = []
    for folder in folders:
        net = ControlNetModel.from_pretrained(folder, opts=opts, shardings=shardings, variant=variant)
        if net.skip_channels != unet.skip_channels:
            raise ValueError(f"ControlNet {folder} does not fit the UNet: skip channels {net.skip_channels} vs the "
                             f"UNet's {unet.skip_channels}")
        if net.image_factor != geometry.vae_factor:
            raise ValueError(f"ControlNet {folder} downsamples control images {net.image_factor}x, the pipeline's "
                             f"VAE {geometry.vae_factor}x: its features would not match the latents")
        nets.append(net)
    return nets


def _per_controlnet(value, k: int, name: str) -> list:
    """One entry per ControlNet from one value or a list of k (diffusers' MultiControlNet arguments)."""
    if not isinstance(value, (list, tuple)):
        return [value] * k
    if len(value) != k:
        raise ValueError(f"{name} has {len(value)} entries for {k} ControlNets")
    return list(value)


def _pad(array: np.ndarray, n: int) -> np.ndarray:
    """Fill the batch up to n rows with copies of row 0 (their outputs are dropped)."""
    return np.concatenate([array, np.repeat(array[:1], n - len(array), axis=0)]) if n > len(array) else array


class TDDPipeline:
    """Loaded SDXL components (+ optional LoRAs merged into the weights) and their compiled render functions.

    Loaded LoRAs are merged once, W + Σ_i scale_i·B_i·A_i per adapted layer (``lora.merge_weights``; several
    LoRAs add up as in diffusers' ``set_adapters`` + ``fuse_lora``), so sampling runs the plain models at
    base-model speed; the unmerged ``base_params`` are kept, so ``set_lora_scale`` / ``set_lora_scales``
    re-merge from them (0 gives back exactly the base weights) and never recompile: the weights are arguments of
    the compiled function and the graphs carry no LoRA. Inputs and outputs are host numpy arrays of one process
    (multi-host jobs: one job per host).
    ControlNets (``controlnets``) are the "controlnet" entry of ``params``: a list of weights, replicated like the
    UNet's, run inside the same compiled render.
    """

    def __init__(self, *, graphdefs: dict, params: dict, tokenizers: tuple, schedule: NoiseSchedule,
                 geometry: ImageGeometry, mesh: Mesh, loras: Sequence[dict[str, dict]] = (),
                 lora_scales: Sequence[float] | None = None, lora_scale: float = 1.0,
                 lora_info: dict | None = None):
        """``loras``: one {component: {module path: ModuleLoRA}} per LoRA, with its strength in ``lora_scales``
        (default 1 each); ``lora_scale`` multiplies them all."""
        self._graphdefs = graphdefs
        self.base_params = params
        self._loras = [{name: {path: (jnp.asarray(m.down), jnp.asarray(m.up), m.scale) for path, m in lora.items()}
                        for name, lora in loras_of.items() if lora} for loras_of in loras]
        self.tokenizers = tokenizers
        self.schedule = schedule
        self.geometry = geometry
        self.mesh = mesh
        self.lora_info = lora_info
        self._render = jax.jit(sharding.traced_on(mesh, self._render_impl),
                               static_argnames=("settings", "latent_shape", "output_type"),
                               out_shardings=sharding.replicated(mesh))
        self.lora_scales = [1.0] * len(self._loras) if lora_scales is None else [float(s) for s in lora_scales]
        self.set_lora_scale(lora_scale)

    def set_lora_scales(self, scales: Sequence[float]) -> None:
        """Each loaded LoRA's strength (in loading order); re-merges from the base weights."""
        scales = [float(s) for s in scales]
        if len(scales) != len(self._loras):
            raise ValueError(f"{len(scales)} LoRA scales given for {len(self._loras)} loaded LoRAs")
        self.lora_scales = scales
        self.set_lora_scale(self.lora_scale)

    def set_lora_scale(self, scale: float) -> None:
        """Sample with every loaded LoRA at its strength times ``scale``: ``params`` become the base weights with
        the LoRAs merged."""
        self.lora_scale = float(scale)
        self.params = dict(self.base_params)
        weighted = [(lora, strength * self.lora_scale) for lora, strength in zip(self._loras, self.lora_scales)
                    if strength * self.lora_scale]
        merged = {name: lora_lib.merge_weights(self.base_params[name],
                                               [(lora[name], s) for lora, s in weighted if name in lora])
                  for name in self.base_params if any(name in lora for lora, _ in weighted)}
        self.params.update(jax.device_put(merged, sharding.replicated(self.mesh)))

    @classmethod
    def from_pretrained(cls, pipeline_dir: str | Path, *, lora=None, lora_scale: float = 1.0,
                        lora_step: int | None = None, lora_ema: bool = False, lora_settings_from: int | None = None,
                        opts: ModelOptions = ModelOptions(), mesh: Mesh | None = None,
                        controlnets: str | Path | Sequence[str | Path] = (),
                        controlnet_variant: str | None = None) -> TDDPipeline:
        """Load a diffusers SDXL pipeline folder (tokenizers from local files only), replicated over ``mesh``
        (default: every device on one data axis), with optional LoRAs merged into the weights and diffusers
        ControlNet folders (``controlnet_variant='fp16'`` reads their fp16 weight files).

        lora: one path (a diffusers/PEFT or kohya ``.safetensors`` file, or a trainer workdir / checkpoint
        folder at ``lora_step`` or the latest, its EMA adapter with ``lora_ema``), or a sequence of paths and
        ``lora_source.LoRASpec(path, scale)``s stacked in that order, e.g. ``[LoRASpec("tdd.safetensors", 1.0),
        LoRASpec("papercut.safetensors", 0.8)]``; ``lora_scale`` multiplies every strength. The sampler defaults
        in ``lora_info`` come from the LoRA whose metadata records distillation settings, or from the one at
        index ``lora_settings_from`` (``lora_source.settings_source``). Every LoRA is read and checked before
        any weight changes: an unsupported format (LoHa, LoKr, text-encoder-only, another architecture's keys
        or shapes) is a ``LoRAFormatError`` naming the file."""
        folder = check_pipeline_dir(pipeline_dir)
        geometry = ImageGeometry.from_pretrained(folder)
        mesh = sharding.make_mesh(data=-1, fsdp=1) if mesh is None else mesh
        placed = sharding.replicated(mesh)
        models = load_components(folder, opts=opts, shardings=placed)
        specs = lora_source.as_specs(lora, step=lora_step, ema=lora_ema)
        loras, lora_info = read_loras(specs, models, settings_from=lora_settings_from)
        graphdefs, params = {}, {}
        for name, model in models.items():
            graphdefs[name], params[name] = nnx.split(model)
        folders = [controlnets] if isinstance(controlnets, (str, Path)) else list(controlnets)
        if folders:
            nets = load_controlnets(folders, models["unet"], geometry, opts=opts, shardings=placed,
                                    variant=controlnet_variant)
            graphdefs["controlnet"], params["controlnet"] = map(list, zip(*(nnx.split(net) for net in nets)))
        return cls(graphdefs=graphdefs, params=jax.device_put(params, placed),
                   tokenizers=conditioning.load_tokenizers(folder), schedule=NoiseSchedule.from_pretrained(folder),
                   geometry=geometry, mesh=mesh, loras=loras,
                   lora_scales=[spec.scale for spec in specs], lora_scale=lora_scale, lora_info=lora_info)

    @property
    def num_batch_shards(self) -> int:
        """Batches are padded to a multiple of this (the number of devices on the data axis)."""
        return sharding.num_batch_shards(self.mesh)

    @property
    def num_controlnets(self) -> int:
        return len(self._graphdefs.get("controlnet", ()))

    def _render_impl(self, params: dict, batch: dict, control_scales: jax.Array | None = None, *,
                     settings: SamplerSettings, latent_shape: tuple[int, int, int], output_type: str) -> jax.Array:
        """Token ids and seeds (and control images (B, K, H, W, 3) with per-step scales (steps, K)) -> images or
        latents (``render.render``; any LoRA is already merged into ``params``)."""
        unet, text_encoder, text_encoder_2, vae = (nnx.merge(self._graphdefs[k], params[k]) for k in MODELS)
        b = batch["seeds"].shape[0]
        ids, ids_2 = batch["ids"], batch["ids_2"]
        negatives = settings.uses_cfg and "negative_ids" in batch
        if negatives:  # negative prompts through the encoders in the same 2B batch
            ids = jnp.concatenate([ids, batch["negative_ids"]])
            ids_2 = jnp.concatenate([ids_2, batch["negative_ids_2"]])
        embeds, pooled = conditioning.encode_prompts(text_encoder, text_encoder_2, ids, ids_2)
        cond = conditioning.Cond(embeds[:b], pooled[:b], batch["time_ids"])
        uncond = None  # SDXL's zero embeddings (render fills them in) unless negative prompts are given
        if negatives:
            zero, use = cond.unconditional(), batch["has_negative"]
            uncond = conditioning.Cond(jnp.where(use[:, None, None], embeds[b:], zero.prompt_embeds),
                                       jnp.where(use[:, None], pooled[b:], zero.pooled), batch["time_ids"])
        control_nets = None
        if control_scales is not None:
            nets = [nnx.merge(g, p) for g, p in zip(self._graphdefs["controlnet"], params["controlnet"])]
            images = tuple(batch["control_images"][:, k] for k in range(len(nets)))
            control_nets = control.Control(nets, images, control_scales)
        return render(unet, vae, self.schedule, settings, batch["seeds"], latent_shape, cond, uncond,
                      x_T=batch.get("latents"), init_images=batch.get("init_images"), output_type=output_type,
                      control=control_nets)

    def __call__(self, prompts: str | Sequence[str], settings: SamplerSettings = SamplerSettings(), *,
                 seeds: int | Sequence[int] = 0, negative_prompts: str | Sequence[str | None] | None = None,
                 height: int | None = None, width: int | None = None, latents: np.ndarray | None = None,
                 init_images: np.ndarray | None = None, output_type: str = "uint8",
                 batch_size: int | None = None, control_image: Any = None,
                 controlnet_conditioning_scale: float | Sequence[float] = 1.0,
                 control_guidance_start: float | Sequence[float] = 0.0,
                 control_guidance_end: float | Sequence[float] = 1.0) -> np.ndarray:
        """Render one image per prompt: (B, H, W, 3) uint8, or floats in [0, 1], or the final latents.

        seeds: one per prompt (or one for all). negative_prompts: None (SDXL's zero unconditional embedding), or
        a string / per-prompt list where None entries keep the zero embedding; unused without CFG (guidance
        scale 1 and no w'). Time ids are (height, width, 0, 0, height, width). latents: optional initial noise
        (B, h, w, C) NHWC instead of the seeds' draw (the renoise noise still comes from the seeds): x_T, or
        with init_images the noise added to their encoding. init_images: img2img from (B, H, W, 3) uint8 or
        floats in [0, 1] (one (H, W, 3) image for all prompts too), of size height x width (default: theirs);
        ``settings.strength`` says how far they are noised (diffusers' StableDiffusionXLImg2ImgPipeline).
        batch_size: pad the batch to at least this many rows, so a ragged last batch reuses the compiled
        function; it is also padded to a multiple of ``num_batch_shards``.

        ControlNets (loaded with ``controlnets=``), as diffusers' StableDiffusionXLControlNetPipeline without
        guess_mode: control_image is, per ControlNet (a list of K with several), one image for every prompt or a
        list of one per prompt; an image is a file path, a PIL image, a uint8 (H, W, 3) array or a float one in
        [0, 1]. Any image size is resized to (height, width) as diffusers does (``control.control_image``: Lanczos
        for files, PIL images and uint8 arrays, nearest for float arrays). controlnet_conditioning_scale,
        control_guidance_start/end: one value or one per ControlNet; ControlNet k runs at step i of N unless
        i/N < start_k or (i + 1)/N > end_k. Scales and windows are inputs of the compiled render, not constants:
        changing them does not recompile.
        """
        settings.validate()
        if init_images is None and settings.strength < 1.0:
            raise ValueError(f"strength={settings.strength} < 1 is img2img: it needs init_images")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = len(prompts)
        if not n:
            raise ValueError("no prompts given")
        seeds = _as_list(seeds, n, "seeds")
        bad = [s for s in seeds if not 0 <= int(s) <= MAX_SEED]
        if bad:
            raise ValueError(f"seeds must be integers in [0, {MAX_SEED}], got {bad[:5]}")
        if init_images is not None:
            init_images = _as_images(init_images, n)
            height, width = init_images.shape[1:3] if height is None and width is None else (height, width)
        height = self.geometry.default_size if height is None else int(height)
        width = self.geometry.default_size if width is None else int(width)
        latent_shape = self.geometry.latent_shape(height, width)
        if init_images is not None and init_images.shape[1:3] != (height, width):
            raise ValueError(f"init_images are {init_images.shape[2]}x{init_images.shape[1]} (WxH), the images "
                             f"asked for {width}x{height}")

        batch = {"ids": conditioning.tokenize(self.tokenizers[0], prompts),
                 "ids_2": conditioning.tokenize(self.tokenizers[1], prompts),
                 "seeds": np.asarray(seeds, np.uint32),
                 "time_ids": np.tile(conditioning.time_ids((height, width)), (n, 1))}
        negatives = _as_list(negative_prompts, n, "negative_prompts")
        if settings.uses_cfg and any(p is not None for p in negatives):  # else no encoder work on 2B rows
            texts = ["" if p is None else p for p in negatives]
            batch["negative_ids"] = conditioning.tokenize(self.tokenizers[0], texts)
            batch["negative_ids_2"] = conditioning.tokenize(self.tokenizers[1], texts)
            batch["has_negative"] = np.array([p is not None for p in negatives])
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (n, *latent_shape):
                raise ValueError(f"latents have shape {latents.shape}, expected {(n, *latent_shape)} (NHWC)")
            batch["latents"] = latents
        if init_images is not None:
            batch["init_images"] = init_images

        scales = None
        if self.num_controlnets:
            batch["control_images"], scales = self._control_inputs(
                n, height, width, len(settings.timesteps(self.schedule.num_train_timesteps)), control_image,
                controlnet_conditioning_scale,
                control_guidance_start, control_guidance_end)
        elif control_image is not None:
            raise ValueError("control_image was given but no ControlNet is loaded (from_pretrained(controlnets=))")

        shards = self.num_batch_shards
        padded = -(-max(n, batch_size or 0) // shards) * shards
        batch = jax.device_put({k: _pad(v, padded) for k, v in batch.items()}, sharding.batch_sharding(self.mesh))
        scales = None if scales is None else jax.device_put(scales, sharding.replicated(self.mesh))
        out = self._render(self.params, batch, scales, settings=settings, latent_shape=latent_shape,
                           output_type=output_type)
        return np.asarray(out)[:n]

    def _control_inputs(self, n: int, height: int, width: int, num_steps: int, images, scales, starts,
                        ends) -> tuple[np.ndarray, np.ndarray]:
        """(control images (n, K, height, width, 3) in [0, 1], per-step scales (num_steps, K)) for K ControlNets;
        num_steps counts the steps that run (img2img runs fewer, and diffusers' guidance window spans those)."""
        k = self.num_controlnets
        if images is None:
            raise ValueError(f"control_image is required: {k} ControlNet(s) are loaded")
        if k > 1 and not (isinstance(images, (list, tuple)) and len(images) == k):
            raise ValueError(f"control_image must be a list of {k} entries, one per ControlNet")
        per_net = [images] if k == 1 else list(images)
        rows = []
        for net_images in per_net:
            per_prompt = list(net_images) if isinstance(net_images, (list, tuple)) else [net_images] * n
            if len(per_prompt) != n:
                raise ValueError(f"control_image has {len(per_prompt)} images for {n} prompts")
            rows.append(np.stack([control.control_image(image, height, width) for image in per_prompt]))
        table = control.step_scales(num_steps, *(_per_controlnet(v, k, name) for v, name in (
            (scales, "controlnet_conditioning_scale"), (starts, "control_guidance_start"),
            (ends, "control_guidance_end"))))
        return np.stack(rows, axis=1), table
