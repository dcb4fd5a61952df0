"""Convert a single-file SDXL checkpoint (original Stability key names) into a diffusers folder.

    python -m convert.import_checkpoint --checkpoint sd_xl_base_1.0.safetensors \\
        --config path/to/stable-diffusion-xl-base-1.0 --out sdxl_diffusers [--dtype float16]

The key mapping is diffusers' own single-file loader (``StableDiffusionXLPipeline.from_single_file``), run
offline: ``--config`` is a local diffusers SDXL folder providing model_index.json, the component configs, the
tokenizers and the scheduler config (weights are not read from it). The output folder is what tdd_jax's loaders
and the trainer take as ``pipeline_dir``.
"""

from __future__ import annotations

from pathlib import Path

from tdd_jax import cli, console
from tdd_jax.atomic import atomic_dir

TORCH_DTYPES = ("float32", "float16", "bfloat16")


def import_checkpoint(checkpoint: str | Path, config: str | Path, out: str | Path, *, dtype: str = "float32",
                      overwrite: bool = False) -> Path:
    """Write the diffusers folder ``out`` (safetensors) for ``checkpoint``; returns ``out``."""
    checkpoint, config = Path(checkpoint), Path(config)
    if not checkpoint.is_file():
        raise cli.UserError(f"--checkpoint {checkpoint}: no such file")
    if not (config / "model_index.json").is_file():
        raise cli.UserError(f"--config {config} is not a diffusers pipeline folder (no model_index.json)")
    import torch
    from diffusers import StableDiffusionXLPipeline
    with atomic_dir(out, overwrite=overwrite) as tmp:
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(checkpoint), config=str(config), local_files_only=True, torch_dtype=getattr(torch, dtype))
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(out)


@cli.guarded
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m convert.import_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="single-file SDXL .safetensors (original key names)")
    parser.add_argument("--config", required=True,
                        help="local diffusers SDXL folder with model_index.json, component configs and tokenizers")
    parser.add_argument("--out", required=True, help="output diffusers pipeline folder")
    parser.add_argument("--dtype", choices=TORCH_DTYPES, default="float32", help="dtype of the written weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    console.add_verbosity_flag(parser)
    args = parser.parse_args(argv)
    console.route_logs(args.verbosity, to_file=False)
    out = import_checkpoint(args.checkpoint, args.config, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
