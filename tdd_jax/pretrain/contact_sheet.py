"""The teacher's contact sheet: 25-step DDIM samples of held-in emoji names, one cell per name, as a PNG.

This is the tiny SDXL's quality check: distillation can only be judged against a teacher whose samples are
recognisable. DDIM here is the project's pipeline and sampler with γ = 0 (deterministic DPM-Solver++(1) steps on
the 250-step grid, last step to x̂0) and classifier-free guidance against SDXL's all-zero unconditional
embeddings; the pipeline is read back from its diffusers folder, so the sheet shows exactly what ships.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tdd_jax.data.emoji import load_emoji
from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.image_grid import labelled_grid
from tdd_jax.pipeline import TDDPipeline

# Held-in names (train split, teacher groups) with distinct shapes and colours.
PROMPTS = ("grinning face", "red heart", "cat face", "dog face", "rocket", "sun", "pile of poo", "fire", "pizza",
           "ghost", "rainbow", "strawberry", "snowman", "banana", "frog", "crescent moon")


def render(pipeline_dir: str | Path, prompts, *, seeds: int = 4, num_steps: int = 25, guidance_scale: float = 4.0,
           seed: int = 0) -> np.ndarray:
    """uint8 images (len(prompts), seeds, H, W, 3); sample j of every prompt uses seed ``seed + j``."""
    pipe = TDDPipeline.from_pretrained(pipeline_dir)
    settings = SamplerSettings(num_steps=num_steps, gamma=0.0, guidance_scale=guidance_scale)
    images = pipe([p for p in prompts for _ in range(seeds)], settings,
                  seeds=[seed + j for _ in prompts for j in range(seeds)])
    return images.reshape(len(prompts), seeds, *images.shape[1:])


def training_images(data_dir: str, prompts, image_size: int) -> np.ndarray:
    """The train-split image of each prompt (uint8 (N, S, S, 3)); a prompt that is not a held-in name is an error."""
    data = load_emoji(data_dir, "train", image_size)
    index = {str(c): i for i, c in enumerate(data["captions"])}
    missing = [p for p in prompts if p not in index]
    if missing:
        raise ValueError(f"not emoji names of the train split: {missing}")
    return data["images"][[index[p] for p in prompts]]


def follows_prompt(samples: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Which samples are nearer (pixel MSE) to their own prompt's training image than to every other prompt's.

    samples (P, S, H, W, 3) with S samples of prompt p in row p; references (P, H, W, 3), same scale. Returns
    bool (P, S). With distinct emoji as prompts this is a cheap recognisability check (chance: 1/P).
    """
    samples, references = np.asarray(samples, np.float32), np.asarray(references, np.float32)
    distance = ((samples[:, :, None] - references[None, None]) ** 2).mean(axis=(3, 4, 5))  # (prompt, sample, ref)
    return distance.argmin(axis=2) == np.arange(len(references))[:, None]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="the diffusers-format pipeline folder")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--prompts", nargs="*", default=list(PROMPTS))
    parser.add_argument("--seeds", type=int, default=4, help="samples per prompt (columns)")
    parser.add_argument("--num_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", help="emoji TFDS dir: put each prompt's training image first in its cell")
    args = parser.parse_args(argv)
    images = render(args.pipeline, args.prompts, seeds=args.seeds, num_steps=args.num_steps,
                    guidance_scale=args.guidance_scale, seed=args.seed)
    if args.data_dir:
        images = np.concatenate([training_images(args.data_dir, args.prompts, images.shape[2])[:, None], images], 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(images, args.prompts, per_row=2).save(args.out)
    print(f"contact sheet: {len(args.prompts)} prompts x {args.seeds} seeds, {args.num_steps} DDIM steps, "
          f"CFG {args.guidance_scale} -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
