"""The paper's Table 1 and its §4.5 ablations on the embedded tiny SDXL, each cell mean ± std over training seeds.

    python3 launch/table1.py --out workdirs/table1 --plan     # what the grid costs, and what is left of it
    nohup python3 launch/table1.py --out workdirs/table1 > workdirs/table1.log 2>&1 &   # the grid, resumable
    python3 launch/table1.py --out /tmp/t1 --quick            # smoke run: tdd, 2 seeds, 2-step students

Stages, each resumable (kill and rerun: a finished student, sample set, feature pass or score is reused):
1. students: every variant (``VARIANTS``: a ``configs/tdd_tiny.py`` method, config overrides, a training-steps
   factor) distilled once per training seed (``--seeds``; ``--config.seed=S`` draws the LoRA init, the per-step
   noise and, through ``cfg.data.seed``, the data order and augmentation) in ``OUT/students/VARIANT/seedS``.
2. samples: every row renders the same ``--num_prompts`` prompts (the teacher's emoji groups) with
   ``--noises_per_prompt`` noises each; image j of prompt i always has sample seed j·NOISE_STRIDE + (the prompt's
   index in the emoji data), for every row and training seed, so rows and seeds are paired. Teacher controls: the
   25-step teacher (no LoRA, γ = 0) on the same prompts and noises at every CFG a row approximates
   (``teacher_guidance_scale``). Cached in ``OUT/samples/SET.npz``.
3. scores, fixed before any result was seen, per sample set in ``OUT/scores/SET.json``; in each feature space of
   ``--features`` (``emoji``: the shipped emoji classifier; ``inception``: the FID InceptionV3):
   - ``fid_real``, ``kid_real``: FID and KID against the real emoji of the teacher's groups;
   - ``fid_teacher``, ``kid_teacher``: FID and KID against the matching teacher control ("FID to teacher":
     same prompts, same noises);
   and in pixels and labels: ``prompt_accuracy`` (the emoji classifier names the caption), ``teacher_mad`` (mean
   |Δ| per pixel, 0-1, to the teacher control's image from the same prompt and noise), and the artefact measures
   ``clipped_share`` and ``mean_saturation`` (``tdd_jax.evaluation.artefacts``), read beside the teacher's.
4. tables (``OUT/table.{md,csv,json}``, ``OUT/summary.md``, ``OUT/grid.png``): each cell is mean ± std (ddof=1)
   over training seeds; each table's comparisons "A vs B" are paired by seed, a win only when a paired t-test over
   seeds rejects equality at 5 % two-sided (``tdd_jax.evaluation.seed_stats``), else "not resolved"; each of the
   paper's claims (``Claim``) is held, not held or not resolved on one metric fixed in advance
   (``DECISIVE_METRIC``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from configs.methods import set_field
from tdd_jax.atomic import atomic_file
from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.evaluation.seed_stats import claim_verdict, format_mean_std, mean_std, paired_difference

REPO = Path(__file__).resolve().parents[1]

STEPS = (4, 5, 6, 7, 8)
ABLATION_STEPS = (4, 8)  # ablations 2-4 and the budget table: the ends of the range, to keep the grid's cost sane
NON_EQUIDISTANT_STEPS = (5, 6, 7)
SEEDS = (0, 1, 2)
TEACHER_STEPS = 25
NOISE_STRIDE = 100_000  # above the emoji dataset's size, so (prompt, noise) -> seed is one-to-one
REAL_EMOJI = 643  # the teacher's groups in the emoji train split: --plan's count of real images to featurise
TUNED_SCALES = (1.7, 3.0)  # guidance-scale tuning s (the official demo's 1.7, and 3)
ARTEFACT_CFG = 3.0  # the CFG of the decoupled-guidance ablation
LOW_CFG = 1.7  # the x0-clipping ablation's CFG
CLIP_STEPS = (0, 1, 2)
TABLES = ("table1", "target", "guidance", "tuning", "clip", "budget")
FEATURES = ("emoji", "inception")
# Inception costs several times the emoji classifier per image: by default only the tables whose claims are the
# paper's headline (Table 1, budget) are also scored in it; --features TABLE=emoji,inception adds others.
DEFAULT_FEATURES = {"table1": ("emoji", "inception"), "budget": ("emoji", "inception")}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A student: ``configs/tdd_tiny.py:method``, with config overrides and its training steps times a factor."""

    method: str
    overrides: tuple[tuple[str, object], ...] = ()
    steps_factor: int = 1
    label: str = ""


VARIANTS = {
    "lcm": Variant("lcm", label="LCM"),
    "pcm": Variant("pcm", label="PCM"),
    "tcd": Variant("tcd", label="TCD"),
    "tdd": Variant("tdd", label="TDD"),
    "tdd_adv": Variant("tdd_adv", label="TDD-adv"),
    "tdd_eta0": Variant("tdd", (("target.eta", 0.0),), label="TDD η=0"),
    "tdd_rho0": Variant("tdd", (("guidance.rho", 0.0),), label="TDD ρ=0"),
    "tdd_official": Variant("tdd", (("guidance.mode", "official"),), label="TDD official guidance"),
    "tdd_x4": Variant("tdd", steps_factor=4, label="TDD 4× steps"),
    "tcd_x4": Variant("tcd", steps_factor=4, label="TCD 4× steps"),
}

# Per-unit costs on this project's 2-core CPU machine with the tiny SDXL at 64 px, measured 2026-12-07 by the clip
# table's units from an empty workdir, alone on the machine (``measured_costs`` over 3 trainings and 38 sets): a
# 500-step tdd training took 4.4-4.9 min, a sample set of 512 images 20-42 s, features of 512 images 0.13 s (emoji)
# and 40 s (inception). They price --plan until the grid's own finished units have measured them.
COST_TRAIN_START_S = 75.0  # start-up and train-step compile of one training run
COST_TRAIN_STEP_S = 0.38  # one step at batch 16
COST_SAMPLE_START_S = 20.0  # pipeline load and sampler compile of one sample set
COST_IMAGE_S = 0.015  # per image and set: text encoders and VAE decoder
COST_UNET_CALL_S = 0.0028  # one image through one UNet call (CFG: two calls)
COST_FEATURES_S = {"emoji": 0.00025, "inception": 0.078}  # one image's features

