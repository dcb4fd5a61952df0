"""The compile-check tables of docs/tpu.md, made from the JSON reports of ``python -m tdd_jax.compile_check --json``:
memory and speed per program, the FLOP accounting, and what the paper's run would take on each slice.

    python -m launch.compile_table compile_v5e-8.json compile_v5p-8.json ...
"""

from __future__ import annotations

import json
import sys

from configs import tdd_sdxl
from tdd_jax.compile_check import TOPOLOGIES, cost_model_estimate

GiB = 2**30


def _fit(part: dict) -> str:
    if "out_of_memory" in part:  # the compiler refused it: its stated need, where it gave one
        need = (f"temp {part['temp_required'] / GiB:.2f} > {part['temp_available'] / GiB:.2f} available"
                if "temp_required" in part else "over HBM")
        return f"{need} (does not fit)"
    m = part["memory"]
    return (f"{m['argument'] / GiB:.2f} + {m['temp'] / GiB:.2f} = {m['total'] / GiB:.2f} of "
            f"{part['hbm_bytes'] / GiB:.0f} ({'fits' if part['fits'] else 'does not fit'})")


def _cost_model(part: dict) -> str:
    """'ms (raw ms x loop scale) | images/s' of the compiler's loop-counted estimate (from the report's raw
    figures, so reports written before the estimate existed get it too), or 'n/a | ' where it has none. The raw
    figure (unpriced ops added back) and the scale are shown because the scale, counted / XLA's FLOPs, is where the
    estimate is weakest: programs of one loop structure compare better by their raw figures (docs/tpu.md)."""
    seconds = cost_model_estimate(part)
    if seconds is None:
        return "n/a | "
    raw = part["xla_optimal_s"] + part.get("unpriced_ops", 0)
    return f"{seconds * 1e3:.0f} ms ({raw * 1e3:.0f} x {seconds / raw:.2f}) | {part['images'] / seconds:.1f}"


