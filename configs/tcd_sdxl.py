"""TCD baseline: τ uniform over the solver grid below t_n, on the 50-step DDIM grid and LCM's w ~ U[3, 15]
that TCD's training builds on; no target offset (γ is an inference-time setting in TCD), no prompt dropout."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import tdd_sdxl  # noqa: E402


def get_config():
    cfg = tdd_sdxl.get_config()
    cfg.target.kind = "tcd"
    cfg.target.eta = 0.0
    cfg.solver.num_steps = 50
    cfg.guidance.w_min = 3.0
    cfg.guidance.w_max = 15.0
    cfg.guidance.rho = 0.0
    cfg.validation.gamma = 0.3  # TCD's default sampler: γ (eta) 0.3, no CFG
    cfg.validation.guidance_scale = 1.0
    return cfg
