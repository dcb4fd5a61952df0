"""Ahead-of-time compile check: does the TDD step (and the few-step sampler) fit a TPU slice, and how fast could
it run there? Answered on any machine, without a TPU and without weights.

    python -m tdd_jax.compile_check --config=configs/tdd_sdxl.py --topology=v5e-8 \\
        --config.batch.global_batch=8 --config.batch.grad_accum=1 [--json=compile_v5e-8.json]

The frozen SDXL pipeline is built abstractly (``jax.ShapeDtypeStruct`` weights carrying their shardings; the
architecture from the published SDXL base configs in ``tdd_jax.models``), the LoRA / optimizer state likewise,
and both programs are lowered and compiled by the real TPU compiler for a named topology (libtpu compiles for
``jax.experimental.topologies`` devices on a CPU-only machine; install it with ``pip install -e .[aot]``), or
for N fake CPU devices (``--topology=cpu:8``). Printed and written as JSON: per-device argument / temp / output
bytes against the device's HBM, XLA's FLOPs, the roofline time (FLOPs ÷ peak bf16 FLOP/s) and the implied
images/s, with the mesh, sharding and remat settings used.

FLOPs: XLA's ``cost_analysis()`` counts a while loop's body once, and these programs loop (the sampler's steps,
``model.scan_blocks``), so the FLOPs behind the roofline are counted from the program's jaxpr
(``tdd_jax.flops``: matmuls and convolutions, scans times their length); XLA's own figure is printed beside
it. The train step's count is set against the analytic minimum of one TDD step, built from the UNet's own
forward and backward counts: student forward + backward to the LoRA (B), the teacher's CFG forward without
LoRA (2B), the target's forward (B); what remat recomputes is counted separately.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import resource
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from jax.sharding import Mesh
from ml_collections import config_flags

from tdd_jax.conditioning import Cond, unet_output
from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.diffusion.schedule import NoiseSchedule
from tdd_jax.flops import function_flops
from tdd_jax.models.clip import SDXL_TEXT_ENCODER_2_CONFIG, SDXL_TEXT_ENCODER_CONFIG
from tdd_jax.models.unet import SDXL_UNET_CONFIG
from tdd_jax.models.vae import SDXL_VAE_CONFIG, AutoencoderKL
from tdd_jax.render import render
from tdd_jax.training import sharding
from tdd_jax.training.frozen import (ENCODERS, FrozenPipeline, lora_config, min_shard_size, model_options,
                                     unet_definitions)
from tdd_jax.training.step import (batch_spec, build_train_step, compile_train_step, compiled_analysis, select_batch,
                                   vae_factor)

GiB = 2**30

# stable-diffusion-xl-base-1.0: component name -> config (diffusers / transformers config.json fields).
SDXL_CONFIGS = {"unet": SDXL_UNET_CONFIG, "vae": SDXL_VAE_CONFIG, "text_encoder": SDXL_TEXT_ENCODER_CONFIG,
                "text_encoder_2": SDXL_TEXT_ENCODER_2_CONFIG}
# Its scheduler/scheduler_config.json (the fields the noise schedule reads).
SDXL_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", prediction_type="epsilon")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: libtpu's topology name, chip count, and the chip's published HBM and dense bf16 peak."""

    name: str  # get_topology_desc topology_name, e.g. 'v5e:2x4'
    chips: int
    hbm_bytes: int  # per chip
    peak_flops: float  # per chip, bf16
    chip_config: str = "default"  # 'megacore' on v4: one device per chip, as meshes and Cloud TPU's runtime use it


# Cloud TPU's published per-chip figures (cloud.google.com/tpu/docs: v4, v5e, v5p, v6e system architecture).
TOPOLOGIES = {
    "v4-8": Topology("v4:2x2x1", 4, 32 * GiB, 275e12, "megacore"),
    "v5e-4": Topology("v5e:2x2", 4, 16 * GiB, 197e12),
    "v5e-8": Topology("v5e:2x4", 8, 16 * GiB, 197e12),
    "v5e-16": Topology("v5e:4x4", 16, 16 * GiB, 197e12),
    "v5p-8": Topology("v5p:2x2x1", 4, 95 * GiB, 459e12),
    "v5p-32": Topology("v5p:2x2x4", 16, 95 * GiB, 459e12),
    "v6e-8": Topology("v6e:2x4", 8, 32 * GiB, 918e12),
}