def rows(reports: list[dict]) -> list[str]:
    head = ["| topology | devices | mesh data x fsdp | program | images (per device) "
            "| GiB per device: args + temp = total of HBM | FLOPs per device (XLA's figure) | roofline | images/s "
            "| cost model (raw x loop scale) | images/s | compile s | host peak GiB: RAM (RAM + swap; when lowered) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    out = []
    for r in reports:
        n = r["num_devices"]
        step_label = f"TDD train step, {r.get('batch_kind', 'pixels')}{_departures(r)}"  # before batch_kind: pixels
        sampler_label = f"sampler + VAE decode{_departures(r, sampler=True)}"
        for part, label in (("train_step", step_label), ("sampler", sampler_label)):
            if not {"memory", "out_of_memory"} & set(r.get(part, {})):  # absent, or counted without compiling
                continue
            p = r[part]
            xla = "n/a" if p.get("xla_flops") is None else f"{p['xla_flops']:.2e}"
            mesh = r["settings"]["mesh"]
            out.append(f"| {r['topology']} | {n} | {mesh['data']} x {mesh['fsdp']} | {label} "
                       f"| {p['images']} ({p['images'] / n:g}) | {_fit(p)} "
                       f"| {p['flops']:.3e} ({xla}) | {p['roofline_s'] * 1e3:.0f} ms "
                       f"| {p['roofline_images_per_s']:.1f} | {_cost_model(p)} | {p['compile_s']:.0f} "
                       f"| {_host_peak(r)} |")
    return head + out


def _departures(report: dict, sampler: bool = False) -> str:
    """', remat dots, weights bfloat16, ...': the settings in which the report departs from ``configs/tdd_sdxl.py``
    and the compiler's defaults (libtpu flags), so that rows of one topology tell apart the settings compiled (for
    the sampler, those it compiles with: all but remat and the LoRA's sharding)."""
    cfg, s = tdd_sdxl.get_config(), report["settings"]
    keys = (("remat", "remat"), ("param_dtype", "weights"), ("attention_impl", "attention"))[int(sampler):]
    out = [f"{label} {s[key]}" for key, label in keys if s.get(key, cfg.model[key]) != cfg.model[key]]
    if not sampler and s.get("lora_sharding", cfg.mesh.lora_sharding) != cfg.mesh.lora_sharding:
        out.append(f"LoRA {s['lora_sharding']}")
    if s.get("windowed_einsum") is False:
        out.append("no windowed einsum")
    return "".join(f", {o}" for o in out) + _libtpu(report)


def _libtpu(report: dict) -> str:
    """', libtpu `FLAGS`' where the report was compiled under LIBTPU_INIT_ARGS, else ''."""
    return f", libtpu `{report['libtpu_init_args']}`" if "libtpu_init_args" in report else ""


def _host_peak(report: dict) -> str:
    """The compile's peak resident memory, with swap where the report sampled it (reports before: RSS only), and
    what the process held when the train step (else the sampler) was lowered, before its compile began."""
    rss = f"{report.get('host_peak_rss_gib', float('nan')):.1f}"
    lowered = [report[p]["host_lowered_gib"] for p in ("train_step", "sampler")
               if "host_lowered_gib" in report.get(p, {})]
    inner = ([f"{report['host_peak_rss_swap_gib']:.1f}"] if "host_peak_rss_swap_gib" in report else []) + \
        [f"lowered {v:.1f}" for v in lowered[:1]]
    return f"{rss} ({'; '.join(inner)})" if inner else rss


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


def paper_run_images() -> int:
    """Images the paper's run sees: ``configs/tdd_sdxl.py``'s global batch x training steps."""
    cfg = tdd_sdxl.get_config()
    return int(cfg.batch.global_batch) * int(cfg.num_train_steps)


def _setting(r: dict) -> str:
    s = r["settings"]
    return (f"{r.get('batch_kind', 'pixels')}, {s['micro_batch_per_device']:g} per device, mesh "
            f"{s['mesh']['data']}x{s['mesh']['fsdp']}, remat {s['remat']}, weights {s['param_dtype']}, LoRA "
            f"{s['lora_sharding']}{', ' + s['attention_impl'] if s.get('attention_impl') else ''}"
            f"{', no windowed einsum' if s.get('windowed_einsum') is False else ''}{_libtpu(r)}")


def _speeds(p: dict) -> tuple[float, float | None, float | None]:
    """(images/s by the roofline, images/s by the cost model, MFU by the cost model). MFU counts the useful
    FLOPs only: the analytic minimum of the TDD step, not the remat recompute."""
    cost = cost_model_estimate(p)
    if cost is None:
        return p["roofline_images_per_s"], None, None
    a = p.get("flop_accounting")
    useful = a["analytic"]["minimum"] / a["counted"] if a else 1.0
    return p["roofline_images_per_s"], p["images"] / cost, p["roofline_s"] * useful / cost


def _train_steps(reports: list[dict]) -> list[tuple[dict, dict]]:
    return [(r, r["train_step"]) for r in reports if "roofline_images_per_s" in r.get("train_step", {})
            and {"memory", "out_of_memory"} & set(r["train_step"])]


def budget(reports: list[dict]) -> list[str]:
    """Per compiled train step: its setting, images/s by the FLOP roofline and by the compiler's cost model, the
    cost model's MFU, and the paper's run in days and chip-hours by each."""
    images = paper_run_images()
    head = [f"| topology | chips | setting | fits | images/s: roofline / cost model | MFU (cost model) | paper run "
            f"({images:.3g} images): days, roofline / cost model | chip-hours, roofline / cost model |",
            "|---|---|---|---|---|---|---|---|"]
    out = []
    for r, p in _train_steps(reports):
        chips = TOPOLOGIES[r["topology"]].chips
        roof, cost_ips, mfu = _speeds(p)
        days = [images / ips / 86400 for ips in (roof, cost_ips) if ips]
        out.append(f"| {r['topology']} | {chips} | {_setting(r)} | {'yes' if p['fits'] else 'no'} | {roof:.1f} / "
                   + ("n/a" if cost_ips is None else f"{cost_ips:.1f}")
                   + f" | {'n/a' if mfu is None else f'{mfu:.0%}'} | "
                   + " / ".join(f"{d:.1f}" for d in days)
                   + " | " + " / ".join(f"{d * 24 * chips:,.0f}" for d in days) + " |")
    return head + out


def best(reports: list[dict]) -> list[str]:
    """Per topology and batch kind, the compiled train-step setting that fits and runs fastest: ranked by the cost
    model (it prices what the roofline does not) among the fitting settings that have one, else by the roofline.
    A setting without one (a report from before the check read it, or a program with Pallas kernels) is counted
    but not ranked."""
    images = paper_run_images()
    head = ["| topology | batch | best fitting setting (of those compiled) | ranked by | images/s | paper run: days "
            "| chip-hours |", "|---|---|---|---|---|---|---|"]
    steps = _train_steps(reports)
    out = []
    for topology, kind in sorted({(r["topology"], r.get("batch_kind", "pixels")) for r, _ in steps}):
        group = [(r, p) for r, p in steps if (r["topology"], r.get("batch_kind", "pixels")) == (topology, kind)]
        fitting = [(r, _speeds(p)) for r, p in group if p["fits"]]
        if not fitting:
            out.append(f"| {topology} | {kind} | none of the {len(group)} compiled settings fits | | | | |")
            continue
        priced = [(r, speeds) for r, speeds in fitting if speeds[1] is not None]
        by_cost = bool(priced)
        r, speeds = max(priced or fitting, key=lambda item: item[1][1] if by_cost else item[1][0])
        ips = speeds[1] if by_cost else speeds[0]
        days = images / ips / 86400
        unranked = len(fitting) - len(priced) if by_cost else 0
        out.append(f"| {topology} | {kind} | {_setting(r)} | {'cost model' if by_cost else 'roofline'} "
                   f"(of {len(priced) if by_cost else len(fitting)} fitting"
                   f"{f'; {unranked} more without a cost model' if unranked else ''}) | {ips:.1f} | {days:.1f} "
                   f"| {days * 24 * TOPOLOGIES[topology].chips:,.0f} |")
    return head + out


def commands(reports: list[dict]) -> list[str]:
    return [f"- {r['topology']}: `{r['command']}`" for r in reports if "command" in r]


def main(paths: list[str]) -> None:
    reports = [json.loads(open(p).read()) for p in paths]
    print("\n".join(rows(reports) + [""] + accounting(reports) + [""] + budget(reports) + [""] + best(reports) + [""]
                    + commands(reports)))


if __name__ == "__main__":
    main(sys.argv[1:])