# The metric that decides a claim, fixed before the grid ran: the distillation metric (FID to the teacher control
# the row approximates) in the feature space every table has. FID to real emoji is not it: the 25-step teacher
# itself scores worst there, so it rewards leaving the teacher. Artefact claims use clipped_share instead.
DECISIVE_METRIC = "fid_teacher_emoji"
ARTEFACT_METRIC = "clipped_share"
# summary.md's cells: what the claims are decided on and the headline context beside it (table.md has every metric)
SUMMARY_METRICS = ("fid_teacher_emoji", "fid_real_emoji", "fid_teacher_inception", "fid_real_inception",
                   ARTEFACT_METRIC, "prompt_accuracy")


# ---------------------------------------------------------------------------------------------------- variants


def variant_config(name: str):
    """The trainer config of variant ``name`` (training steps not yet multiplied by its factor)."""
    cfg = importlib.import_module("configs.tdd_tiny").get_config(VARIANTS[name].method)
    for field, value in VARIANTS[name].overrides:
        set_field(cfg, field, value)
    return cfg


def published_gamma(name: str) -> float:
    """The sampler γ the variant's method publishes (LCM 1, PCM 0, TCD 0.3, TDD 0.2)."""
    return float(importlib.import_module("configs.tdd_sdxl").get_config(VARIANTS[name].method).validation.gamma)


def training_guidance(name: str) -> float:
    """The fixed w' the variant was distilled with (guidance-scale tuning needs one value)."""
    g = variant_config(name).guidance
    if g.w_min != g.w_max:
        raise ValueError(f"variant {name}: guidance.w_min={g.w_min} != w_max={g.w_max}, no single training w'")
    return float(g.w_max)


def train_steps(name: str, base: int | None) -> int:
    return (variant_config(name).num_train_steps if base is None else base) * VARIANTS[name].steps_factor


def teacher_guidance_scale(settings: SamplerSettings, w_trained: float) -> float:
    """The teacher CFG that a student sample approximates.

    A student distilled towards the teacher at CFG 1 + w' (LCM-form guidance w') learned
    ε_s(c) ≈ ε(∅) + (1 + w')·(ε(c) − ε(∅)), and ε_s(∅) ≈ ε(∅) (from its empty-prompt examples; a student with
    ρ = 0 never saw one, so for it this is an assumption). Plain CFG s on the student then gives
    ε_s(∅) + s·(ε_s(c) − ε_s(∅)) = ε(∅) + s(1 + w')·(ε(c) − ε(∅)): the teacher at CFG s(1 + w') (s = 1: the
    distillation target 1 + w' = 8). Guidance-scale tuning (paper Eq. 14) divides that plus w'·ε_s(∅) by 1 + w':
    ε(∅) + s·(ε(c) − ε(∅)), the teacher at CFG s (e.g. 1.7).
    """
    if settings.w_prime:
        return float(settings.guidance_scale)
    return round(float(settings.guidance_scale) * (1.0 + w_trained), 6)


# ------------------------------------------------------------------------------------------------------- tables


@dataclasses.dataclass
class Row:
    label: str
    variant: str | None  # None: a teacher control
    settings: dict[int, SamplerSettings]  # per sampling step count
    teacher_cfg: float  # the CFG of the teacher control this row is compared with


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claim of the paper, as "A beats B" (``kind`` 'wins') or "A is no worse than B" ('no_loss') over the given
    row pairs at every step count both rows have, decided on one metric (``seed_stats.claim_verdict``). The
    metric of each claim was fixed here before any result of the grid was seen; the others are shown beside it."""

    text: str
    pairs: tuple[tuple[str, str], ...]
    metric: str = DECISIVE_METRIC
    kind: str = "wins"


@dataclasses.dataclass
class Table:
    name: str
    title: str
    steps: list[int]
    rows: list[Row]
    comparisons: list[tuple[str, str]]  # (label A, label B): A vs B at every step count both have
    features: tuple[str, ...] = ("emoji",)
    artefacts: bool = False  # show clipped_share and mean_saturation
    claims: list[Claim] = dataclasses.field(default_factory=list)


def student_row(label: str, name: str, steps, *, gamma: float | None = None, cfg: float | None = None,
                w_prime: float | None = None, non_equidistant: bool = False, clip_steps: int = 0) -> Row:
    """A row of variant ``name`` sampled with its config's validation sampler, changed as the arguments say."""
    vc = variant_config(name)
    base = SamplerSettings(
        gamma=float(vc.validation.gamma) if gamma is None else gamma,
        guidance_scale=float(vc.validation.guidance_scale) if cfg is None else cfg, w_prime=w_prime,
        non_equidistant=non_equidistant, clip_steps=clip_steps, grid_steps=int(vc.solver.num_steps),
        k_min=int(vc.target.k_min), k_max=int(vc.target.k_max))
    return Row(label, name, {n: dataclasses.replace(base, num_steps=n) for n in steps},
               teacher_guidance_scale(base, training_guidance(name)))


def teacher_label(cfg: float) -> str:
    return f"Teacher {TEACHER_STEPS} steps, CFG {cfg:g}"