class MissingLibTPU(RuntimeError):
    """libtpu (the TPU compiler) is not installed."""


def topology_devices(name: str) -> tuple[list, int | None, float | None]:
    """(devices, HBM bytes per device, peak FLOP/s per device) of a named topology, or ``cpu:N`` (N fake CPU
    devices; no HBM or peak). v4's two TensorCores a chip are one megacore device: JAX's meshes need one device
    a chip there."""
    if name.startswith("cpu:"):
        n = int(name.split(":", 1)[1])
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ValueError(f"--topology={name}: only {len(devices)} CPU devices (start with "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count={n} or jax_num_cpu_devices={n})")
        return devices[:n], None, None
    if name not in TOPOLOGIES:
        raise ValueError(f"--topology={name!r} is not one of {sorted(TOPOLOGIES)} or cpu:N")
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise MissingLibTPU(f"--topology={name} needs libtpu to compile for TPU on this machine: "
                            "pip install -e '.[aot]'") from e
    from jax.experimental import topologies

    # Compiling touches no chip, so several compile checks (and tests) may hold libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topo = TOPOLOGIES[name]
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topo.name, chip_config_name=topo.chip_config,
                                           chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    per_chip = len(devices) // topo.chips
    return list(devices), topo.hbm_bytes // per_chip, topo.peak_flops / per_chip


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def abstract_frozen(cfg, mesh: Mesh, configs: dict[str, dict], *, encoders: bool = True) -> FrozenPipeline:
    """A ``FrozenPipeline`` whose base weights are ShapeDtypeStructs in their training shardings: what
    ``load_frozen`` would place on ``mesh``, for compiling without weights. configs: component -> config.json
    fields ('unet', 'vae', and the text encoders when ``encoders``)."""
    opts, min_size = model_options(cfg.model), min_shard_size(cfg)

    def place(shapes):
        return _with_shardings(shapes, sharding.weight_shardings(mesh, shapes, min_size))

    graphdefs, base = unet_definitions(configs["unet"], opts, lora_config(cfg.lora))
    params = {"unet": place(base)}
    for name in ENCODERS if encoders else ():
        graphdefs[name], state = nnx.split(nnx.eval_shape(
            lambda name=name: ENCODERS[name](configs[name], opts=opts, rngs=nnx.Rngs(0))))
        params[name] = place(state)
    if cfg.guidance.mode == "official":
        rep = sharding.replicated(mesh)
        pooled = configs["text_encoder_2"]["projection_dim"]
        params["empty_prompt"] = {
            "prompt_embeds": jax.ShapeDtypeStruct((77, configs["unet"]["cross_attention_dim"]), opts.dtype,
                                                  sharding=rep),
            "pooled_prompt_embeds": jax.ShapeDtypeStruct((pooled,), opts.dtype, sharding=rep)}
    vae = nnx.eval_shape(lambda: AutoencoderKL(configs["vae"], opts=opts, rngs=nnx.Rngs(0)))
    return FrozenPipeline(graphdefs=graphdefs, params=params, unet_config=configs["unet"],
                          vae_scaling_factor=vae.scaling_factor, vae_shift_factor=vae.shift_factor)


def _cond_spec(configs: dict, batch: int, dtype) -> Cond:
    f, unet = jax.ShapeDtypeStruct, configs["unet"]
    return Cond(f((batch, int(configs["text_encoder"]["max_position_embeddings"]), unet["cross_attention_dim"]),
                  dtype),
                f((batch, configs["text_encoder_2"]["projection_dim"]), dtype), f((batch, 6), jnp.float32))


