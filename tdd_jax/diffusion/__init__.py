"""Diffusion core: noise schedule, teacher solver, consistency functions, target rules and the jitted sampler."""
