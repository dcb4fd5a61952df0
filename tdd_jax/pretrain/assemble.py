"""Write the tiny SDXL as a diffusers-format pipeline folder that diffusers, transformers and our loaders read.

A component folder is ``config.json`` + one fp16 safetensors file whose keys are the JAX state paths (they are
the diffusers/transformers checkpoint names by construction, see models/layers.py). Each recipe stage writes
its component as soon as it is trained (``save_component``), and later stages load it back from there, so the
weights a stage builds on are exactly the fp16 weights that ship. ``assemble`` then adds the tokenizers, the
scheduler (SDXL's: scaled_linear 0.00085 -> 0.012, 1000 steps, ε-prediction) and ``model_index.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from tdd_jax.models.layers import LoRAParam, state_key
from tdd_jax.pretrain.loop import read_records

# The diffusers release whose pipeline loader this format was checked against (tests/test_pretrain.py).
DIFFUSERS_VERSION = "0.42.1"
DIFFUSERS_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
# Models save_component also writes that are no pipeline component (a ControlNet ships in its own folder).
DIFFUSERS_MODELS = {**DIFFUSERS_CLASSES, "controlnet": "ControlNetModel"}
TRANSFORMERS_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
TOKENIZERS = ("tokenizer", "tokenizer_2")
MAX_PIPELINE_MB = 40.0

SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "interpolation_type": "linear", "timestep_spacing": "leading",
    "steps_offset": 1, "use_karras_sigmas": False,
}


def save_component(folder: str | Path, name: str, model: nnx.Module, config: dict) -> Path:
    """Write ``model``'s base weights (fp16) and ``config`` as the pipeline component ``name`` into ``folder``.

    name: 'unet', 'vae' or 'controlnet' (diffusers layout) or 'text_encoder'/'text_encoder_2' (transformers layout).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {state_key(path): np.ascontiguousarray(np.asarray(var.get_value(), np.float16))
               for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
               if not isinstance(var, LoRAParam)}
    if name in DIFFUSERS_MODELS:
        meta = {"_class_name": DIFFUSERS_MODELS[name], "_diffusers_version": DIFFUSERS_VERSION}
        weights = "diffusion_pytorch_model.safetensors"
    elif name in TRANSFORMERS_CLASSES:
        # dtype float32: transformers would otherwise keep the fp16 file's dtype while diffusers upcasts the UNet
        # and VAE to float32, and a plain from_pretrained(dir) would fail on mixed dtypes.
        meta = {"architectures": [TRANSFORMERS_CLASSES[name]], "model_type": "clip_text_model", "dtype": "float32"}
        weights = "model.safetensors"
    else:
        raise ValueError(f"unknown pipeline component {name!r}; expected one of "
                         f"{sorted(DIFFUSERS_MODELS) + sorted(TRANSFORMERS_CLASSES)}")
    save_file(tensors, str(folder / weights), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**meta, **config}, indent=2) + "\n")
    return folder


def folder_mb(folder: str | Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def assemble(work_dir: str | Path, out_dir: str | Path, recipe: dict | None = None) -> Path:
    """Copy the trained components and the tokenizer from ``work_dir`` into a fresh pipeline folder ``out_dir``.

    work_dir holds ``tokenizer/``, ``text_encoder/``, ``text_encoder_2/``, ``vae/`` and ``unet/`` as the stages
    wrote them; both SDXL tokenizers are the same caption-learned tokenizer. ``recipe`` (seeds, settings,
    metrics) is written to ``recipe.json`` beside the components.
    """
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    sources = {name: work_dir / name for name in [*TRANSFORMERS_CLASSES, *DIFFUSERS_CLASSES]}
    sources.update({name: work_dir / "tokenizer" for name in TOKENIZERS})
    missing = sorted({str(p) for p in sources.values() if not p.is_dir()})
    if missing:
        raise FileNotFoundError(f"pipeline components not built yet: {missing}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for name, source in sources.items():
        shutil.copytree(source, out_dir / name)
    (out_dir / "scheduler").mkdir()
    (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "force_zeros_for_empty_prompt": True, "add_watermarker": False,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", SCHEDULER_CONFIG["_class_name"]],
             **{n: ["transformers", "CLIPTokenizer"] for n in TOKENIZERS},
             **{n: ["transformers", c] for n, c in TRANSFORMERS_CLASSES.items()},
             **{n: ["diffusers", c] for n, c in DIFFUSERS_CLASSES.items()}}
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if recipe is not None:
        (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    size = folder_mb(out_dir)
    if size > MAX_PIPELINE_MB:
        raise ValueError(f"the pipeline in {out_dir} is {size:.1f} MB, over the {MAX_PIPELINE_MB:.0f} MB budget")
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", required=True, help="folder the recipe stages wrote their components to")
    parser.add_argument("--out", required=True, help="pipeline folder to (re)create")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir)
    out = assemble(work_dir, args.out, read_records(work_dir))
    print(f"pipeline: {out} ({folder_mb(out):.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