def analytic_step_flops(cfg, configs: dict, lora_shapes) -> dict:
    """The least matmul/conv work of one TDD step on the global batch B, from the UNet's own counts (remat off):
    {'student_forward_backward', 'teacher_cfg_forward', 'target_forward', 'minimum'}."""
    opts = dataclasses.replace(model_options(cfg.model), remat="none")
    graphdefs, base = unet_definitions(configs["unet"], opts, lora_config(cfg.lora))
    b, side = int(cfg.batch.global_batch), int(cfg.resolution) // vae_factor(configs["vae"])
    f = jax.ShapeDtypeStruct

    def inputs(n):
        return (f((n, side, side, configs["unet"]["in_channels"]), jnp.float32), f((n,), jnp.int32),
                _cond_spec(configs, n, opts.dtype))

    def student(lora, base, x, t, cond):
        return unet_output(nnx.merge(graphdefs["unet"], lora, base), x, t, cond)

    def teacher(base, x, t, cond):
        return unet_output(nnx.merge(graphdefs["teacher"], base), x, t, cond)

    loss_grad = jax.grad(lambda lora, *args: jnp.sum(student(lora, *args)))
    parts = {"student_forward_backward": function_flops(loss_grad, lora_shapes, base, *inputs(b)),
             "teacher_cfg_forward": function_flops(teacher, base, *inputs(2 * b)),
             "target_forward": function_flops(student, lora_shapes, base, *inputs(b))}
    return {**parts, "minimum": sum(parts.values())}


def with_xla_attention(cfg, frozen: FrozenPipeline, mesh: Mesh, configs: dict) -> tuple[Any, FrozenPipeline]:
    """(cfg, frozen) to count FLOPs with: as given, or for ``model.attention_impl='splash'`` with the XLA
    attention in its place (same weights and shardings). The Pallas kernel is opaque to the count
    (``tdd_jax.flops``) and its matmuls are the same as XLA's (not counted: the work on the kernel's padding of
    sequence lengths to a multiple of 128)."""
    if cfg.model.attention_impl != "splash":
        return cfg, frozen
    cfg = cfg.copy_and_resolve_references()
    cfg.model.attention_impl = None
    return cfg, abstract_frozen(cfg, mesh, configs, encoders=frozen.has_encoders)


def step_flops(cfg, frozen: FrozenPipeline, mesh: Mesh, configs: dict, step, batch: dict) -> dict:
    """The step's counted FLOPs on the global batch beside its analytic minimum: {'counted', 'remat_recompute',
    'analytic': analytic_step_flops, 'ratio': (counted - remat_recompute) / minimum} (splash attention counted
    as XLA's, ``with_xla_attention``)."""
    xla_cfg, frozen = with_xla_attention(cfg, frozen, mesh, configs)
    if xla_cfg is not cfg:
        cfg, step = xla_cfg, build_train_step(xla_cfg, frozen, step.schedule, mesh)

    def counted(step):
        return function_flops(step.step_fn, step.abstract_state(), frozen.params, batch)

    total = counted(step)
    if str(cfg.model.remat) == "none":
        no_remat = total
    else:
        cfg_none = cfg.copy_and_resolve_references()
        cfg_none.model.remat = "none"
        frozen_none = abstract_frozen(cfg_none, mesh, configs, encoders=frozen.has_encoders)
        no_remat = counted(build_train_step(cfg_none, frozen_none, step.schedule, mesh))
    analytic = analytic_step_flops(cfg, configs, step.abstract_state().lora)
    return {"counted": total, "remat_recompute": total - no_remat, "analytic": analytic,
            "ratio": no_remat / analytic["minimum"]}


_HBM_OOM = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT]?)\) exceeds available HBM \(([0-9.]+)([KMGT]?)\)")