def build_tables(names, steps, ablation_steps, features: dict[str, tuple[str, ...]], variants) -> list[Table]:
    """The chosen tables with their rows and comparisons, rows of variants outside ``variants`` left out."""
    label = {name: v.label for name, v in VARIANTS.items()}
    w = training_guidance("tdd")
    tables = []
    for name in names:
        if name == "table1":
            rows = [student_row(label[m], m, steps) for m in ("lcm", "pcm", "tcd", "tdd", "tdd_adv")]
            rows.append(student_row("TDD non-equidistant", "tdd", [n for n in steps if n in NON_EQUIDISTANT_STEPS],
                                    non_equidistant=True))
            rows.append(student_row(f"TDD w'={w:g}, CFG {TUNED_SCALES[0]}", "tdd", steps, cfg=TUNED_SCALES[0],
                                    w_prime=w))
            for m in ("lcm", "pcm", "tcd", "tdd", "tdd_adv"):
                if published_gamma(m) != float(variant_config(m).validation.gamma):
                    rows.append(student_row(f"{label[m]} γ={published_gamma(m):g}", m, steps,
                                            gamma=published_gamma(m)))
            comparisons = [("TDD", "TCD"), ("TDD γ=0.2", "TCD γ=0.3"), ("TDD", "PCM"), ("TDD", "LCM"),
                           ("TDD-adv", "TDD"), ("TDD non-equidistant", "TDD"), ("TDD γ=0.2", "TDD"),
                           (f"TDD w'={w:g}, CFG {TUNED_SCALES[0]}", teacher_label(TUNED_SCALES[0]))]
            claims = [Claim("TDD beats TCD, deterministic sampling (γ = 0)", (("TDD", "TCD"),)),
                      Claim("TDD beats TCD, each at its published γ (Table 1)", (("TDD γ=0.2", "TCD γ=0.3"),)),
                      Claim("TDD beats PCM (Table 1)", (("TDD", "PCM"),)),
                      Claim("TDD beats LCM (Table 1)", (("TDD", "LCM"),)),
                      Claim("TDD-adv beats TDD (Table 1)", (("TDD-adv", "TDD"),)),
                      Claim("the non-equidistant schedule (Ours*) beats the equidistant one at 5-7 steps",
                            (("TDD non-equidistant", "TDD"),))]
            table = Table(name, "Table 1: methods at their published samplers", list(steps), rows, comparisons,
                          claims=claims)
        elif name == "target":
            rows = [student_row(f"{label[m]} γ={g:g}", m, steps, gamma=g)
                    for g in (0.0, 0.2) for m in ("pcm", "tdd_eta0", "tdd")]
            comparisons = [pair for g in (0.2, 0.0) for pair in (
                (f"TDD γ={g:g}", f"PCM γ={g:g}"), (f"TDD η=0 γ={g:g}", f"PCM γ={g:g}"),
                (f"TDD γ={g:g}", f"TDD η=0 γ={g:g}"))]
            claims = [Claim("TDD's 4-8 mappings beat PCM's single 4-step mapping at every step count under γ = 0.2 "
                            "(Fig. 5)", (("TDD γ=0.2", "PCM γ=0.2"),)),
                      Claim("the offset η = 0.3 beats η = 0 under γ = 0.2 (Fig. 5)", (("TDD γ=0.2", "TDD η=0 γ=0.2"),)),
                      Claim("η = 0.3 costs nothing against η = 0 under γ = 0 ('balanced', Fig. 5)",
                            (("TDD γ=0", "TDD η=0 γ=0"),), kind="no_loss")]
            table = Table(name, "Ablation 1, target selection (Fig. 5): PCM's single 4-step mapping vs TDD's "
                          "4-8 mappings with η = 0 and η = 0.3 (TDD)", list(steps), rows, comparisons, claims=claims)
        elif name == "guidance":
            rows = [student_row(f"{label[m]}, CFG {c:g}", m, ablation_steps, cfg=c)
                    for c in (ARTEFACT_CFG, 1.0) for m in ("tdd_rho0", "tdd", "tdd_official")]
            comparisons = [pair for c in (ARTEFACT_CFG, 1.0) for pair in (
                (f"TDD, CFG {c:g}", f"TDD ρ=0, CFG {c:g}"), (f"TDD, CFG {c:g}", f"TDD official guidance, CFG {c:g}"))]
            pair = ((f"TDD, CFG {ARTEFACT_CFG:g}", f"TDD ρ=0, CFG {ARTEFACT_CFG:g}"),)
            claims = [Claim(f"decoupled guidance ρ = 0.2 is more stable than ρ = 0 at CFG {ARTEFACT_CFG:g} (closer to "
                            "the teacher, Fig. 6a)", pair),
                      Claim(f"… with fewer artefacts (pinned pixels) at CFG {ARTEFACT_CFG:g} (Fig. 6a)", pair,
                            metric=ARTEFACT_METRIC)]
            table = Table(name, "Ablation 2, decoupled guidance (Fig. 6a): ρ = 0 vs ρ = 0.2 (TDD, decoupled) vs "
                          "'official' mode, sampled with CFG", list(ablation_steps), rows, comparisons,
                          artefacts=True, claims=claims)
        elif name == "tuning":
            rows, comparisons, claims = [], [], []
            for m in ("tdd", "tcd", "pcm"):
                wm = training_guidance(m)
                pairs = []
                for s in TUNED_SCALES:
                    tuned, plain = f"{label[m]} w'={wm:g}, CFG {s:g}", f"{label[m]} CFG {s:g}"
                    rows += [student_row(tuned, m, ablation_steps, cfg=s, w_prime=wm),
                             student_row(plain, m, ablation_steps, cfg=s)]
                    comparisons += [(tuned, plain), (tuned, teacher_label(s))]
                    pairs.append((tuned, plain))
                claims.append(Claim(f"tuning (w' = {wm:g}) keeps the guided {label[m]} student's CFG "
                                    f"{' and '.join(f'{s:g}' for s in TUNED_SCALES)} from overexposing (Fig. 6b)",
                                    tuple(pairs), metric=ARTEFACT_METRIC))
            table = Table(name, "Ablation 3, guidance-scale tuning (Eq. 13/14, Fig. 6b): tuned vs plain CFG s, "
                          "each against the teacher at its effective CFG", list(ablation_steps), rows, comparisons,
                          artefacts=True, claims=claims)
        elif name == "clip":
            rows, comparisons, claims = [], [], []
            for tuned in (True, False):
                head = f"TDD w'={w:g}, CFG {LOW_CFG:g}" if tuned else f"TDD CFG {LOW_CFG:g}"
                rows += [student_row(f"{head}, clip {k}", "tdd", ablation_steps, cfg=LOW_CFG,
                                     w_prime=w if tuned else None, clip_steps=k) for k in CLIP_STEPS]
                pairs = [(f"{head}, clip {k}", f"{head}, clip 0") for k in CLIP_STEPS[1:]]
                comparisons += pairs
                claims.append(Claim(f"x0 clipping on the first steps improves {'tuned' if tuned else 'plain'} CFG "
                                    f"{LOW_CFG:g} samples (closer to the teacher, Fig. 7)", tuple(pairs)))
            table = Table(name, "Ablation 4, x0 clipping (Fig. 7) at low CFG: dynamic thresholding on the first "
                          "0/1/2 steps", list(ablation_steps), rows, comparisons, artefacts=True, claims=claims)
        elif name == "budget":
            rows = [student_row(f"{label[m]} γ={g:g}", m, ablation_steps, gamma=g)
                    for m in ("tdd", "tcd", "tdd_x4", "tcd_x4") for g in sorted({0.0, published_gamma(m)})]
            comparisons = [("TDD γ=0", "TCD γ=0"), ("TDD γ=0.2", "TCD γ=0.3"), ("TDD 4× steps γ=0", "TCD 4× steps γ=0"),
                           ("TDD 4× steps γ=0.2", "TCD 4× steps γ=0.3"), ("TDD 4× steps γ=0", "TDD γ=0"),
                           ("TCD 4× steps γ=0", "TCD γ=0")]
            claims = [Claim("TDD beats TCD at 4× the training steps, γ = 0",
                            (("TDD 4× steps γ=0", "TCD 4× steps γ=0"),)),
                      Claim("TDD beats TCD at 4× the training steps, each at its published γ",
                            (("TDD 4× steps γ=0.2", "TCD 4× steps γ=0.3"),))]
            table = Table(name, "Budget: TDD and TCD at 1× and 4× the training steps", list(ablation_steps), rows,
                          comparisons, claims=claims)
        else:
            raise ValueError(f"--tables: unknown table {name!r}; expected some of {TABLES}")
        labels = {r.label for r in table.rows} | {teacher_label(r.teacher_cfg) for r in table.rows}
        unknown = {label for pair in table.comparisons for label in pair} - labels
        assert not unknown, f"table {name}: comparisons name rows it does not have: {sorted(unknown)}"
        unclaimed = {p for c in table.claims for p in c.pairs} - set(table.comparisons)
        assert not unclaimed, f"table {name}: claims on pairs it does not compare: {sorted(unclaimed)}"
        table.rows = [r for r in table.rows if r.variant in variants and r.settings]
        table.rows += [Row(teacher_label(c), None, {}, c) for c in sorted({r.teacher_cfg for r in table.rows})]
        kept = {r.label for r in table.rows}
        table.claims = [c for c in table.claims if all(label in kept for p in c.pairs for label in p)]
        table.features = features.get(name, features.get("", ("emoji",)))
        tables.append(table)
    return tables


