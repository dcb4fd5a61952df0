"""PCM baseline: 4 phases (τ = the phase edge below t_n), 40-step DDIM teacher, w ~ U[6, 7], no prompt dropout."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import tdd_sdxl  # noqa: E402


def get_config():
    cfg = tdd_sdxl.get_config()
    cfg.target.kind = "pcm"
    cfg.target.pcm_phases = 4
    cfg.target.eta = 0.0
    cfg.solver.num_steps = 40
    cfg.guidance.w_min = 6.0
    cfg.guidance.w_max = 7.0
    cfg.guidance.rho = 0.0
    cfg.validation.gamma = 0.0  # PCM samples deterministically (DDIM, γ = 0), no CFG
    cfg.validation.guidance_scale = 1.0
    return cfg
