"""LCM-LoRA baseline: τ = 0 with LCM's boundary scalings, 50-step DDIM teacher, w ~ U[3, 15], no prompt dropout."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import tdd_sdxl  # noqa: E402


def get_config():
    cfg = tdd_sdxl.get_config()
    cfg.target.kind = "lcm"
    cfg.target.eta = 0.0
    cfg.solver.num_steps = 50
    cfg.guidance.w_min = 3.0
    cfg.guidance.w_max = 15.0
    cfg.guidance.rho = 0.0
    cfg.validation.gamma = 1.0  # LCM's multistep sampling (x0 then renoise) is γ = 1, no CFG
    cfg.validation.guidance_scale = 1.0
    return cfg