# ---------------------------------------------------------------------------------------------------- the units


def settings_key(s: SamplerSettings) -> str:
    """A sample set's file name within its student's folder, from what decides the samples."""
    key = f"n{s.num_steps}_g{s.gamma:g}_cfg{s.guidance_scale:g}"
    key += f"_wp{s.w_prime:g}" if s.w_prime else ""
    key += "_ne" if s.non_equidistant else ""
    return key + (f"_clip{s.clip_steps}" if s.clip_steps else "")


def set_id(row: Row, seed: int | None, n: int | None) -> str:
    if row.variant is None:
        return f"teacher/cfg{row.teacher_cfg:g}"
    return f"{row.variant}/seed{seed}/{settings_key(row.settings[n])}"


def teacher_settings(cfg: float) -> SamplerSettings:
    return SamplerSettings(num_steps=TEACHER_STEPS, gamma=0.0, guidance_scale=cfg,
                           grid_steps=int(variant_config("tdd").solver.num_steps))


@dataclasses.dataclass
class Plan:
    """Every unit the chosen tables need: trainings (variant, seed), sample sets and the feature spaces each
    sample set is scored in."""

    trainings: dict[tuple[str, int], int]  # -> training steps
    sets: dict[str, tuple[Row, int | None, int | None]]  # set id -> (row, seed, steps); teacher sets included
    spaces: dict[str, set[str]]  # set id -> feature spaces

    @classmethod
    def of(cls, tables: list[Table], seeds, base_steps: int | None) -> Plan:
        trainings, sets, spaces = {}, {}, {}
        for table in tables:
            for row in table.rows:
                cells = [(None, None)] if row.variant is None else [(s, n) for s in seeds for n in row.settings]
                for seed, n in cells:
                    if row.variant is not None:
                        trainings[row.variant, seed] = train_steps(row.variant, base_steps)
                    key = set_id(row, seed, n)
                    sets.setdefault(key, (row, seed, n))
                    spaces.setdefault(key, set()).update(table.features)
        return cls(trainings, sets, spaces)


def student_dir(out: Path, name: str, seed: int) -> Path:
    return out / "students" / name / f"seed{seed}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, data) -> None:
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def train_student(out: Path, name: str, seed: int, steps: int, data_dir: str) -> None:
    """Distil (or finish distilling) one variant's LoRA with one training seed; a finished run is reused."""
    workdir = student_dir(out, name, seed)
    if read_json(workdir / "done.json").get("steps") == steps:
        return
    variant = VARIANTS[name]
    cmd = [sys.executable, "-m", "tdd_jax.train", f"--config={REPO / 'configs' / 'tdd_tiny.py'}:{variant.method}",
           f"--workdir={workdir}", f"--config.data.path={data_dir}", f"--config.seed={seed}",
           f"--config.num_train_steps={steps}", f"--config.validation.every={steps + 1}",
           f"--config.checkpoint.every={min(100, steps)}"]
    cmd += [f"--config.{field}={value}" for field, value in variant.overrides]
    resumed = (workdir / "checkpoints").is_dir()
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                                     str(out / "jax_cache")))
    start = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    seconds = time.time() - start
    write_json(workdir / "done.json", {"steps": steps, "seconds": seconds, "resumed": resumed})
    print(f"[students] {name} seed{seed}: {steps} steps, {seconds / 60:.1f} min", flush=True)


def sample_calls(settings: SamplerSettings) -> int:
    """UNet evaluations per image."""
    return settings.num_steps * (2 if settings.uses_cfg else 1)


