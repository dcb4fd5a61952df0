"""How close the base model and the TDD student get to the teacher's 25-step samples in 4 steps (README numbers).

    python3 launch/student_vs_base.py --pipeline tdd_jax/assets/tiny_sdxl --lora workdirs/tdd_tiny

Same prompts and initial noise for all three; deterministic samplers (γ = 0) on the 50-step grid the tiny config
distils on; teacher and base with CFG 1 + w' = 4.5, the student without CFG (w' is distilled into it). Prints the
mean |Δ| per pixel (0..255) of base and student to the teacher, and their ratio.
"""

import argparse

import numpy as np

from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.pipeline import TDDPipeline

PROMPTS = ("grinning face", "red heart", "cat face", "pizza", "rocket", "sun", "ghost", "frog", "fire", "banana",
           "snowman", "strawberry")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--lora", required=True, help="trainer workdir or LoRA file")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--teacher_guidance_scale", type=float, default=4.5)
    parser.add_argument("--grid_steps", type=int, default=50)
    args = parser.parse_args()
    seeds = list(range(len(PROMPTS)))

    def render(pipe, steps, guidance):
        settings = SamplerSettings(num_steps=steps, gamma=0.0, guidance_scale=guidance, grid_steps=args.grid_steps)
        return pipe(list(PROMPTS), settings, seeds=seeds).astype(np.float32)

    base = TDDPipeline.from_pretrained(args.pipeline)
    teacher = render(base, 25, args.teacher_guidance_scale)
    base_gap = np.abs(render(base, args.steps, args.teacher_guidance_scale) - teacher).mean()
    student = TDDPipeline.from_pretrained(args.pipeline, lora=args.lora)
    student_gap = np.abs(render(student, args.steps, 1.0) - teacher).mean()
    print(f"mean |pixel - teacher 25 steps| over {len(PROMPTS)} prompts: base {args.steps} steps {base_gap:.2f}, "
          f"TDD student {args.steps} steps {student_gap:.2f}, student/base {student_gap / base_gap:.3f}")


if __name__ == "__main__":
    main()
