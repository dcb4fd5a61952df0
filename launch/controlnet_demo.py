"""The shipped edge-map ControlNet under the teacher, the base model in 4 steps and the TDD student in 4 steps.

    python3 launch/controlnet_demo.py --pipeline tdd_jax/assets/tiny_sdxl \\
        --controlnet tdd_jax/assets/tiny_controlnet_edges --lora workdirs/tdd_tiny --data_dir workdirs/emoji_data \\
        --out tdd_jax/assets/tiny_controlnet_demo.png

The contact sheet's 16 held-in emoji names × ``--seeds`` initial noises; each is rendered with its own emoji's
edge map (``edges.edge_map`` of its training image) as the control image, by the teacher (``--teacher_steps``,
CFG 1 + w' of the student's checkpoint), the base model in ``--steps`` steps at that CFG, and the TDD student in
``--steps`` steps without CFG (the student never saw the ControlNet: its LoRA is merged into the UNet the
ControlNet was trained beside). Deterministic samplers (γ = 0) on the student's solver grid, as
``student_vs_base.py``. Prints, per row, how well the samples follow the control edges: the mean edge F1
(``edges.edge_f1``, one-pixel tolerance) of each sample's own edge map against its control map, with the
ControlNet and, from the same noises and the same compiled sampler, without it (conditioning scale 0).
``--style_lora`` adds a row: the student with a second LoRA stacked on it (``tdd_jax.pretrain.style_lora``'s sepia
LoRA: each row also prints its samples' ``sepia_distance``, 0 for a sepia image). ``--out`` writes a grid of the
first ``--show`` names (seed 0): control map | one column per row.
"""

import argparse

import numpy as np

from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.image_grid import labelled_grid
from tdd_jax.lora_source import LoRASpec
from tdd_jax.pipeline import TDDPipeline
from tdd_jax.pretrain.contact_sheet import PROMPTS, training_images
from tdd_jax.pretrain.edges import control_images, edge_f1, edge_map
from tdd_jax.pretrain.style_lora import sepia_distance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--controlnet", required=True, help="the edge-map ControlNet folder")
    parser.add_argument("--lora", required=True, help="the TDD student: trainer workdir or LoRA file")
    parser.add_argument("--data_dir", required=True, help="emoji TFDS dir (the training images' edge maps)")
    parser.add_argument("--style_lora", help="a LoRA stacked on the student for one more row")
    parser.add_argument("--style_scale", type=float, default=1.0)
    parser.add_argument("--out", help="PNG grid to write")
    parser.add_argument("--seeds", type=int, default=2, help="initial noises per name (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--teacher_steps", type=int, default=25)
    parser.add_argument("--controlnet_scale", type=float, default=1.0)
    parser.add_argument("--show", type=int, default=8, help="names in the grid")
    args = parser.parse_args()

    student = TDDPipeline.from_pretrained(args.pipeline, lora=args.lora, controlnets=args.controlnet)
    trained = student.lora_info
    if trained.get("w_max") is None or trained.get("solver_steps") is None:
        parser.error(f"--lora {args.lora} does not record its training guidance w' and solver grid")
    guidance, grid = 1.0 + float(trained["w_max"]), int(trained["solver_steps"])
    print(f"teacher and base: CFG {guidance}; solver grid {grid} steps; ControlNet scale {args.controlnet_scale}",
          flush=True)
    control = edge_map(training_images(args.data_dir, PROMPTS, 64))
    prompts = [p for p in PROMPTS for _ in range(args.seeds)]
    seeds = [j for _ in PROMPTS for j in range(args.seeds)]
    controls = np.repeat(control, args.seeds, axis=0)

    def render(pipe, steps, cfg, scale):
        settings = SamplerSettings(num_steps=steps, gamma=0.0, guidance_scale=cfg, grid_steps=grid)
        return pipe(prompts, settings, seeds=seeds, control_image=list(control_images(controls)),
                    controlnet_conditioning_scale=scale)

    base = TDDPipeline.from_pretrained(args.pipeline, controlnets=args.controlnet)
    rows = {f"teacher {args.teacher_steps} steps": (base, args.teacher_steps, guidance),
            f"base {args.steps} steps": (base, args.steps, guidance),
            f"TDD {args.steps} steps": (student, args.steps, 1.0)}
    if args.style_lora:
        styled = TDDPipeline.from_pretrained(args.pipeline, controlnets=args.controlnet, lora=[
            LoRASpec(args.lora, 1.0), LoRASpec(args.style_lora, args.style_scale)], lora_settings_from=0)
        rows[f"TDD + style {args.steps} steps"] = (styled, args.steps, 1.0)
    images = {}
    for name, (pipe, steps, cfg) in rows.items():
        images[name] = render(pipe, steps, cfg, args.controlnet_scale)
        without = render(pipe, steps, cfg, 0.0)
        f1, f1_without = (float(edge_f1(edge_map(x), controls).mean()) for x in (images[name], without))
        print(f"{name} + ControlNet: edge F1 {f1:.3f} (without the ControlNet {f1_without:.3f}); sepia distance "
              f"{sepia_distance(images[name]):.4f}; {len(prompts)} samples", flush=True)
    if args.out:
        first = np.arange(min(args.show, len(PROMPTS))) * args.seeds  # seed 0 of each name
        maps = (control_images(controls[first]) * 255).astype(np.uint8)
        cells = np.stack([maps, *(x[first] for x in images.values())], axis=1)
        labelled_grid(cells, [f"{PROMPTS[i // args.seeds]}" for i in first], per_row=2, zoom=1,
                      column_labels=["edges", *(n.replace(" steps", "").replace(" + ", "+") for n in images)]
                      ).save(args.out, optimize=True)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