def measured_costs(out: Path, plan: Plan) -> dict:
    """Per-unit costs from this grid's finished units where there are enough of them, else the constants. The
    per-image and per-UNet-call costs are fitted together over finished sets of different UNet-call counts. A
    set's render time includes its sampler compile, so they err on the high side."""
    costs = {"train_step": COST_TRAIN_STEP_S, "train_start": COST_TRAIN_START_S, "unet_call": COST_UNET_CALL_S,
             "image": COST_IMAGE_S, "sample_start": COST_SAMPLE_START_S,
             **{f"features_{k}": v for k, v in COST_FEATURES_S.items()}}
    runs = [read_json(student_dir(out, name, seed) / "done.json") for name, seed in plan.trainings]
    runs = [r for r in runs if r and not r["resumed"] and r["steps"] >= 50]
    if runs:
        costs["train_step"] = float(np.median([(r["seconds"] - costs["train_start"]) / r["steps"] for r in runs]))
    calls, per_image, features = [], [], {space: [] for space in FEATURES}
    for key, (row, _, n) in plan.sets.items():
        score = read_json(out / "scores" / f"{key}.json")
        settings = teacher_settings(row.teacher_cfg) if row.variant is None else row.settings[n]
        if score.get("sample_seconds") and score["images"] >= 64:
            calls.append(sample_calls(settings))
            per_image.append(score["sample_seconds"] / score["images"])
        for space in FEATURES:
            if f"feature_seconds/{space}" in score and score["images"] >= 64:
                features[space].append(score[f"feature_seconds/{space}"] / score["images"])
    if len(set(calls)) > 1:  # per image: image + unet_call · calls, fitted over sets of different call counts
        image, unet_call = np.linalg.lstsq(np.stack([np.ones(len(calls)), calls], 1), np.array(per_image),
                                           rcond=None)[0]
        costs["image"], costs["unet_call"] = max(float(image), 0.0), max(float(unet_call), 0.0)
    elif calls:
        costs["unet_call"] = max(float(np.median(per_image) - costs["image"]) / calls[0], 0.0)
    for space, values in features.items():
        if values:
            costs[f"features_{space}"] = float(np.median(values))
    return costs


def plan_lines(out: Path, plan: Plan, images: int, real_images: int) -> list[str]:
    """What the chosen grid needs, what of it is already done, and its estimated CPU time."""
    costs = measured_costs(out, plan)
    trainings_left = {k: v for k, v in plan.trainings.items()
                      if read_json(student_dir(out, *k) / "done.json").get("steps") != v}
    sets_left = {k for k in plan.sets if not (out / "samples" / f"{k}.npz").is_file()}
    teacher_sets = {k for k, (row, _, _) in plan.sets.items() if row.variant is None}
    extractions = [(k, s) for k, spaces in plan.spaces.items() for s in sorted(spaces)]
    spaces = sorted({s for _, s in extractions})
    extractions_left = [(k, s) for k, s in extractions if f"feature_seconds/{s}" not in
                        read_json(out / "scores" / f"{k}.json")]

    def train_s(units):
        return sum(costs["train_start"] + costs["train_step"] * steps for steps in units.values())

    def sample_s(keys):
        total = 0.0
        for key in keys:
            row, _, n = plan.sets[key]
            settings = teacher_settings(row.teacher_cfg) if row.variant is None else row.settings[n]
            total += costs["sample_start"] + images * (costs["image"] + costs["unet_call"] * sample_calls(settings))
        return total

    def feature_s(units):
        return sum(costs[f"features_{s}"] * images for _, s in units) + sum(
            costs[f"features_{s}"] * real_images for s in spaces)

    rows = [("trainings", len(plan.trainings), len(trainings_left), train_s(plan.trainings),
             train_s(trainings_left)),
            ("student sample sets", len(plan.sets) - len(teacher_sets), len(sets_left - teacher_sets),
             sample_s(set(plan.sets) - teacher_sets), sample_s(sets_left - teacher_sets)),
            ("teacher sample sets", len(teacher_sets), len(sets_left & teacher_sets), sample_s(teacher_sets),
             sample_s(sets_left & teacher_sets)),
            ("feature extractions", len(extractions), len(extractions_left), feature_s(extractions),
             feature_s(extractions_left))]
    lines = [f"plan for {out}: {images} images per sample set, training steps "
             f"{sum(plan.trainings.values())} in all",
             f"{'unit':<22}{'total':>7}{'left':>7}{'CPU h':>9}{'left h':>9}"]
    lines += [f"{name:<22}{total:>7}{left:>7}{s / 3600:>9.2f}{s_left / 3600:>9.2f}"
              for name, total, left, s, s_left in rows]
    lines.append(f"{'total':<22}{'':>7}{'':>7}{sum(r[3] for r in rows) / 3600:>9.2f}"
                 f"{sum(r[4] for r in rows) / 3600:>9.2f}")
    lines.append("unit costs (s): " + ", ".join(f"{k} {v:.4g}" for k, v in costs.items()))
    return lines


# ------------------------------------------------------------------------------------------------------ scoring


class Scorer:
    """Scores sample sets into ``OUT/scores/SET.json``, loading extractors and reference features on first need."""

    def __init__(self, out: Path, real_images: np.ndarray, captions: list[str], inception_weights: str | None):
        self.out, self.real_images, self.captions = out, real_images, captions
        self.inception_weights = inception_weights
        self._extractors, self._references = {}, {}

    def extractor(self, space: str):
        from tdd_jax.evaluation.features import make_extractor
        if space not in self._extractors:
            self._extractors[space] = make_extractor(space, self.inception_weights if space == "inception" else None)
        return self._extractors[space]

    def reference(self, name: str, space: str, images) -> dict:
        """Statistics and features of a reference set ('real' or a teacher control), cached in OUT/features."""
        from tdd_jax.evaluation.features import reference_statistics
        if (name, space) not in self._references:
            path = self.out / "features" / f"{name}_{space}.npz"
            if not path.is_file():
                stats = reference_statistics(self.extractor(space), images())
                with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as f:
                    np.savez(f, **stats)
            with np.load(path) as data:
                self._references[name, space] = dict(data)
        return self._references[name, space]

    @staticmethod
    def needed(spaces, teacher: str) -> list[str]:
        keys = ["prompt_accuracy", f"teacher_mad/{teacher}", "clipped_share", "mean_saturation"]
        for space in sorted(spaces):
            keys += [f"{m}/{ref}/{space}" for ref in ("real", teacher) for m in ("fid", "kid", "kid_std")]
        return keys

    def score(self, key: str, images, teacher: str, teacher_images, spaces) -> dict:
        """Every score of set ``key`` against the real emoji and the teacher control ``teacher``; ``images`` and
        ``teacher_images`` are callables, called only when a score is missing."""
        from tdd_jax.evaluation import artefacts
        from tdd_jax.evaluation.features import feature_scores, mean_abs_delta, prompt_accuracy
        path = self.out / "scores" / f"{key}.json"
        score = read_json(path)
        missing = [k for k in self.needed(spaces, teacher) if k not in score]
        if not missing:
            return score
        x = images()
        score.update({"images": len(x), "prompt_accuracy": prompt_accuracy(self.extractor("emoji"), x, self.captions),
                      f"teacher_mad/{teacher}": mean_abs_delta(x, teacher_images()),
                      "clipped_share": artefacts.clipped_share(x), "mean_saturation": artefacts.mean_saturation(x)})
        subset = min(1000, len(x), len(self.real_images))
        for space in sorted(spaces):
            if all(f"{m}/{ref}/{space}" in score for ref in ("real", teacher) for m in ("fid", "kid")):
                continue
            start = time.time()
            features = self.extractor(space).features(x)
            score[f"feature_seconds/{space}"] = time.time() - start
            for ref, ref_images in (("real", lambda: self.real_images), (teacher, teacher_images)):
                scores = feature_scores(features, self.reference(ref, space, ref_images), kid_subset_size=subset)
                score.update({f"{m}/{ref}/{space}": v for m, v in scores.items()})
        write_json(path, score)
        return score