def compiled_or_out_of_memory(analyse) -> dict:
    """``analyse()`` (a program compiled and its ``compiled_analysis`` read), as the reports store it, or, where the
    TPU compiler refuses the program because it cannot fit the device's HBM, {'out_of_memory': its message, and
    'temp_required' / 'temp_available' in bytes where it states them}: an answer to "does it fit", not a crash."""
    try:
        analysis = analyse()
    except jax.errors.JaxRuntimeError as e:
        message = str(e).strip().splitlines()[0]
        if "RESOURCE_EXHAUSTED" not in message or "memory" not in message.lower():
            raise
        oom: dict[str, Any] = {"out_of_memory": message}
        match = _HBM_OOM.search(message)
        if match:
            unit = lambda u: 1024 ** " KMGT".index(u or " ")  # noqa: E731  XLA's byte counts are 1024-based
            oom["temp_required"] = int(float(match[1]) * unit(match[2]))
            oom["temp_available"] = int(float(match[3]) * unit(match[4]))
        return oom
    return {"memory": analysis["memory"], "xla_flops": analysis["flops"], "xla_optimal_s": analysis["optimal_seconds"],
            "while_loops": analysis["while_loops"], "unpriced_ops": analysis["unpriced_ops"],
            "mosaic_kernels": analysis["mosaic_kernels"]}


def _record_lowered_host_memory(result: dict) -> None:
    """Writes the process's resident + swapped memory into ``result['host_lowered_gib']``: called between lowering
    and compiling, it tells what the traced and lowered program holds on the host from what the compiler adds on
    top (the report's peak)."""
    result["host_lowered_gib"] = HostMemoryPeak.current_bytes() / GiB


def compile_step(cfg, frozen: FrozenPipeline, mesh: Mesh, configs: dict, batch_kind: str = "pixels",
                 compile: bool = True) -> dict:
    """Compile the TDD train step on ``mesh`` (``frozen``'s); memory, FLOPs (per device: counted, and XLA's own),
    the FLOP accounting against the analytic minimum (global), and compile seconds. compile=False: the FLOPs
    only (tracing, no compiler: minutes and little host memory where the compile takes far more)."""
    start = time.perf_counter()
    step = build_train_step(cfg, frozen, NoiseSchedule.from_config(SDXL_SCHEDULER_CONFIG), mesh)
    batch = batch_spec(cfg, configs, batch_kind)
    result = {"images": int(cfg.batch.global_batch)}
    if compile:
        on_lowered = functools.partial(_record_lowered_host_memory, result)
        result.update(compiled_or_out_of_memory(lambda: compile_train_step(step, batch, on_lowered)._asdict()),
                      compile_s=time.perf_counter() - start)
    accounting = step_flops(cfg, frozen, mesh, configs, step, select_batch(batch))
    return {**result, "flops": accounting["counted"] / mesh.size, "flop_accounting": accounting}


def compile_sampler(cfg, frozen: FrozenPipeline, mesh: Mesh, configs: dict, batch: int,
                    settings: SamplerSettings, compile: bool = True) -> dict:
    """Compile prompt encoding, the ``settings.num_steps``-step sampler and the VAE decode at ``cfg.resolution``
    for a global batch of ``batch`` images (``render.render``, as ``TDDPipeline`` runs it: a LoRA is merged into
    the base weights, so the program is the LoRA-free UNet's); memory, FLOPs and compile seconds (compile=False:
    the FLOPs only)."""
    start = time.perf_counter()
    schedule = NoiseSchedule.from_config(SDXL_SCHEDULER_CONFIG)
    side = int(cfg.resolution) // vae_factor(configs["vae"])
    latent_shape = (side, side, configs["vae"]["latent_channels"])

    def program(frozen: FrozenPipeline):
        def render_batch(params, input_ids, input_ids_2, time_ids, seeds):
            embeds, pooled = frozen.encode_prompts(params, input_ids, input_ids_2)
            vae = nnx.merge(frozen.graphdefs["vae"], params["vae"])
            return render(frozen.teacher(params), vae, schedule, settings, seeds, latent_shape,
                          Cond(embeds, pooled, time_ids))

        return render_batch

    data = sharding.batch_sharding(mesh)
    f = jax.ShapeDtypeStruct
    ids = f((batch, 77), jnp.int32, sharding=data)
    args = (ids, ids, f((batch, 6), jnp.float32, sharding=data), f((batch,), jnp.uint32, sharding=data))
    counting = with_xla_attention(cfg, frozen, mesh, configs)[1]
    result = {"flops": function_flops(program(counting), counting.params, *args) / mesh.size, "images": batch,
              "steps": settings.num_steps, "cfg": settings.uses_cfg}
    if compile:
        render_batch = jax.jit(sharding.traced_on(mesh, program(frozen)), out_shardings=data)
        options = sharding.compiler_options(cfg.mesh, mesh)
        lowered = render_batch.lower(frozen.params, *args)
        _record_lowered_host_memory(result)
        analyse = lambda: compiled_analysis(lowered.compile(compiler_options=options))  # noqa: E731
        result.update(compiled_or_out_of_memory(analyse), compile_s=time.perf_counter() - start)
    return result


