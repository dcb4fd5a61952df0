"""What each distillation method changes in a trainer config: the target rule and the settings its paper
publishes. TDD is the base config's own setting; LCM, PCM and TCD are special cases of its target rule.

Same-budget variants (``launch/table1.py`` compares these: they keep the base config's optimizer, batch, steps
and, on the tiny pipeline, its teacher CFG; only the target rule, grid, w range and sampler differ):

- lcm: τ = 0 with LCM's boundary scalings, 50-step DDIM teacher, w ~ U[3, 15], no prompt dropout; sampled by
  LCM's multistep sampler (γ = 1), no CFG.
- pcm: 4 phases (τ = the phase edge below t_n), 40-step DDIM teacher, w ~ U[6, 7], no prompt dropout; sampled
  deterministically (DDIM, γ = 0), no CFG.
- tcd: τ uniform over the solver grid below t_n, on the 50-step grid and LCM's w ~ U[3, 15] that TCD builds on;
  no target offset (γ is an inference setting in TCD), no prompt dropout; sampled at γ 0.3, no CFG.
- tdd_adv: TDD plus the adversarial term (train_tdd_adv.py, the paper's "Ours(adv)"; ``cfg.adv`` holds the
  discriminator's numbers, REFERENCE "Adversarial variant": λ 0.1, heads' AdamW lr 1e-5, betas (0, 0.999), wd
  1e-3, window 250), with the official adversarial run's LoRA rate 2e-6 (REFERENCE; the tiny config replaces
  it by its own budget's rate, as for every method).
- pcm_adv: pcm plus the same adversarial term (PCM's SDXL script trains with it: --adv_weight=0.1
  --adv_lr=1e-5, window T / 4 phases = 250).

Published-recipe variants (every number of the paper's / official script's run, not a fair comparison; on the
tiny pipeline they keep its model and budget — LoRA rank, resolution, batch, steps — and take the rest):

- lcm_paper (LCM-LoRA, arXiv 2311.05556): 50 DDIM steps, w ~ U[3, 15], LCM boundary scalings, target = online
  UNet under no-grad (ema 0) (REFERENCE "Baselines"); lr 1e-4, pseudo-Huber, weight decay 0, rank 64, constant
  rate (diffusers examples/consistency_distillation/README_sdxl.md, train_lcm_distill_lora_sdxl_wds.py, the
  published LCM-LoRA SDXL command; lr raised from 1e-6 to 1e-4 in diffusers PR #6304).
- pcm_paper (PCM, arXiv 2405.18407): 4 phases, 40 DDIM steps, w ~ U[6, 7] (REFERENCE "Baselines"); lr 2e-6,
  weight decay 0, pseudo-Huber, rank 64, 20,000 steps, adversarial term on with weight 0.1 and heads' lr 1e-5
  (PCM code/text_to_image_sdxl/train_pcm_lora_sdxl.sh); the heads' betas (0, 0.999) and weight decay 1e-3 as
  the TDD-adv discriminator, which REFERENCE says is PCM's. Its per-GPU batch is 10 on an unstated GPU count,
  so the batch stays the base config's.
- tcd_paper (TCD, arXiv 2402.19159): τ uniform below t_n, w ~ U[2, 14], lr 4.5e-6, batch 256, weight decay
  0.01 (the TCD paper's training details); 50-step DDIM grid and constant rate of the LCM training code TCD
  builds on (REFERENCE "Baselines": TCD's end index ~ U{0..index} on that grid); sampled at γ 0.3 (TCD's
  default), no CFG.
"""

import ml_collections

_LCM = {"target.kind": "lcm", "target.eta": 0.0, "solver.num_steps": 50, "guidance.w_min": 3.0,
        "guidance.w_max": 15.0, "guidance.rho": 0.0, "validation.gamma": 1.0, "validation.guidance_scale": 1.0}
_PCM = {"target.kind": "pcm", "target.pcm_phases": 4, "target.eta": 0.0, "solver.num_steps": 40,
        "guidance.w_min": 6.0, "guidance.w_max": 7.0, "guidance.rho": 0.0, "validation.gamma": 0.0,
        "validation.guidance_scale": 1.0}
_TCD = {"target.kind": "tcd", "target.eta": 0.0, "solver.num_steps": 50, "guidance.w_min": 3.0,
        "guidance.w_max": 15.0, "guidance.rho": 0.0, "validation.gamma": 0.3, "validation.guidance_scale": 1.0}
_ADV = {"adv.enabled": True, "adv.g_weight": 0.1, "adv.lr": 1e-5, "adv.b1": 0.0, "adv.b2": 0.999,
        "adv.weight_decay": 1e-3, "adv.window": 250}
_PUBLISHED_OPTIM = {"optim.schedule": "constant", "optim.warmup_steps": 0, "ema_decay": 0.0}

_OVERRIDES = {
    "tdd": {},
    "lcm": _LCM,
    "pcm": _PCM,
    "tcd": _TCD,
    "tdd_adv": {**_ADV, "optim.lr": 2e-6},
    "pcm_adv": {**_PCM, **_ADV},
    "lcm_paper": {**_LCM, **_PUBLISHED_OPTIM, "optim.lr": 1e-4, "optim.weight_decay": 0.0, "loss.kind": "huber",
                  "lora.rank": 64},
    "pcm_paper": {**_PCM, **_ADV, **_PUBLISHED_OPTIM, "optim.lr": 2e-6, "optim.weight_decay": 0.0,
                  "loss.kind": "huber", "lora.rank": 64, "num_train_steps": 20_000},
    "tcd_paper": {**_TCD, **_PUBLISHED_OPTIM, "guidance.w_min": 2.0, "guidance.w_max": 14.0, "optim.lr": 4.5e-6,
                  "optim.weight_decay": 0.01, "batch.global_batch": 256},
}
METHODS = tuple(_OVERRIDES)
PUBLISHED = ("lcm_paper", "pcm_paper", "tcd_paper")
# What the tiny pipeline keeps of its own for a published-recipe variant: model size and compute budget.
BUDGET_FIELDS = ("lora.rank", "batch.global_batch", "batch.grad_accum", "num_train_steps")


def method_name(arg: str | None) -> str:
    """The method a config argument names (None or '' = tdd), or a ValueError listing the known ones."""
    name = (arg or "tdd").lower()
    if name not in METHODS:
        raise ValueError(f"unknown config argument {arg!r}: expected a method, one of {METHODS}")
    return name


def apply_method(cfg: ml_collections.ConfigDict, name: str, *, budget: bool = True) -> ml_collections.ConfigDict:
    """Set ``name``'s fields on ``cfg`` (in place) and return it; budget=False leaves ``BUDGET_FIELDS`` alone."""
    for field, value in _OVERRIDES[method_name(name)].items():
        if not budget and field in BUDGET_FIELDS:
            continue
        set_field(cfg, field, value)
    return cfg


def set_field(cfg: ml_collections.ConfigDict, field: str, value) -> None:
    """Set the dotted ``field`` (e.g. 'target.eta') of ``cfg`` in place."""
    node = cfg
    *parents, leaf = field.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