# ------------------------------------------------------------------------------------------------------ outputs


# (name, format, better, shown in artefact tables only); fid/kid names get '_real'/'_teacher' and the space
METRICS = (("fid", "{:.2f}", "lower"), ("kid", "{:.4f}", "lower"), ("prompt_accuracy", "{:.3f}", "higher"),
           ("teacher_mad", "{:.4f}", "lower"), ("clipped_share", "{:.4f}", "lower"),
           ("mean_saturation", "{:.4f}", None))


def table_metrics(table: Table) -> list[tuple[str, str, str, str | None]]:
    """(column name, score key template with {teacher}, format, better) of a table's metrics."""
    out = []
    for space in table.features:
        for ref in ("real", "teacher"):
            for name, fmt, better in METRICS[:2]:
                out.append((f"{name}_{ref}_{space}", f"{name}/{'{teacher}' if ref == 'teacher' else 'real'}/{space}",
                            fmt, better))
    for name, fmt, better in METRICS[2:]:
        if table.artefacts or name not in ("clipped_share", "mean_saturation"):
            out.append((name, name if name != "teacher_mad" else "teacher_mad/{teacher}", fmt, better))
    return out


def collect(table: Table, seeds, scores: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """(cells, comparisons) of a table: per row, step count and metric the per-seed values with mean and std;
    per comparison, step count and metric the paired difference."""
    cells, values = [], {}
    for row in table.rows:
        teacher = f"teacher_cfg{row.teacher_cfg:g}"
        for column, key, _, _ in table_metrics(table):
            for n in (table.steps if row.variant is None else row.settings):
                per_seed = [scores[set_id(row, None, None)][key.format(teacher=teacher)]] if row.variant is None \
                    else [scores[set_id(row, s, n)][key.format(teacher=teacher)] for s in seeds]
                mean, std = mean_std(per_seed)
                values[row.label, n, column] = per_seed
                cells.append({"table": table.name, "row": row.label, "variant": row.variant or "teacher",
                              "steps": n, "metric": column, "mean": mean, "std": std, "n": len(per_seed),
                              "values": per_seed})
    comparisons = []
    for a, b in table.comparisons:
        for n in table.steps:
            for column, _, _, better in table_metrics(table):
                if (a, n, column) not in values or (b, n, column) not in values:
                    continue
                vb = values[b, n, column]
                d = paired_difference(values[a, n, column], vb[0] if len(vb) == 1 else vb, better)
                verdict = {"a": f"{a} wins", "b": f"{b} wins", None: "differs" if d["resolved"] else "not resolved"}
                comparisons.append({"table": table.name, "a": a, "b": b, "steps": n, "metric": column, **d,
                                    "verdict": verdict[d["winner"]]})
    return cells, comparisons


def decide_claims(table: Table, comparisons: list[dict]) -> list[dict]:
    """Each claim's verdict on its own metric, and what the table's other ranked metrics (KID aside: it ranks as
    FID does) would say of it."""
    better = {column: b for column, _, _, b in table_metrics(table)
              if b is not None and not column.startswith("kid")}
    decided = []
    for claim in table.claims:
        if claim.metric not in better:
            raise ValueError(f"table {table.name}: claim {claim.text!r} is decided on {claim.metric!r}, which the "
                             f"table does not rank (it ranks {sorted(better)})")
        verdicts = {}
        for column in better:
            found = [c for c in comparisons if (c["a"], c["b"]) in claim.pairs and c["metric"] == column]
            if found:
                verdicts[column] = claim_verdict([c["winner"] for c in found], claim.kind,
                                                 testable=all(c["n"] > 1 for c in found))
        if claim.metric not in verdicts:
            raise ValueError(f"table {table.name}: claim {claim.text!r} has no comparison on {claim.metric}")
        decided.append({"table": table.name, "claim": claim.text, "pairs": [list(p) for p in claim.pairs],
                        "metric": claim.metric, "kind": claim.kind, **verdicts.pop(claim.metric), "others": verdicts})
    return decided


def markdown(table: Table, cells, comparisons, claims, command: str, metrics=None) -> list[str]:
    """A table's section: its cells (of ``metrics`` only, when given), claims, comparisons and command."""
    formats = {column: fmt for column, _, fmt, _ in table_metrics(table) if metrics is None or column in metrics}
    by_cell = {(c["row"], c["steps"], c["metric"]): c for c in cells}
    lines = [f"## {table.title}", ""]
    students = [r for r in table.rows if r.variant is not None]
    teachers = [r for r in table.rows if r.variant is None]
    lines += ["| row | metric | " + " | ".join(f"{n} steps" for n in table.steps) + " |",
              "| --- | --- |" + " --- |" * len(table.steps)]
    for column, fmt in formats.items():
        for row in students:
            cell = [by_cell.get((row.label, n, column)) for n in table.steps]
            lines.append(f"| {row.label} | {column} | " + " | ".join(
                format_mean_std(c["mean"], c["std"], fmt) if c else "—" for c in cell) + " |")
        for row in teachers:
            c = by_cell[row.label, table.steps[0], column]
            lines.append(f"| {row.label} | {column} | " + " | ".join([fmt.format(c["mean"])] * len(table.steps))
                         + " |")
    if claims:
        lines += ["", "Claims, each decided on the metric named (fixed before the grid ran): 'wins' is held when A "
                  "wins every comparison of its pairs and step counts, 'no loss' when B wins none; one win of B makes "
                  "it not held. A/B: comparisons won by each, of n.", "",
                  "| claim | A vs B | metric | verdict | A/B of n | the other metrics |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for c in claims:
            others = "; ".join(f"{m}: {v['verdict']} ({v['a']}/{v['b']} of {v['n']})" for m, v in c["others"].items())
            pairs = ", ".join(f"{a} vs {b}" for a, b in c["pairs"])
            kind = "" if c["kind"] == "wins" else " (no loss)"
            lines.append(f"| {c['claim']} | {pairs} | {c['metric']}{kind} | **{c['verdict']}** | "
                         f"{c['a']}/{c['b']} of {c['n']} | {others} |")
    if comparisons:
        lines += ["", "Comparisons (mean ± std over seeds of A − B; a win needs a paired t-test over seeds at 5 %):",
                  "", "| A vs B | steps | metric | A − B | verdict |", "| --- | --- | --- | --- | --- |"]
        for c in comparisons:
            lines.append(f"| {c['a']} vs {c['b']} | {c['steps']} | {c['metric']} | "
                         f"{format_mean_std(c['mean'], c['std'], formats[c['metric']])} | {c['verdict']} |")
    lines += ["", f"Reproduce: `{command}`", ""]
    return lines


def write_outputs(out: Path, tables: list[Table], seeds, scores, commands: dict[str, str]) -> None:
    all_cells, all_comparisons, all_claims, md, summary = [], [], [], [], []
    for table in tables:
        cells, comparisons = collect(table, seeds, scores)
        claims = decide_claims(table, comparisons)
        all_cells += cells
        all_comparisons += comparisons
        all_claims += claims
        md += markdown(table, cells, comparisons, claims, commands[table.name])
        summary += markdown(table, cells, [], claims, commands[table.name], SUMMARY_METRICS)
    write_json(out / "table.json", {"seeds": list(seeds), "cells": all_cells, "comparisons": all_comparisons,
                                    "claims": all_claims, "commands": commands})
    buffer = io.StringIO()
    fields = ["table", "row", "variant", "steps", "metric", "mean", "std", "n", "values"]
    writer = csv.DictWriter(buffer, fields)
    writer.writeheader()
    writer.writerows({**c, "values": ";".join(repr(v) for v in c["values"])} for c in all_cells)
    for path, text in ((out / "table.csv", buffer.getvalue()), (out / "table.md", "\n".join(md)),
                       (out / "summary.md", "\n".join(summary))):
        with atomic_file(path, overwrite=True) as tmp:
            tmp.write_text(text)
    print("\n".join(summary), flush=True)


def write_grid(out: Path, table: Table, seed: int, prompts: list[str], grid_prompts: int) -> None:
    """The first table's student rows (training seed ``seed``, noise 0) for the first prompts, steps as columns."""
    from tdd_jax.image_grid import labelled_grid
    students = [r for r in table.rows if r.variant is not None]
    shown = min(grid_prompts, len(prompts))
    sets = {(r.label, n): np.load(out / "samples" / f"{set_id(r, seed, n)}.npz")["images"][:shown]
            for r in students for n in r.settings}
    blank = np.full_like(next(iter(sets.values()))[0], 255)
    grid, labels = [], []
    for row in students:
        for i in range(shown):
            grid.append([sets[row.label, n][i] if (row.label, n) in sets else blank for n in table.steps])
            labels.append(f"{row.label}: {prompts[i]}")
    with atomic_file(out / "grid.png", overwrite=True) as tmp:
        labelled_grid(np.asarray(grid), labels, column_labels=[f"{n} steps" for n in table.steps]).save(
            tmp, format="PNG")


# --------------------------------------------------------------------------------------------------------- main


def parse_features(specs: list[str] | None, parser) -> dict[str, tuple[str, ...]]:
    """--features: 'emoji,inception' for every table, or 'TABLE=emoji,inception' for one (repeatable)."""
    features = {"": ("emoji",), **DEFAULT_FEATURES}
    for spec in specs or []:
        table, _, spaces = spec.rpartition("=")
        names = tuple(s.strip() for s in spaces.split(",") if s.strip())
        if table not in ("", *TABLES) or not names or set(names) - set(FEATURES):
            parser.error(f"--features {spec!r}: expected [TABLE=]SPACE[,SPACE] with TABLE one of {TABLES} and "
                         f"SPACE some of {FEATURES}")
        if table:
            features[table] = names
        else:
            features = {"": names}
    return features


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def reproduce(args, table: str) -> str:
    features = [f"--features={table}={','.join(args.table_features[table])}"]
    return (f"python3 launch/table1.py --out={args.out} --tables={table} --seeds={args.seeds} --steps={args.steps} "
            f"--ablation_steps={args.ablation_steps} --num_prompts={args.num_prompts} "
            f"--noises_per_prompt={args.noises_per_prompt} --variants={args.variants}"
            + (f" --train_steps={args.train_steps}" if args.train_steps else "")
            + (f" --inception_weights={args.inception_weights}" if args.inception_weights else "")
            + " " + " ".join(features))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pipeline", type=Path, default=REPO / "tdd_jax" / "assets" / "tiny_sdxl")
    parser.add_argument("--data_dir", default=str(REPO / "workdirs" / "emoji_data"))
    parser.add_argument("--tables", help=f"comma-separated, some of {TABLES} (default: all)")
    parser.add_argument("--variants", help=f"only rows of these students (default: all of {tuple(VARIANTS)})")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="training seeds (--config.seed)")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="step counts of Table 1 and ablation 1")
    parser.add_argument("--ablation_steps", default=",".join(map(str, ABLATION_STEPS)),
                        help="step counts of the other ablations and the budget table")
    parser.add_argument("--num_prompts", type=int, default=256, help="prompts per cell (the teacher's groups)")
    parser.add_argument("--noises_per_prompt", type=int, default=2, help="sampling noises per prompt")
    parser.add_argument("--train_steps", type=int, help="distillation steps before each variant's factor "
                        "(default: the tiny config's)")
    parser.add_argument("--features", action="append",
                        help=f"feature spaces: 'emoji,inception' for all tables, or TABLE=SPACES for one "
                             f"(repeatable); default emoji, and inception too for {tuple(DEFAULT_FEATURES)}")
    parser.add_argument("--inception_weights", help="FID Inception weights file (pytorch-fid's .pth)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--grid_prompts", type=int, default=2, help="prompts (grid rows) per table row in grid.png")
    parser.add_argument("--plan", action="store_true", help="print the units and CPU time the options imply; "
                        "run nothing")
    parser.add_argument("--quick", action="store_true", help="smoke run: tdd in Table 1, seeds 0,1, 4 steps, "
                        "8 prompts, 2-step trainings, emoji features")
    args = parser.parse_args(argv)
    if args.quick:
        args.tables, args.variants = args.tables or "table1", args.variants or "tdd"
        args.seeds, args.steps, args.ablation_steps, args.num_prompts = "0,1", "4", "4", 8
        args.train_steps = args.train_steps or 2
        args.features = args.features or ["emoji"]
    args.tables = args.tables or ",".join(TABLES)
    args.variants = args.variants or ",".join(VARIANTS)
    names = [t.strip() for t in args.tables.split(",") if t.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for flag, chosen, known in (("--tables", names, TABLES), ("--variants", variants, tuple(VARIANTS))):
        if not chosen or set(chosen) - set(known):
            parser.error(f"{flag}: unknown {sorted(set(chosen) - set(known))}; expected some of {known}")
    seeds = int_list(args.seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds={args.seeds}: expected distinct integers")
    if args.num_prompts < 2 or args.noises_per_prompt < 1:
        parser.error("--num_prompts must be >= 2 and --noises_per_prompt >= 1")
    features = parse_features(args.features, parser)
    args.table_features = {t: features.get(t, features[""]) for t in TABLES}
    tables = build_tables(names, int_list(args.steps), int_list(args.ablation_steps), args.table_features,
                          set(variants))
    plan = Plan.of(tables, seeds, args.train_steps)
    images = args.num_prompts * args.noises_per_prompt
    if args.plan:
        print("\n".join(plan_lines(args.out, plan, images, REAL_EMOJI)), flush=True)
        return
    run(args, tables, plan, seeds)


def run(args, tables: list[Table], plan: Plan, seeds: list[int]) -> None:
    import jax

    from tdd_jax.data.emoji import load_emoji
    from tdd_jax.pipeline import TDDPipeline
    from tdd_jax.pretrain.teacher import TEACHER_GROUPS

    out = args.out
    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                                  str(out / "jax_cache")))
    data = load_emoji(args.data_dir, "train", 64, TEACHER_GROUPS)
    if len(data["captions"]) > NOISE_STRIDE:
        raise ValueError(f"{len(data['captions'])} emoji: NOISE_STRIDE={NOISE_STRIDE} must exceed it")
    pick = np.linspace(0, len(data["captions"]) - 1, min(args.num_prompts, len(data["captions"]))).astype(int)
    prompts = [str(c) for c in data["captions"][pick]]
    captions = prompts * args.noises_per_prompt
    sample_seeds = [j * NOISE_STRIDE + int(i) for j in range(args.noises_per_prompt) for i in pick]
    print(f"[data] {len(data['images'])} reference emoji; {len(prompts)} prompts x {args.noises_per_prompt} "
          f"noises = {len(captions)} images per sample set", flush=True)
    print("\n".join(plan_lines(out, plan, len(captions), len(data["images"]))), flush=True)

    for (name, seed), steps in plan.trainings.items():
        train_student(out, name, seed, steps, args.data_dir)

    pipes: dict = {}

    def samples(key: str) -> np.ndarray:
        """The set's images, rendered (and cached) if missing."""
        path = out / "samples" / f"{key}.npz"
        if path.is_file():
            return np.load(path)["images"]
        row, seed, n = plan.sets[key]
        lora = None if row.variant is None else student_dir(out, row.variant, seed)
        if lora not in pipes:
            pipes.clear()  # one student's weights in memory at a time
            pipes[lora] = TDDPipeline.from_pretrained(args.pipeline, lora=lora)
        settings = teacher_settings(row.teacher_cfg) if row.variant is None else row.settings[n]
        start = time.time()
        images = pipes[lora](captions, settings, seeds=sample_seeds, batch_size=args.batch_size)
        seconds = time.time() - start
        with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, seconds=seconds)
        print(f"[samples] {key}: {len(images)} images, {seconds:.0f} s", flush=True)
        return images

    # teachers first, then each student's sets together: one pipeline load per student
    order = sorted(plan.sets, key=lambda k: (plan.sets[k][0].variant is not None, k))
    for key in order:
        samples(key)
    scorer = Scorer(out, data["images"], captions, args.inception_weights)
    scores = {}
    for key in order:
        row = plan.sets[key][0]
        teacher_key = f"teacher/cfg{row.teacher_cfg:g}"
        before = read_json(out / "scores" / f"{key}.json")
        scores[key] = scorer.score(key, lambda: samples(key), f"teacher_cfg{row.teacher_cfg:g}",
                                   lambda: samples(teacher_key), plan.spaces[key])
        if "sample_seconds" not in scores[key]:  # the render time, for --plan's unit costs
            with np.load(out / "samples" / f"{key}.npz") as cached:
                scores[key]["sample_seconds"] = float(cached["seconds"])
            write_json(out / "scores" / f"{key}.json", scores[key])
        if scores[key] != before:
            print(f"[scores] {key}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(scores[key].items())
                                                   if k.startswith(("fid/real", "fid/teacher"))), flush=True)
    commands = {t.name: reproduce(args, t.name) for t in tables}
    write_outputs(out, tables, seeds, scores, commands)
    write_grid(out, tables[0], seeds[0], prompts, args.grid_prompts)
    print(f"wrote {out / 'summary.md'} (above), table.md (every metric and comparison), table.csv, table.json, "
          f"grid.png", flush=True)


if __name__ == "__main__":
    main()