def roofline(result: dict, hbm: int | None, peak: float | None) -> dict:
    """Add HBM fit and roofline (compute-bound) time / images per second to a compile result (per device)."""
    result = dict(result)
    if hbm is not None and "memory" in result:
        result["hbm_bytes"] = hbm
        result["fits"] = result["memory"]["total"] <= hbm
    elif hbm is not None and "out_of_memory" in result:
        result["hbm_bytes"], result["fits"] = hbm, False
    if peak is not None and result.get("flops"):
        seconds = result["flops"] / peak
        result["roofline_s"] = seconds
        result["roofline_images_per_s"] = result["images"] / seconds
    estimate = cost_model_estimate(result)
    if estimate is not None:
        result["cost_model_s"] = estimate
        result["cost_model_images_per_s"] = result["images"] / estimate
    return result


def cost_model_estimate(result: dict) -> float | None:
    """The compiler's own time for one program run (``optimal_seconds``: unlike the FLOP roofline it prices
    memory-bound work and collectives), made whole: the -1 s it books for each op it cannot price is added back
    (``unpriced_ops``), and as XLA prices a while loop's body once, a program with loops is scaled by counted
    FLOPs / XLA's FLOPs. That assumes the loop bodies cost per FLOP what the rest does; on a stack of 2-10
    transformer blocks, scanned vs unrolled (forward, and gradient under remat), it lands within -7% to +17%
    of the unrolled program's own figure (docs/tpu.md). None where the backend has no cost model, where the
    unpriced ops were not counted (reports from before they were), where the sum stays negative, or where the
    program holds Pallas TPU kernels: the cost model prices a splash attention call by its length, not its work
    (``tests/test_compile_check.py``), so such a program would read too fast."""
    seconds = result.get("xla_optimal_s")
    if seconds is None or (seconds < 0 and "unpriced_ops" not in result) or result.get("mosaic_kernels"):
        return None
    seconds += result.get("unpriced_ops", 0)
    if seconds <= 0:
        return None
    if result.get("while_loops") and result.get("xla_flops"):
        seconds *= result["flops"] / result["xla_flops"]
    return seconds


def settings_summary(cfg, mesh: Mesh) -> dict:
    devices = mesh.devices.size
    g, accum = int(cfg.batch.global_batch), int(cfg.batch.grad_accum)
    return {"mesh": dict(mesh.shape), "device_kind": mesh.devices.flat[0].device_kind,
            "global_batch": g, "grad_accum": accum, "micro_batch_per_device": g / (accum * devices),
            "remat": str(cfg.model.remat), "dtype": str(cfg.model.dtype), "param_dtype": str(cfg.model.param_dtype),
            "attention_impl": cfg.model.attention_impl, "lora_rank": int(cfg.lora.rank),
            "scan_blocks": bool(cfg.model.scan_blocks), "min_shard_size": min_shard_size(cfg),
            "lora_sharding": str(cfg.mesh.lora_sharding), "windowed_einsum": bool(cfg.mesh.get("windowed_einsum", True)),
            "resolution": int(cfg.resolution)}


