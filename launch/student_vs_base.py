"""How close the base model and the TDD student get to the teacher's 25-step samples in a few steps (README numbers).

    python3 launch/student_vs_base.py --pipeline tdd_jax/assets/tiny_sdxl --lora workdirs/tdd_tiny \\
        --data_dir workdirs/emoji_data --out workdirs/tdd_tiny/student_vs_base.png

The contact sheet's 16 held-in emoji names × ``--seeds`` initial noises, the same for all three; deterministic
samplers (γ = 0) on the student's solver grid; teacher and base with the CFG the student was distilled from
(1 + w', read from its checkpoint), the student without CFG (w' is distilled into it). Prints the mean |Δ| per
pixel (0..255) of base and student to the teacher, with their ratio, over every sample and over the samples
where the teacher draws its prompt (its sample is nearest that emoji's training image among the 16): where the
teacher itself draws a noise-coloured blob (some initial noises fail for every prompt, see the README) there is
no picture for a student to get close to. With ``--data_dir`` it also counts, per column, the samples that are
nearest their own emoji, and ``--out`` writes every sample as teacher | base | student.
"""

import argparse

import numpy as np

from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.image_grid import labelled_grid
from tdd_jax.pipeline import TDDPipeline
from tdd_jax.pretrain.contact_sheet import PROMPTS, follows_prompt, training_images


def gap(images: np.ndarray, teacher: np.ndarray, where: np.ndarray | None = None) -> float:
    """Mean |Δ| per pixel over the samples selected by ``where`` ((prompt, seed) bools; None: all)."""
    per_sample = np.abs(images - teacher).mean(axis=(2, 3, 4))
    return float(per_sample.mean() if where is None else per_sample[where].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--lora", required=True, help="trainer workdir or LoRA file")
    parser.add_argument("--data_dir", help="emoji TFDS dir (the main job builds workdirs/emoji_data): adds the "
                                           "prompt-following counts and the teacher-draws-its-prompt subset")
    parser.add_argument("--out", help="PNG of every sample: teacher | base | student")
    parser.add_argument("--seeds", type=int, default=4, help="initial noises per prompt (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--teacher_steps", type=int, default=25)
    parser.add_argument("--teacher_guidance_scale", type=float,
                        help="teacher and base CFG (default: 1 + w' of the student's checkpoint)")
    parser.add_argument("--grid_steps", type=int, help="solver grid (default: the student's training grid)")
    args = parser.parse_args()
    student_pipe = TDDPipeline.from_pretrained(args.pipeline, lora=args.lora)
    trained = student_pipe.lora_info
    if args.teacher_guidance_scale is None:
        if trained.get("w_max") is None:
            parser.error(f"--lora {args.lora} does not record its training guidance w': "
                         "pass --teacher_guidance_scale")
        args.teacher_guidance_scale = 1.0 + float(trained["w_max"])
    if args.grid_steps is None:
        if trained.get("solver_steps") is None:
            parser.error(f"--lora {args.lora} does not record its solver grid: pass --grid_steps")
        args.grid_steps = int(trained["solver_steps"])
    print(f"teacher and base: CFG {args.teacher_guidance_scale}; solver grid {args.grid_steps} steps", flush=True)
    prompts = [p for p in PROMPTS for _ in range(args.seeds)]
    seeds = [j for _ in PROMPTS for j in range(args.seeds)]

    def render(pipe, steps, guidance):
        settings = SamplerSettings(num_steps=steps, gamma=0.0, guidance_scale=guidance, grid_steps=args.grid_steps)
        images = pipe(prompts, settings, seeds=seeds).astype(np.float32)
        return images.reshape(len(PROMPTS), args.seeds, *images.shape[1:])

    base = TDDPipeline.from_pretrained(args.pipeline)
    teacher = render(base, args.teacher_steps, args.teacher_guidance_scale)
    base_images = render(base, args.steps, args.teacher_guidance_scale)
    student = render(student_pipe, args.steps, 1.0)
    n = teacher.shape[0] * teacher.shape[1]
    b, s = gap(base_images, teacher), gap(student, teacher)
    print(f"mean |pixel - teacher {args.teacher_steps} steps|, all {n} samples: base {args.steps} steps {b:.2f}, "
          f"TDD student {args.steps} steps {s:.2f}, student/base {s / b:.3f}")
    if args.data_dir:
        references = training_images(args.data_dir, PROMPTS, teacher.shape[2]).astype(np.float32)
        drawn = follows_prompt(teacher, references)
        b, s = gap(base_images, teacher, drawn), gap(student, teacher, drawn)
        print(f"on the {drawn.sum()} samples where the teacher draws its prompt: base {b:.2f}, TDD student {s:.2f}, "
              f"student/base {s / b:.3f}")
        counts = {name: int(follows_prompt(images, references).sum())
                  for name, images in (("teacher", teacher), ("base", base_images), ("student", student))}
        print(f"samples nearest their own emoji (of {n}): teacher {args.teacher_steps} steps {counts['teacher']}, "
              f"base {args.steps} steps {counts['base']}, TDD student {args.steps} steps {counts['student']}")
    if args.out:
        cells = np.stack([teacher, base_images, student], axis=2).reshape(n, 3, *teacher.shape[2:])
        labels = [f"{p} (seed {j})" for p, j in zip(prompts, seeds)]
        labelled_grid(cells.astype(np.uint8), labels, per_row=4, zoom=2,
                      column_labels=[f"teacher {args.teacher_steps}", f"base {args.steps}",
                                     f"TDD {args.steps}"]).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
