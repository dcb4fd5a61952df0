"""Fuse a LoRA into a base UNet and write a diffusers ``unet/`` folder (config.json + safetensors).

    python -m convert.fuse_unet --base stable-diffusion-xl-base-1.0 --lora runs/tdd [--ema] [--step N] \\
        --scale 1.0 --out sdxl_tdd_fused/unet [--dtype float16]
    python -m convert.fuse_unet --base sdxl --lora tdd_lora.safetensors --out fused/unet  # any LoRA file
    python -m convert.fuse_unet --base sdxl --lora tdd.safetensors:1.0 --lora papercut.safetensors:0.8 --out f/unet

W' = W + scale · Σ_i strength_i · (alpha_i/rank_i) · B_i A_i over the ``--lora PATH[:STRENGTH]`` flags, computed
in float32 per tensor, then cast to ``--dtype`` (default: each tensor's dtype in the base). Every LoRA is read
and checked before anything is written. The output's header carries the training metadata of the LoRA that
sets the sampler defaults (``tdd_jax.lora_source.settings_source``; ``--lora_settings_from`` picks it). The
folder loads with ``UNet2DConditionModel.from_pretrained`` in diffusers and in tdd_jax, and needs no LoRA support
at inference time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from convert.sources import DTYPES, lora_source
from tdd_jax import cli, console
from tdd_jax.atomic import atomic_dir
from tdd_jax.lora_source import LoRASpec, as_specs, header_metadata, settings_source
from tdd_jax.models.loading import weight_files
from tdd_jax.models.lora_formats import LoRAFormatError

WEIGHTS = "diffusion_pytorch_model.safetensors"


def unet_folder(base: str | Path) -> Path:
    """A diffusers pipeline folder's ``unet/`` or a UNet folder itself."""
    base = Path(base)
    folder = base / "unet" if (base / "unet" / "config.json").is_file() else base
    if not (folder / "config.json").is_file():
        raise cli.UserError(f"--base {base} is neither a diffusers UNet folder nor a pipeline folder with unet/")
    return folder


def fuse(base: str | Path, lora, out: str | Path, *, scale: float = 1.0, dtype: str = "same",
         step: int | None = None, ema: bool = False, variant: str | None = None, overwrite: bool = False,
         lora_settings_from: int | None = None) -> Path:
    """Write ``out`` (config.json + diffusion_pytorch_model.safetensors); returns ``out``.

    lora: one path, or several paths / ``LoRASpec``s (strengths) fused together (``lora_source.as_specs``)."""
    specs = as_specs(lora, step=step, ema=ema)
    if not specs:
        raise ValueError("no LoRA given to fuse")
    folder = unet_folder(base)
    handles = [safe_open(str(f), framework="numpy") for f in weight_files(folder, variant)]
    where = {key: h for h in handles for key in h.keys()}
    shapes = {}
    for key, h in where.items():
        shape = tuple(h.get_slice(key).get_shape())
        if key.endswith(".weight") and len(shape) in (2, 4):
            shapes[key[: -len(".weight")]] = shape
    # every LoRA read and checked before any output folder exists
    read = [lora_source(spec.path, shapes, step=spec.step, ema=spec.ema) for spec in specs]
    source = settings_source([(spec.path, meta) for spec, (_, meta) in zip(specs, read)], lora_settings_from)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        fused = {}
        for key, h in where.items():
            w = h.get_tensor(key)
            target = w.dtype if dtype == "same" else DTYPES[dtype]
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            deltas = [(spec.scale, lora[module]) for spec, (lora, _) in zip(specs, read) if module in lora]
            if deltas:
                w = w.astype(np.float32)
                for strength, m in deltas:
                    w = w + np.float32(scale * strength) * m.delta()
            fused[key] = np.ascontiguousarray(w.astype(target))
        fused_loras = json.dumps([[spec.path, spec.scale] for spec in specs])
        header = header_metadata({} if source is None else read[source][1],
                                 {"fused_lora": fused_loras, "fused_lora_scale": repr(float(scale))})
        shutil.copyfile(folder / "config.json", tmp / "config.json")
        save_file(fused, str(tmp / WEIGHTS), metadata=header)
    return Path(out)


@cli.guarded
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m convert.fuse_unet", description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="diffusers SDXL pipeline folder or its unet/ folder")
    parser.add_argument("--lora", required=True, action="append",
                        help="PATH[:STRENGTH]: trainer workdir/checkpoint folder, or a diffusers/kohya LoRA "
                             ".safetensors file; repeat it to fuse several LoRAs (strength default 1)")
    parser.add_argument("--lora_settings_from", type=int, default=None,
                        help="index of the --lora (0 = the first) whose training metadata goes into the output "
                             "(default: the one that records distillation settings)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--ema", action="store_true", help="use the EMA adapter of a checkpoint")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every LoRA strength (1 = as trained)")
    parser.add_argument("--out", required=True, help="output unet folder")
    parser.add_argument("--dtype", choices=["same", *sorted(DTYPES)], default="same",
                        help="output tensor dtype (default: that of the base)")
    parser.add_argument("--variant", default=None, help="base weights variant, e.g. fp16")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    console.add_verbosity_flag(parser)
    args = parser.parse_args(argv)
    console.route_logs(args.verbosity, to_file=False)
    loras = [LoRASpec.parse(text, step=args.step, ema=args.ema) for text in args.lora]
    try:
        out = fuse(args.base, loras, args.out, scale=args.scale, dtype=args.dtype, variant=args.variant,
                   overwrite=args.overwrite, lora_settings_from=args.lora_settings_from)
    except LoRAFormatError as e:  # a LoRA does not fit this base: the message names the file and keys
        raise cli.UserError(f"--lora {e}") from e
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
