"""Fuse a LoRA into a base UNet and write a diffusers ``unet/`` folder (config.json + safetensors).

    python -m convert.fuse_unet --base stable-diffusion-xl-base-1.0 --lora runs/tdd [--ema] [--step N] \\
        --scale 1.0 --out sdxl_tdd_fused/unet [--dtype float16]
    python -m convert.fuse_unet --base sdxl --lora tdd_lora.safetensors --out fused/unet  # any LoRA file

W' = W + scale · (alpha/rank) · B A, computed in float32 per tensor, then cast to ``--dtype`` (default: each
tensor's dtype in the base). The folder loads with ``UNet2DConditionModel.from_pretrained`` in diffusers and in
tdd_jax, and needs no LoRA support at inference time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from convert.sources import DTYPES, lora_source
from tdd_jax import cli, console
from tdd_jax.atomic import atomic_dir
from tdd_jax.lora_source import header_metadata
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


def fuse(base: str | Path, lora_path: str | Path, out: str | Path, *, scale: float = 1.0, dtype: str = "same",
         step: int | None = None, ema: bool = False, variant: str | None = None, overwrite: bool = False) -> Path:
    """Write ``out`` (config.json + diffusion_pytorch_model.safetensors); returns ``out``."""
    folder = unet_folder(base)
    handles = [safe_open(str(f), framework="numpy") for f in weight_files(folder, variant)]
    where = {key: h for h in handles for key in h.keys()}
    shapes = {}
    for key, h in where.items():
        shape = tuple(h.get_slice(key).get_shape())
        if key.endswith(".weight") and len(shape) in (2, 4):
            shapes[key[: -len(".weight")]] = shape
    lora, meta = lora_source(lora_path, shapes, step=step, ema=ema)  # checked before any output folder exists
    with atomic_dir(out, overwrite=overwrite) as tmp:
        fused = {}
        for key, h in where.items():
            w = h.get_tensor(key)
            target = w.dtype if dtype == "same" else DTYPES[dtype]
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            if module in lora:
                w = w.astype(np.float32) + np.float32(scale) * lora[module].delta()
            fused[key] = np.ascontiguousarray(w.astype(target))
        header = header_metadata(meta, {"fused_lora": str(lora_path), "fused_lora_scale": repr(float(scale))})
        shutil.copyfile(folder / "config.json", tmp / "config.json")
        save_file(fused, str(tmp / WEIGHTS), metadata=header)
    return Path(out)


@cli.guarded
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m convert.fuse_unet", description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="diffusers SDXL pipeline folder or its unet/ folder")
    parser.add_argument("--lora", required=True,
                        help="trainer workdir/checkpoint folder, or a diffusers/kohya LoRA .safetensors file")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--ema", action="store_true", help="use the EMA adapter of a checkpoint")
    parser.add_argument("--scale", type=float, default=1.0, help="LoRA strength (1 = as trained)")
    parser.add_argument("--out", required=True, help="output unet folder")
    parser.add_argument("--dtype", choices=["same", *sorted(DTYPES)], default="same",
                        help="output tensor dtype (default: that of the base)")
    parser.add_argument("--variant", default=None, help="base weights variant, e.g. fp16")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    console.add_verbosity_flag(parser)
    args = parser.parse_args(argv)
    console.route_logs(args.verbosity, to_file=False)
    try:
        out = fuse(args.base, args.lora, args.out, scale=args.scale, dtype=args.dtype, step=args.step,
                   ema=args.ema, variant=args.variant, overwrite=args.overwrite)
    except LoRAFormatError as e:  # the LoRA does not fit this base: the message names the file and keys
        raise cli.UserError(f"--lora {e}") from e
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