def run(cfg, topology: str, *, configs: dict = SDXL_CONFIGS, batch_kind: str = "pixels", sampler_batch: int = 0,
        settings: SamplerSettings = SamplerSettings(), train: bool = True, compile: bool = True) -> dict[str, Any]:
    """The whole check for one topology: {'topology', 'batch_kind', 'settings', 'train_step', 'sampler'} (per device);
    compile=False counts the FLOPs without compiling."""
    devices, hbm, peak = topology_devices(topology)
    mesh = sharding.make_mesh(int(cfg.mesh.data), int(cfg.mesh.fsdp), devices=devices)
    frozen = abstract_frozen(cfg, mesh, configs, encoders=batch_kind == "pixels" or sampler_batch > 0)
    report: dict[str, Any] = {"topology": topology, "num_devices": len(devices), "batch_kind": batch_kind,
                              "settings": settings_summary(cfg, mesh)}
    if train:
        report["train_step"] = roofline(compile_step(cfg, frozen, mesh, configs, batch_kind, compile), hbm, peak)
    if sampler_batch:
        report["sampler"] = roofline(compile_sampler(cfg, frozen, mesh, configs, sampler_batch, settings, compile),
                                     hbm, peak)
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['topology']}: {report['num_devices']} x {report['settings']['device_kind']}, "
             f"settings {json.dumps(report['settings'])}"]
    for part in ("train_step", "sampler"):
        if part not in report:
            continue
        r = report[part]
        speed = (f", roofline {r['roofline_s'] * 1e3:.0f} ms = {r['roofline_images_per_s']:.2f} images/s"
                 if "roofline_s" in r else "")
        if "out_of_memory" in r:
            lines.append(f"  {part}: {r['images']} images; DOES NOT FIT: the TPU compiler refused it "
                         f"({r['out_of_memory']}); FLOPs per device {r['flops']:.3e}{speed}")
        elif "memory" not in r:
            lines.append(f"  {part}: {r['images']} images; not compiled; FLOPs per device {r['flops']:.3e}{speed}")
        else:
            m = r["memory"]
            hbm = f" of {r['hbm_bytes'] / GiB:.1f} GiB HBM ({'fits' if r['fits'] else 'DOES NOT FIT'})" \
                if "hbm_bytes" in r else ""
            xla = "n/a" if r["xla_flops"] is None else f"{r['xla_flops']:.3e}"
            lines.append(f"  {part}: {r['images']} images; per device: args {m['argument'] / GiB:.2f} GiB, temp "
                         f"{m['temp'] / GiB:.2f} GiB, out {m['output'] / GiB:.2f} GiB, total "
                         f"{m['total'] / GiB:.2f} GiB{hbm}; FLOPs {r['flops']:.3e} (XLA's figure, loop bodies "
                         f"once: {xla}){speed}; compiled in {r['compile_s']:.0f} s")
            if "host_lowered_gib" in r:
                lines.append(f"    host memory when lowered, before the compiler: {r['host_lowered_gib']:.1f} GiB")
            if r.get("mosaic_kernels"):
                lines.append(f"    {r['mosaic_kernels']} Pallas TPU kernel calls (splash attention; FLOPs counted as "
                             "XLA attention's)")
            if "cost_model_s" in r:
                lines.append(f"    the compiler's cost model: {r['cost_model_s'] * 1e3:.0f} ms = "
                             f"{r['cost_model_images_per_s']:.2f} images/s (its own figure "
                             f"{r['xla_optimal_s'] * 1e3:.1f} ms books -1 s for each of "
                             f"{r.get('unpriced_ops', 0)} unpriced ops and prices {r['while_loops']} while loops' "
                             "bodies once)")
            elif r.get("mosaic_kernels") and r.get("xla_optimal_s") is not None:
                lines.append(f"    the compiler's cost model: n/a, it does not price the Pallas kernels' work (its own "
                             f"figure {r['xla_optimal_s'] * 1e3:.1f} ms)")
            elif r.get("xla_optimal_s") is not None:
                lines.append(f"    the compiler's cost model could not price this program ({r['xla_optimal_s']:.3g})")
        if "flop_accounting" in r:
            a = r["flop_accounting"]
            parts = ", ".join(f"{k} {v:.3e}" for k, v in a["analytic"].items() if k != "minimum")
            lines.append(f"    FLOP accounting (global): counted {a['counted']:.3e} = remat recompute "
                         f"{a['remat_recompute']:.3e} + {a['counted'] - a['remat_recompute']:.3e}, "
                         f"{a['ratio']:.3f}x the analytic minimum {a['analytic']['minimum']:.3e} ({parts})")
    if "host_peak_rss_gib" in report:
        swap = f", {report['host_peak_rss_swap_gib']:.1f} GiB with swap" if "host_peak_rss_swap_gib" in report else ""
        lines.append(f"  host peak memory: {report['host_peak_rss_gib']:.1f} GiB resident{swap}")
    return "\n".join(lines)


