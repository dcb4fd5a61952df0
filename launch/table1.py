"""The paper's Table 1 on the embedded tiny SDXL: LCM, PCM, TCD, TDD and TDD-adv distilled from the same teacher with
the same budget, each sampled at 4-8 steps, scored by FID / KID / prompt accuracy with the emoji feature extractor.

    python3 launch/table1.py --out workdirs/table1            # the whole table (README: "Table 1")
    python3 launch/table1.py --out /tmp/t1 --quick            # 2 methods x 1 step count, a smoke run

Stages, each resumable (a finished student, sample set or score is reused on a rerun):
1. students: ``python -m tdd_jax.train --config=configs/tdd_tiny.py:METHOD`` in ``OUT/students/METHOD`` (the trainer
   resumes from its checkpoints); the configs differ only in the target rule and the method's published settings.
2. samples: every row renders the same prompts from the same seeds (``OUT/samples/ROW_STEPS.npz``), each method
   with its own published sampler (``cfg.validation``: γ and CFG), on its own training grid; TDD also with the
   non-equidistant schedule (5-7 steps) and with guidance-scale tuning (paper Eq. 14, w' = the training w').
3. scores: FID and KID against the teacher's training emoji (real images), prompt accuracy (the classifier names
   the caption), and the mean |Δ| to the teacher's 25-step samples from the same noise (``OUT/table.md``,
   ``OUT/table.csv``, ``OUT/table.json``, ``OUT/grid.png``).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tdd_jax.atomic import atomic_file
from tdd_jax.data.emoji import load_emoji
from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.evaluation.features import evaluate_images, make_extractor, reference_statistics
from tdd_jax.image_grid import labelled_grid
from tdd_jax.pipeline import TDDPipeline
from tdd_jax.pretrain.teacher import TEACHER_GROUPS

REPO = Path(__file__).resolve().parents[1]
METHODS = ("lcm", "pcm", "tcd", "tdd", "tdd_adv")
LABELS = {"tdd_adv": "TDD-adv"}  # the paper's "Ours(adv)"; the others are the method name in capitals
STEPS = (4, 5, 6, 7, 8)
NON_EQUIDISTANT_STEPS = (5, 6, 7)
TEACHER_STEPS = 25
# Guidance-scale tuning row: the official demo's CFG 1.7 on top of the student, tuned by w' (Eq. 14). At
# s = 1 + w' the tuned output is exactly the student's conditional one, so a smaller s is the meaningful setting.
TUNED_GUIDANCE_SCALE = 1.7


def method_config(method: str):
    return importlib.import_module("configs.tdd_tiny").get_config(method)


def train_student(method: str, out: Path, data_dir: str, train_steps: int | None, quick: bool) -> Path:
    """Distil (or finish distilling) one method's LoRA; returns its workdir."""
    workdir = out / "students" / method
    cmd = [sys.executable, "-m", "tdd_jax.train", f"--config={REPO / 'configs' / 'tdd_tiny.py'}:{method}",
           f"--workdir={workdir}", f"--config.data.path={data_dir}"]
    steps = method_config(method).num_train_steps if train_steps is None else train_steps
    cmd.append(f"--config.num_train_steps={steps}")
    if quick:  # no validation grids, one checkpoint at the end
        cmd += [f"--config.validation.every={steps + 1}", f"--config.checkpoint.every={steps}"]
    print(f"[students] {method}: {steps} steps in {workdir}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return workdir


def rows(methods, steps, published_gamma: bool = False) -> list[dict]:
    """The table's rows: (label, method, sampler settings per step count); with ``published_gamma`` also every
    method with its published γ (LCM 1, PCM 0, TCD 0.3, TDD 0.2) instead of the deterministic sampler."""
    def sampler(cfg, gamma: float) -> dict:
        return dict(gamma=gamma, guidance_scale=float(cfg.validation.guidance_scale),
                    grid_steps=int(cfg.solver.num_steps), k_min=int(cfg.target.k_min), k_max=int(cfg.target.k_max))

    out = []
    for method in methods:
        cfg = method_config(method)
        base = sampler(cfg, float(cfg.validation.gamma))
        out.append({"label": LABELS.get(method, method.upper()), "method": method,
                    "settings": {n: SamplerSettings(num_steps=n, **base) for n in steps}})
        if method == "tdd":
            ne = [n for n in steps if n in NON_EQUIDISTANT_STEPS]
            if ne:
                out.append({"label": "TDD non-equidistant", "method": method,
                            "settings": {n: SamplerSettings(num_steps=n, non_equidistant=True, **base) for n in ne}})
            tuned = {**base, "guidance_scale": TUNED_GUIDANCE_SCALE}
            out.append({"label": f"TDD w'={cfg.guidance.w_max:g}, CFG {TUNED_GUIDANCE_SCALE}", "method": method,
                        "settings": {n: SamplerSettings(num_steps=n, w_prime=float(cfg.guidance.w_max), **tuned)
                                     for n in steps}})
    if published_gamma:  # each method's own published γ (configs/methods.py), other settings as above
        for method in methods:
            gamma = float(importlib.import_module("configs.tdd_sdxl").get_config(method).validation.gamma)
            base = sampler(method_config(method), gamma)
            out.append({"label": f"{LABELS.get(method, method.upper())} γ={gamma:g}", "method": method,
                        "settings": {n: SamplerSettings(num_steps=n, **base) for n in steps}})
    return out


def cached_samples(path: Path, render) -> np.ndarray:
    """uint8 images from ``path`` if a finished set is there, else rendered and written atomically."""
    if path.is_file():
        return np.load(path)["images"]
    images = render()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images)
    return images


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pipeline", type=Path, default=REPO / "tdd_jax" / "assets" / "tiny_sdxl")
    parser.add_argument("--data_dir", default=str(REPO / "workdirs" / "emoji_data"))
    parser.add_argument("--methods", help=f"comma-separated, some of {METHODS} (default: all; --quick: tdd,lcm)")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="sampling step counts")
    parser.add_argument("--num_prompts", type=int, default=256, help="prompts (one seed each) per cell")
    parser.add_argument("--train_steps", type=int, help="distillation steps (default: the tiny config's)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--grid_prompts", type=int, default=2, help="prompts (grid rows) per table row in grid.png")
    parser.add_argument("--published_gamma", action="store_true",
                        help="also rows with each method's published sampler γ (the main rows all use γ = 0)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tdd and lcm (or --methods), 4 steps, 8 prompts, 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.methods, args.steps, args.num_prompts = args.methods or "tdd,lcm", "4", 8
        args.train_steps = args.train_steps or 2
    args.methods = args.methods or ",".join(METHODS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected some of {METHODS}")
    steps = [int(n) for n in args.steps.split(",")]

    data = load_emoji(args.data_dir, "train", 64, TEACHER_GROUPS)
    pick = np.linspace(0, len(data["captions"]) - 1, min(args.num_prompts, len(data["captions"]))).astype(int)
    prompts = [str(c) for c in data["captions"][pick]]
    seeds = list(range(len(prompts)))
    print(f"[data] {len(data['images'])} reference emoji, {len(prompts)} prompts per cell", flush=True)

    workdirs = {m: train_student(m, args.out, args.data_dir, args.train_steps, args.quick) for m in methods}

    teacher_cfg = 1.0 + float(method_config("tdd").guidance.w_max)
    base = TDDPipeline.from_pretrained(args.pipeline)
    teacher_grid = int(method_config("tdd").solver.num_steps)
    teacher = cached_samples(args.out / "samples" / f"teacher_{TEACHER_STEPS}.npz", lambda: base(
        prompts, SamplerSettings(num_steps=TEACHER_STEPS, gamma=0.0, guidance_scale=teacher_cfg,
                                 grid_steps=teacher_grid), seeds=seeds, batch_size=args.batch_size))

    table = rows(methods, steps, args.published_gamma)
    samples: dict[tuple[str, int], np.ndarray] = {}
    for row in table:
        pipe = TDDPipeline.from_pretrained(args.pipeline, lora=workdirs[row["method"]])
        for n, settings in row["settings"].items():
            print(f"[samples] {row['label']}, {n} steps", flush=True)
            samples[row["label"], n] = cached_samples(
                args.out / "samples" / f"{slug(row['label'])}_{n}.npz",
                lambda: pipe(prompts, settings, seeds=seeds, batch_size=args.batch_size))

    extractor = make_extractor("emoji")
    reference = reference_statistics(extractor, data["images"])
    subset = min(1000, len(prompts), len(data["images"]))
    results = []
    for row in table:
        for n in row["settings"]:
            print(f"[scores] {row['label']}, {n} steps", flush=True)
            score = evaluate_images(extractor, samples[row["label"], n], reference, captions=prompts,
                                    teacher=teacher, kid_subset_size=subset)
            results.append({"row": row["label"], "steps": n, **score})
    teacher_score = evaluate_images(extractor, teacher, reference, captions=prompts, kid_subset_size=subset)
    write_outputs(args.out, table, steps, results, teacher_score, samples, prompts, args.grid_prompts)


def write_outputs(out: Path, table, steps, results, teacher_score, samples, prompts, grid_prompts: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps({"results": results, "teacher": teacher_score}, indent=1))
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["row", "steps", "fid", "kid", "kid_std", "prompt_accuracy",
                                    "teacher_mean_abs_delta", "images"])
        writer.writeheader()
        writer.writerows(results)
    by_cell = {(r["row"], r["steps"]): r for r in results}
    lines = ["| method | " + " | ".join(f"{n} steps" for n in steps) + " |",
             "| --- |" + " --- |" * len(steps)]
    for metric, fmt in (("fid", "{:.2f}"), ("kid", "{:.4f}"), ("prompt_accuracy", "{:.1%}"),
                        ("teacher_mean_abs_delta", "{:.3f}")):
        lines.append(f"| **{metric}** |" + " |" * len(steps))
        for row in table:
            cells = [fmt.format(by_cell[row["label"], n][metric]) if (row["label"], n) in by_cell else "—"
                     for n in steps]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines.append(f"\nTeacher ({TEACHER_STEPS} steps, CFG): FID {teacher_score['fid']:.2f}, KID "
                 f"{teacher_score['kid']:.4f}, prompt accuracy {teacher_score['prompt_accuracy']:.1%}.")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)

    shown = min(grid_prompts, len(prompts))
    grid_rows, labels = [], []
    blank = np.full_like(next(iter(samples.values()))[0], 255)
    for row in table:
        for i in range(shown):
            grid_rows.append([samples[row["label"], n][i] if (row["label"], n) in samples else blank for n in steps])
            labels.append(f"{row['label']}: {prompts[i]}")
    labelled_grid(np.asarray(grid_rows), labels, column_labels=[f"{n} steps" for n in steps]).save(out / "grid.png")
    print(f"wrote {out / 'table.md'}, table.csv, table.json, grid.png", flush=True)


if __name__ == "__main__":
    main()
