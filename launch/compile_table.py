"""The README's compile-check table, made from the JSON reports of ``python -m tdd_jax.compile_check --json``.

    python -m launch.compile_table compile_v5e-8.json compile_v5p-8.json ...
"""

from __future__ import annotations

import json
import sys

from tdd_jax.compile_check import cost_model_estimate

GiB = 2**30


def _fit(part: dict) -> str:
    m = part["memory"]
    return (f"{m['argument'] / GiB:.2f} + {m['temp'] / GiB:.2f} = {m['total'] / GiB:.2f} of "
            f"{part['hbm_bytes'] / GiB:.0f} ({'fits' if part['fits'] else 'does not fit'})")


def _cost_model(part: dict) -> str:
    """'ms | images/s' of the compiler's loop-counted estimate (from the report's raw figures, so reports written
    before the estimate existed get it too), or 'n/a | ' where it has none."""
    seconds = cost_model_estimate(part)
    return "n/a | " if seconds is None else f"{seconds * 1e3:.0f} ms | {part['images'] / seconds:.1f}"


def rows(reports: list[dict]) -> list[str]:
    head = ["| topology | devices | program | images (per device) | GiB per device: args + temp = total of HBM "
            "| FLOPs per device (XLA's figure) | roofline | images/s | cost model | images/s | compile s "
            "| host peak GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    out = []
    for r in reports:
        n = r["num_devices"]
        for part, label in (("train_step", "TDD train step"), ("sampler", "sampler + VAE decode")):
            if "memory" not in r.get(part, {}):  # absent, or counted without compiling
                continue
            p = r[part]
            xla = "n/a" if p.get("xla_flops") is None else f"{p['xla_flops']:.2e}"
            out.append(f"| {r['topology']} | {n} | {label} | {p['images']} ({p['images'] / n:g}) | {_fit(p)} "
                       f"| {p['flops']:.3e} ({xla}) | {p['roofline_s'] * 1e3:.0f} ms "
                       f"| {p['roofline_images_per_s']:.1f} | {_cost_model(p)} | {p['compile_s']:.0f} "
                       f"| {r.get('host_peak_rss_gib', float('nan')):.1f} |")
    return head + out


def accounting(reports: list[dict]) -> list[str]:
    lines = []
    for r in reports:
        a = r.get("train_step", {}).get("flop_accounting")
        if a:
            parts = ", ".join(f"{k.replace('_', ' ')} {v:.3e}" for k, v in a["analytic"].items() if k != "minimum")
            lines.append(f"- {r['topology']}, global batch {r['settings']['global_batch']}: counted "
                         f"{a['counted']:.3e} FLOPs = {a['remat_recompute']:.3e} remat recompute + "
                         f"{a['counted'] - a['remat_recompute']:.3e}, which is **{a['ratio']:.3f}x** the analytic "
                         f"minimum {a['analytic']['minimum']:.3e} ({parts}).")
    return lines


def main(paths: list[str]) -> None:
    reports = [json.loads(open(p).read()) for p in paths]
    print("\n".join(rows(reports) + [""] + accounting(reports)))


if __name__ == "__main__":
    main(sys.argv[1:])
