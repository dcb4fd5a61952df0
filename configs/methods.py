"""What each distillation method changes in a trainer config: the target rule and the settings its paper
publishes. TDD is the base config's own setting; LCM, PCM and TCD are special cases of its target rule.

- lcm: τ = 0 with LCM's boundary scalings, 50-step DDIM teacher, w ~ U[3, 15], no prompt dropout; sampled by
  LCM's multistep sampler (γ = 1), no CFG.
- pcm: 4 phases (τ = the phase edge below t_n), 40-step DDIM teacher, w ~ U[6, 7], no prompt dropout; sampled
  deterministically (DDIM, γ = 0), no CFG.
- tcd: τ uniform over the solver grid below t_n, on the 50-step grid and LCM's w ~ U[3, 15] that TCD builds on;
  no target offset (γ is an inference setting in TCD), no prompt dropout; sampled at γ 0.3, no CFG.
"""

import ml_collections

METHODS = ("tdd", "lcm", "pcm", "tcd")

_OVERRIDES = {
    "tdd": {},
    "lcm": {"target.kind": "lcm", "target.eta": 0.0, "solver.num_steps": 50, "guidance.w_min": 3.0,
            "guidance.w_max": 15.0, "guidance.rho": 0.0, "validation.gamma": 1.0, "validation.guidance_scale": 1.0},
    "pcm": {"target.kind": "pcm", "target.pcm_phases": 4, "target.eta": 0.0, "solver.num_steps": 40,
            "guidance.w_min": 6.0, "guidance.w_max": 7.0, "guidance.rho": 0.0, "validation.gamma": 0.0,
            "validation.guidance_scale": 1.0},
    "tcd": {"target.kind": "tcd", "target.eta": 0.0, "solver.num_steps": 50, "guidance.w_min": 3.0,
            "guidance.w_max": 15.0, "guidance.rho": 0.0, "validation.gamma": 0.3, "validation.guidance_scale": 1.0},
}


def method_name(arg: str | None) -> str:
    """The method a config argument names (None or '' = tdd), or a ValueError listing the known ones."""
    name = (arg or "tdd").lower()
    if name not in METHODS:
        raise ValueError(f"unknown config argument {arg!r}: expected a method, one of {METHODS}")
    return name


def apply_method(cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Set ``name``'s fields on ``cfg`` (in place) and return it."""
    for field, value in _OVERRIDES[method_name(name)].items():
        node = cfg
        *parents, leaf = field.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg
