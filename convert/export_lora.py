"""Export a trained LoRA from a trainer checkpoint to diffusers and/or kohya ``.safetensors`` files.

    python -m convert.export_lora --checkpoint runs/tdd --diffusers out/tdd_lora.safetensors \\
        --kohya out/tdd_lora_kohya.safetensors [--ema] [--step 20000] [--dtype float16]

The diffusers file loads with ``StableDiffusionXLPipeline.load_lora_weights(path)`` (alpha/rank folded into
lora_B, see tdd_jax/models/lora_formats.py); the kohya file loads in ComfyUI/A1111 and diffusers. Both carry the
training metadata (method, rank, alpha, target modules, K_min, K_max, η, ρ, guidance range and mode, solver
grid, step, config; ``checkpointing.lora_metadata``) in the safetensors header, readable with
``safe_open(path, 'np').metadata()`` or decoded by ``tdd_jax.lora_source.read_header`` (what ``tdd_jax.sample``
reads for ``--w_prime=auto`` and its default ``--grid_steps``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

from safetensors.numpy import save_file

from convert.sources import DTYPES
from tdd_jax import cli, console
from tdd_jax.atomic import atomic_file
from tdd_jax.lora_source import header_metadata
from tdd_jax.training.checkpointing import checkpoint_lora
from tdd_jax.models import lora_formats


def export(lora, meta: Mapping, *, diffusers: str | Path | None = None, kohya: str | Path | None = None,
           dtype: str = "float32", overwrite: bool = False) -> list[Path]:
    """Write the requested files atomically; returns their paths."""
    if diffusers is None and kohya is None:
        raise ValueError("nothing to export: give a diffusers and/or a kohya output path")
    np_dtype = DTYPES[dtype]
    scales = sorted({m.scale for m in lora.values()})
    jobs = []
    if diffusers is not None:
        tensors = lora_formats.to_diffusers(lora, dtype=np_dtype)
        jobs.append((diffusers, tensors, header_metadata(meta, {"lora_B_includes_scale": json.dumps(scales)})))
    if kohya is not None:
        tensors = lora_formats.to_kohya(lora, dtype=np_dtype)
        jobs.append((kohya, tensors, header_metadata(meta, {"ss_network_module": "networks.lora",
                                                            **lora_formats.describe(lora)})))
    # All files are renamed into place only after every one of them was written.
    with contextlib.ExitStack() as stack:
        temps = [stack.enter_context(atomic_file(path, overwrite=overwrite)) for path, _, _ in jobs]
        for tmp, (_, tensors, header) in zip(temps, jobs):
            save_file(tensors, str(tmp), metadata=header)
    return [Path(path) for path, _, _ in jobs]


@cli.guarded
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m convert.export_lora", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="trainer workdir, its checkpoints/ folder, or one step folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--ema", action="store_true", help="export the EMA adapter instead of the online one")
    parser.add_argument("--diffusers", help="output .safetensors in diffusers/PEFT format")
    parser.add_argument("--kohya", help="output .safetensors in kohya format (ComfyUI/A1111)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="tensor dtype of the files")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    console.add_verbosity_flag(parser)
    args = parser.parse_args(argv)
    console.route_logs(args.verbosity, to_file=False)
    if args.diffusers is None and args.kohya is None:
        parser.error("give --diffusers and/or --kohya")
    lora, meta = checkpoint_lora(args.checkpoint, step=args.step, ema=args.ema)
    for path in export(lora, meta, diffusers=args.diffusers, kohya=args.kohya, dtype=args.dtype,
                       overwrite=args.overwrite):
        print(f"wrote {path} ({len(lora)} modules, step {meta.get('step')}, {'EMA' if args.ema else 'online'})")


if __name__ == "__main__":
    main()
