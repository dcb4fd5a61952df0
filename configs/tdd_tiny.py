"""TDD on the tiny emoji SDXL shipped with the repo: the same trainer as tdd_sdxl.py, sized for 2 CPU cores.

    python -m tdd_jax.train --config=configs/tdd_tiny.py --workdir=runs/tdd_tiny
    python -m tdd_jax.train --config=configs/tdd_tiny.py:lcm --workdir=runs/lcm_tiny   # a baseline, same budget
    python -m tdd_jax.train --config=configs/tdd_tiny.py:tdd_adv --workdir=runs/tdd_adv_tiny   # TDD-adv

Only what a laptop-sized run needs differs from the SDXL config: the pipeline and data, 64 px, a small LoRA, a
higher, decaying learning rate so a few hundred steps show the effect, fp32 and no rematerialisation. Every
method (the argument, see ``configs/methods.py``) gets the same budget and the same teacher CFG here, so
methods differ only in their target rule, their grid and their published sampler.
"""

import os

from configs import tdd_sdxl
from configs.methods import PUBLISHED, apply_method, method_name
from tdd_jax.pretrain.teacher import TEACHER_GROUPS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg: str | None = None):
    """The tiny run of the method ``arg`` (None: TDD)."""
    cfg = tdd_sdxl.get_config(arg)
    cfg.pipeline_dir = os.environ.get("TDD_TINY_PIPELINE", os.path.join(REPO, "tdd_jax", "assets", "tiny_sdxl"))
    cfg.resolution = 64
    cfg.num_train_steps = 500
    cfg.log_every = 10

    # CFG 8 (w' = 7; LCM trains with w in [3, 15]): the guidance at which this teacher's 25-step samples follow
    # their prompts best (48 of 64 samples of the contact-sheet names; 44 at the official CFG 4.5) and at which its
    # own 4-step DDIM samples break up into blotches, the few-step high-CFG failure that distillation removes.
    cfg.guidance.w_min = 7.0
    cfg.guidance.w_max = 7.0

    cfg.lora.rank = 16
    cfg.lora.alpha = 16.0
    # A high rate so that the student absorbs as much of the teacher's CFG as a short run allows, decayed to 0
    # (cosine) so that the run ends on settled weights rather than wherever its last noisy steps left them.
    cfg.optim.lr = 1e-3
    cfg.optim.schedule = "cosine"
    # At most a 50-step DDIM teacher grid (LCM's; PCM keeps its 40) instead of TDD's 250: consistency propagates
    # one grid step per round of training, and a few hundred steps cannot carry it across 250 small ones.
    cfg.solver.num_steps = min(cfg.solver.num_steps, 50)

    cfg.batch.global_batch = 16
    cfg.batch.grad_accum = 1

    cfg.model.dtype = "float32"
    cfg.model.param_dtype = "float32"
    cfg.model.remat = "none"
    cfg.mesh.data = -1
    cfg.mesh.fsdp = 1

    cfg.data.source = "emoji"
    # The emoji TFDS dataset is built there on first use (about 5 s).
    cfg.data.path = os.environ.get("TDD_EMOJI_DATA", os.path.join(REPO, "workdirs", "emoji_data"))
    cfg.data.emoji_image_size = 64
    # The emoji the tiny teacher learnt (643 of 3,482): distilling prompts it cannot draw teaches nothing.
    cfg.data.emoji_groups = TEACHER_GROUPS
    cfg.data.center_crop = True
    cfg.data.num_threads = 2
    cfg.data.prefetch_buffer_size = 32

    cfg.checkpoint.every = 100
    cfg.checkpoint.keep = 2
    cfg.validation.every = 100
    cfg.validation.prompts = ("grinning face", "red heart", "cat face", "pizza", "rocket", "sun")
    # 4 steps only: each column is one more compiled sampler at start-up, and the main job must fit 15 minutes on 2
    # slow cores (launch/student_vs_base.py --steps 2 measures 2 steps).
    cfg.validation.steps = (4,)
    # Deterministic samplers on both sides, so the columns differ only by the model: the student without extra
    # CFG (w' is distilled into it), the teacher with the CFG the student was distilled from (1 + w').
    cfg.validation.gamma = 0.0
    cfg.validation.guidance_scale = 1.0
    # The adversarial heads learn at the tiny budget's scale too (the official 1e-5 would leave them near their
    # random init over a few hundred steps); a published-recipe variant sets its own below.
    cfg.adv.lr = 1e-3
    if method_name(arg) in PUBLISHED:
        # Published recipes keep this pipeline's model size and budget (BUDGET_FIELDS) and take every other
        # number from the paper, the teacher CFG range, rate and schedule included.
        apply_method(cfg, arg, budget=False)
    cfg.validation.teacher_guidance_scale = 1.0 + cfg.guidance.w_max
    return cfg