class HostMemoryPeak:
    """The process's peak resident + swapped memory (Linux ``/proc/self/status``), sampled in a thread: on a
    host that compiles into swap, ``ru_maxrss`` stops at the RAM, and this is what the compile really asked for."""

    def __init__(self, interval_s: float = 0.5):
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    @staticmethod
    def current_bytes() -> int:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:  # not Linux
            return 0
        return 1024 * sum(int(v) for v in re.findall(r"^Vm(?:RSS|Swap):\s+(\d+) kB", status, re.MULTILINE))

    def _run(self, interval_s: float) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.current_bytes())
            self._stop.wait(interval_s)

    def __enter__(self) -> HostMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.current_bytes())


def command_fields(args: list[str], environ) -> dict[str, str]:
    """The report's reproducing command line. libtpu reads its flags (e.g.
    ``--xla_tpu_enable_latency_hiding_scheduler=false``) from ``LIBTPU_INIT_ARGS``, so a report compiled under it
    records them, in the command and as ``libtpu_init_args`` (``launch/compile_table.py`` labels its rows by them)."""
    libtpu_args = environ.get("LIBTPU_INIT_ARGS", "").strip()
    command = "python -m tdd_jax.compile_check " + " ".join(shlex.quote(a) for a in args)
    if not libtpu_args:
        return {"command": command}
    return {"command": f"LIBTPU_INIT_ARGS={shlex.quote(libtpu_args)} {command}", "libtpu_init_args": libtpu_args}


_CONFIG = config_flags.DEFINE_config_file("config", None, "Trainer config file (configs/*.py).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e-8", f"One of {sorted(TOPOLOGIES)}, or cpu:N (fake CPU devices).")
_BATCH_KIND = flags.DEFINE_enum("batch_kind", "pixels", ["pixels", "cached"],
                                "Train on pixel/caption batches (VAE + text encoders in the step) or cached ones.")
_TRAIN = flags.DEFINE_boolean("train", True, "Compile the train step.")
_COMPILE = flags.DEFINE_boolean("compile", True, "Compile; false: only count the FLOPs (and the train step's FLOP "
                                "accounting), which needs no compiler time or memory.")
_SAMPLER_BATCH = flags.DEFINE_integer("sampler_batch", 0, "Global sampler batch to compile (0: skip the sampler).")
_SAMPLER_STEPS = flags.DEFINE_integer("sampler_steps", 4, "Sampler steps.")
_GUIDANCE = flags.DEFINE_float("sampler_guidance_scale", 1.7, "Sampler CFG scale (1: no CFG).")
_OUT = flags.DEFINE_string("json", "", "Write the report as JSON here.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    topology = _TOPOLOGY.value
    if topology.startswith("cpu:"):
        jax.config.update("jax_num_cpu_devices", int(topology.split(":", 1)[1]))
    settings = SamplerSettings(num_steps=_SAMPLER_STEPS.value, guidance_scale=_GUIDANCE.value)
    try:
        with HostMemoryPeak() as host_memory:
            report = run(cfg, topology, batch_kind=_BATCH_KIND.value, sampler_batch=_SAMPLER_BATCH.value,
                         settings=settings, train=_TRAIN.value, compile=_COMPILE.value)
    except MissingLibTPU as e:
        raise app.UsageError(str(e)) from e
    report.update(command_fields(sys.argv[1:], os.environ))
    report["command_date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    report["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux: KiB
    if host_memory.peak_bytes:
        report["host_peak_rss_swap_gib"] = host_memory.peak_bytes / GiB
    print(format_report(report))
    if _OUT.value:
        Path(_OUT.value).write_text(json.dumps(report, indent=2))
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
