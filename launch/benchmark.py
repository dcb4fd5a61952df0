"""Side-by-side speed of tdd_jax and its PyTorch peers, in one process, on the same model, batch and threads.

    python -m launch.benchmark [--pipeline tdd_jax/assets/tiny_sdxl] [--batch 16] [--size 64] [--threads 2]
        [--repeats 5] [--device cpu|gpu] [--torch_compile] [--parts train,step_profile,sample,flops,profile] [--out bench.json]
    python -m launch.benchmark --quick   # tiny sizes, 1 repeat (run by the test suite so it cannot rot)

(a) train: our compiled TDD step vs a PyTorch step written like the official train_tdd.py (diffusers UNet +
    PEFT LoRA student, a second frozen teacher UNet, teacher CFG as one 2B call, DDIM step to t_n, target
    from the student under no_grad, pseudo-Huber, AdamW + grad clipping), both from cached latents/embeddings.
(b) sample: our TDDPipeline (4/8 steps, CFG 1 / 1.7, without / with a rank-64 LoRA, merged) vs diffusers'
    StableDiffusionXLPipeline + TCDScheduler(original_inference_steps=250) (LoRA loaded and fused).
(a') step_profile: where each train step's time goes, by part of the step and kind of op, from profiler traces
    of both steps (``launch/step_profile.py``).
(a'') remat (not in the default parts; with train): our step under every rematerialisation policy, interleaved.
(b') controlnet (not in the default parts): 4-step sampling (CFG 1 / 1.7) with one ControlNet (diffusers'
    ControlNetModel.from_unet of the pipeline's UNet), our TDDPipeline(controlnets=) vs diffusers'
    StableDiffusionXLControlNetPipeline + TCDScheduler, the same control image.
(c) flops: XLA's FLOP count of our step and the FLOP/s it achieves vs a measured fp32 matmul peak.
(d) profile: where the sampling time goes, each part timed alone against its diffusers counterpart (the text
    encoders, one UNet call at B and at 2B, the VAE decode, our jitted render, the whole call, our host
    overhead and its pieces), then the biggest single ops (VAE/UNet 3x3 convs at their widths, the widest
    linear) in XLA (NHWC with HWIO or OIHW kernels, at top level and inside a lax.scan; NCHW) vs torch.
(e) unet (not in the default parts; for GPUs): one forward of the full SDXL UNet architecture (random weights,
    bf16, --unet_size px, batch 1 and 4), our jitted UNet (XLA attention, and cuDNN attention on GPUs) vs
    diffusers' UNet2DConditionModel (PyTorch SDPA; also torch.compile with --torch_compile). --quick runs it on
    the --pipeline's UNet instead, at --size, so the test suite can exercise it on a CPU.
Repeats of the two sides are interleaved, so machine noise hits both; medians, min-max and ratios are printed
and written as JSON. The PyTorch side is a benchmark reference only, not a training path of the project.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from launch import step_profile

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tdd_jax" / "assets" / "tiny_sdxl"
PROMPTS = ["a photo of a cat", "a red car on the street", "a smiling face", "a bowl of fruit"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", default=str(TINY), help="diffusers SDXL pipeline folder")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--threads", type=int, default=2, help="CPU cores both sides are pinned to")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per side, after one warm-up")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--torch_compile", action="store_true", help="torch.compile the PyTorch UNets")
    p.add_argument("--parts", default="train,step_profile,sample,flops,profile",
                   help="comma-separated; also 'remat' (with 'train'), 'controlnet', 'unet'")
    p.add_argument("--steps", default="4,8", help="sampling step counts")
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--unet_size", type=int, default=1024, help="image side of the 'unet' part (SDXL UNet) in pixels")
    p.add_argument("--quick", action="store_true", help="batch 2, 16 px, 1 repeat, 4 steps")
    p.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.repeats, args.steps, args.lora_rank = 2, 16, 1, "4", 4
    return args


def pin_threads(args) -> None:
    """Both sides on the same cores: the process's CPU affinity (XLA's and torch's pools) and torch's threads.
    Must run before jax is imported."""
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        cores = sorted(os.sched_getaffinity(0))[: args.threads]
        os.sched_setaffinity(0, cores)
    import torch

    torch.set_num_threads(args.threads)


def stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def interleave(sides: dict, repeats: int) -> dict:
    """{side: stats}: one untimed warm-up each (compiles), then ``repeats`` rounds of every side in turn."""
    for fn in sides.values():
        fn()
    times = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: stats(t) for name, t in times.items()}


# --- (a) train step -----------------------------------------------------------------------------------------

def step_config(args):
    sys.path.insert(0, str(REPO / "configs"))
    import tdd_sdxl

    cfg = tdd_sdxl.get_config()
    cfg.batch.global_batch, cfg.batch.grad_accum = args.batch, 1
    cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = "float32", "float32", "none"
    cfg.lora.rank = args.lora_rank
    cfg.guidance.mode = "official"  # CFG on every sample, as train_tdd.py
    cfg.guidance.rho = 0.0  # no caption dropout: cached embeddings, the same work on both sides
    return cfg


def cached_batch(args, unet_config: dict, text_dim: int, pooled_dim: int):
    import numpy as np

    rng = np.random.default_rng(0)
    h = args.size // vae_factor(args)
    return {"latents": rng.normal(0.0, 1.0, (args.batch, h, h, unet_config["in_channels"])).astype(np.float32),
            "prompt_embeds": rng.normal(size=(args.batch, 77, text_dim)).astype(np.float32),
            "pooled_prompt_embeds": rng.normal(size=(args.batch, pooled_dim)).astype(np.float32),
            "time_ids": np.tile(np.float32([args.size, args.size, 0, 0, args.size, args.size]), (args.batch, 1))}


def vae_factor(args) -> int:
    from tdd_jax.models.loading import read_config

    return 2 ** (len(read_config(Path(args.pipeline) / "vae")["block_out_channels"]) - 1)


def jax_train_step(args, cfg, batch):
    """(run, compiled step): our compiled step on the cached batch."""
    import jax

    from tdd_jax.diffusion.schedule import NoiseSchedule
    from tdd_jax.training import sharding
    from tdd_jax.training.frozen import load_frozen
    from tdd_jax.training.step import build_train_step, compile_train_step

    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    frozen = load_frozen(args.pipeline, cfg, mesh, encoders=False)
    step = build_train_step(cfg, frozen, NoiseSchedule.from_pretrained(args.pipeline), mesh)
    placed = sharding.shard_batch(mesh, batch)
    compiled = compile_train_step(step, placed)
    box = {"state": step.init_state(jax.random.PRNGKey(0))}

    def run():
        box["state"], metrics = compiled.fn(box["state"], frozen.params, placed)
        jax.block_until_ready(metrics["loss"])

    return run, compiled


def torch_train_step(args, cfg, batch):
    """A step written like the official train_tdd.py on the same UNet, batch and TDD settings; its pieces are
    marked for ``step_profile`` with ``record_function`` under the names of ``step_profile.PARTS``."""
    import numpy as np
    import torch
    from torch.profiler import record_function
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    device = "cuda" if args.device == "gpu" else "cpu"
    folder = Path(args.pipeline)
    teacher = UNet2DConditionModel.from_pretrained(folder / "unet").to(device).requires_grad_(False)
    student = UNet2DConditionModel.from_pretrained(folder / "unet").to(device).requires_grad_(False)
    student.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, init_lora_weights="gaussian",
                                   target_modules=list(cfg.lora.targets)))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2),
                            weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    if args.torch_compile:
        teacher, student_fn = torch.compile(teacher), torch.compile(student)
    else:
        student_fn = student
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    ac = sched.alphas_cumprod.to(device)
    ddim = torch.arange(1, 251, device=device) * 4 - 1  # the 250-step solver grid
    tensors = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in batch.items()}
    latents = tensors["latents"].permute(0, 3, 1, 2).contiguous()
    embeds, pooled, time_ids = tensors["prompt_embeds"], tensors["pooled_prompt_embeds"], tensors["time_ids"]
    w, c, b = float(cfg.guidance.w_max), float(cfg.loss.huber_c), latents.shape[0]
    zeros_e, zeros_p = torch.zeros_like(embeds), torch.zeros_like(pooled)
    gen = torch.Generator(device).manual_seed(0)

    def bc(x):
        return x.view(-1, 1, 1, 1)

    def x0_eps(x, t, eps):
        return (x - bc((1 - ac[t]).sqrt()) * eps) / bc(ac[t].sqrt()), eps

    def f(x, t, s, eps):  # x at t -> the ODE solution at s (DDIM / DPM-Solver++(1) parameterisation)
        x0, eps = x0_eps(x, t, eps)
        return bc(ac[s].sqrt()) * x0 + bc((1 - ac[s]).sqrt()) * eps

    def run():
        index = torch.randint(0, 250, (b,), generator=gen, device=device)
        t_next = ddim[index]
        t_cur = (t_next - 4).clamp(min=0)
        s = (t_cur.float() * (1 - 0.3 * torch.rand(b, generator=gen, device=device))).long()
        noise = torch.randn(latents.shape, generator=gen, device=device)
        x_next = bc(ac[t_next].sqrt()) * latents + bc((1 - ac[t_next]).sqrt()) * noise
        cond = {"text_embeds": pooled, "time_ids": time_ids}
        with record_function("student forward"):
            pred = f(x_next, t_next, s, student_fn(x_next, t_next, embeds, added_cond_kwargs=cond).sample)
        with torch.no_grad(), record_function("teacher"):
            both = teacher(torch.cat([x_next, x_next]), torch.cat([t_next, t_next]), torch.cat([zeros_e, embeds]),
                           added_cond_kwargs={"text_embeds": torch.cat([zeros_p, pooled]),
                                              "time_ids": torch.cat([time_ids, time_ids])}).sample
            eps_u, eps_c = both.chunk(2)
            x0_u, _ = x0_eps(x_next, t_next, eps_u)
            x0_c, _ = x0_eps(x_next, t_next, eps_c)
            x0 = x0_c + w * (x0_c - x0_u)
            eps = eps_c + w * (eps_c - eps_u)
            x_prev = bc(ac[t_cur].sqrt()) * x0 + bc((1 - ac[t_cur]).sqrt()) * eps
        with torch.no_grad(), record_function("target"):
            target = f(x_prev, t_cur, s, student_fn(x_prev, t_cur, embeds, added_cond_kwargs=cond).sample)
        loss = (torch.sqrt((pred.float() - target.float()) ** 2 + c * c) - c).mean()
        with record_function("student backward"):
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of jnp.dot on n x n matrices (best of ``repeats``)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def bench_train(args, results: dict) -> None:
    from tdd_jax.models.loading import read_config

    folder = Path(args.pipeline)
    unet_config = read_config(folder / "unet")
    text_dim = sum(read_config(folder / n)["hidden_size"] for n in ("text_encoder", "text_encoder_2"))
    pooled_dim = read_config(folder / "text_encoder_2")["projection_dim"]
    cfg = step_config(args)
    batch = cached_batch(args, unet_config, text_dim, pooled_dim)
    ours, compiled = jax_train_step(args, cfg, batch)
    flops = compiled.flops
    torch_side = torch_train_step(args, cfg, batch)
    name = "torch_compile" if args.torch_compile else "torch_eager"
    times = interleave({"tdd_jax": ours, name: torch_side}, args.repeats)
    results["train"] = {"sides": times, "ratio": times[name]["median_s"] / times["tdd_jax"]["median_s"],
                        "xla_flops": flops}
    if "step_profile" in args.parts:
        results["step_profile"] = {"tdd_jax": step_profile.xla_step_profile(ours, compiled.fn, args.repeats),
                                   name: step_profile.torch_step_profile(torch_side, args.repeats),
                                   "wall_s": {side: t["median_s"] for side, t in times.items()}}
    if "remat" in args.parts:
        results["remat"] = bench_remat(args, batch, ours)
    if "flops" in args.parts and flops:
        n = 512 if args.quick else 2048
        achieved = flops / times["tdd_jax"]["median_s"]
        peak = matmul_peak(n)
        results["flops"] = {"xla_flops": flops, "achieved_flop_s": achieved, "matmul_peak_flop_s": peak,
                            "matmul_n": n, "fraction_of_peak": achieved / peak}


def bench_remat(args, batch, no_remat) -> dict:
    """{policy: stats}: our step under every rematerialisation policy, interleaved, to see whether recomputing
    the forward's activations in the backward (less stored, less written) beats storing them at this size."""
    from tdd_jax.models.layers import REMAT_POLICIES

    sides = {"none": no_remat}
    for policy in REMAT_POLICIES:
        if policy != "none":
            cfg = step_config(args)
            cfg.model.remat = policy
            sides[policy] = jax_train_step(args, cfg, batch)[0]
    return interleave(sides, args.repeats)


# --- (b) sampling -------------------------------------------------------------------------------------------

def random_lora_file(args, path: Path) -> Path:
    """A rank-``lora_rank`` UNet LoRA on the official TDD targets with random (non-zero) up weights."""
    import numpy as np
    from flax import nnx
    from safetensors.numpy import save_file

    from tdd_jax.models import lora_formats
    from tdd_jax.models.loading import read_config
    from tdd_jax.models.lora import TDD_TARGETS, matches_target
    from tdd_jax.models.unet import UNet2DConditionModel

    unet = nnx.eval_shape(lambda: UNet2DConditionModel(read_config(Path(args.pipeline) / "unet"),
                                                       rngs=nnx.Rngs(0)))
    rng, r, lora = np.random.default_rng(0), args.lora_rank, {}
    for name, shape in lora_formats.layer_shapes(unet).items():
        if matches_target(name, TDD_TARGETS):
            up = (shape[0], r) + (1, 1) * (len(shape) == 4)
            lora[name] = lora_formats.ModuleLoRA(0.01 * rng.standard_normal((r, *shape[1:]), np.float32),
                                                 0.01 * rng.standard_normal(up, np.float32), 8.0 / r)
    save_file(lora_formats.to_diffusers(lora), str(path))
    return path


def bench_sample(args, results: dict) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline, TCDScheduler
    from diffusers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

    from tdd_jax.diffusion.sampler import SamplerSettings
    from tdd_jax.pipeline import TDDPipeline

    prompts = (PROMPTS * args.batch)[: args.batch]
    lora = random_lora_file(args, Path(tempfile.mkdtemp()) / "lora.safetensors")
    ours = {False: TDDPipeline.from_pretrained(args.pipeline),
            True: TDDPipeline.from_pretrained(args.pipeline, lora=lora)}
    device = "cuda" if args.device == "gpu" else "cpu"
    theirs = {}
    for with_lora in (False, True):
        ref = StableDiffusionXLPipeline.from_pretrained(args.pipeline, add_watermarker=False).to(device)
        ref.scheduler = TCDScheduler.from_config(ref.scheduler.config, original_inference_steps=250)
        ref.set_progress_bar_config(disable=True)
        if with_lora:
            ref.load_lora_weights(str(lora))
            ref.fuse_lora()
        if args.torch_compile:
            ref.unet = torch.compile(ref.unet)
        theirs[with_lora] = ref
    results["sample"] = []
    for steps in map(int, args.steps.split(",")):
        for guidance in (1.0, 1.7):
            for with_lora in (False, True):
                settings = SamplerSettings(num_steps=steps, gamma=0.2, guidance_scale=guidance, final_step="tcd")

                def run_ours(pipe=ours[with_lora], settings=settings):
                    pipe(prompts, settings, seeds=list(range(len(prompts))), height=args.size, width=args.size)

                def run_theirs(ref=theirs[with_lora], steps=steps, guidance=guidance):
                    gen = torch.Generator(device).manual_seed(0)
                    ref(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, eta=0.2,
                        height=args.size, width=args.size, generator=gen, output_type="np")

                times = interleave({"tdd_jax": run_ours, "diffusers": run_theirs}, args.repeats)
                results["sample"].append({"steps": steps, "guidance_scale": guidance, "lora": with_lora,
                                          "sides": times,
                                          "ratio": times["diffusers"]["median_s"] / times["tdd_jax"]["median_s"]})


def controlnet_from_unet(args, folder: Path) -> Path:
    """diffusers' ``ControlNetModel.from_unet`` of the pipeline's UNet (its encoder copied, zero convolutions),
    with a conditioning embedding that downsamples control images as much as the VAE, saved into ``folder``."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(args.pipeline) / "unet")
    levels = vae_factor(args).bit_length()  # 2 ** (levels - 1) = the VAE factor
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[:levels])
    net.save_pretrained(folder)
    return folder


def bench_controlnet(args, results: dict) -> None:
    """4-step sampling with one ControlNet: our TDDPipeline(controlnets=) vs diffusers'
    StableDiffusionXLControlNetPipeline + TCDScheduler, the same ControlNet and control image."""
    import numpy as np
    import torch
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, TCDScheduler
    from diffusers.utils import logging
    from PIL import Image

    logging.set_verbosity_error()
    logging.disable_progress_bar()

    from tdd_jax.diffusion.sampler import SamplerSettings
    from tdd_jax.pipeline import TDDPipeline

    prompts = (PROMPTS * args.batch)[: args.batch]
    folder = controlnet_from_unet(args, Path(tempfile.mkdtemp()) / "controlnet")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), np.uint8))
    ours = TDDPipeline.from_pretrained(args.pipeline, controlnets=folder)
    device = "cuda" if args.device == "gpu" else "cpu"
    ref = StableDiffusionXLControlNetPipeline.from_pretrained(
        args.pipeline, controlnet=ControlNetModel.from_pretrained(folder), add_watermarker=False).to(device)
    ref.scheduler = TCDScheduler.from_config(ref.scheduler.config, original_inference_steps=250)
    ref.set_progress_bar_config(disable=True)
    if args.torch_compile:
        ref.unet, ref.controlnet = torch.compile(ref.unet), torch.compile(ref.controlnet)
    results["controlnet"] = []
    steps = 4
    for guidance in (1.0, 1.7):
        settings = SamplerSettings(num_steps=steps, gamma=0.2, guidance_scale=guidance, final_step="tcd")

        def run_ours(settings=settings):
            ours(prompts, settings, seeds=list(range(len(prompts))), height=args.size, width=args.size,
                 control_image=image)

        def run_theirs(guidance=guidance):
            ref(prompt=prompts, image=image, num_inference_steps=steps, guidance_scale=guidance, eta=0.2,
                height=args.size, width=args.size, generator=torch.Generator(device).manual_seed(0),
                output_type="np")

        times = interleave({"tdd_jax": run_ours, "diffusers": run_theirs}, args.repeats)
        results["controlnet"].append({"steps": steps, "guidance_scale": guidance, "sides": times,
                                      "ratio": times["diffusers"]["median_s"] / times["tdd_jax"]["median_s"]})


# --- (d) profile: where the sampling time goes ---------------------------------------------------------------

def _pair(ours, theirs) -> dict:
    sides = {"tdd_jax": ours}
    if theirs is not None:
        sides["torch"] = theirs
    return sides


def profile_ops(args, unet_config: dict, vae_config: dict) -> list[tuple[str, tuple, int, int]]:
    """(name, NHWC input shape, out channels, kernel) of the biggest single ops of one render: each VAE decoder
    level's 3x3 conv at its width, the upsampler conv and conv_out at full size, each UNet level's 3x3 conv at
    B and 2B (CFG), and the widest UNet linear (the GEGLU feed-forward in) at B, as (rows, in) x (in, out)."""
    b, lat = args.batch, args.size // vae_factor(args)
    vae_ch = list(reversed(vae_config["block_out_channels"]))
    ops = []
    for i, ch in enumerate(vae_ch):
        ops.append((f"VAE dec level {i} conv3x3", (b, lat * 2 ** i, lat * 2 ** i, ch), ch, 3))
    full = lat * 2 ** (len(vae_ch) - 1)
    if len(vae_ch) > 1:
        ops.append(("VAE dec upsampler conv3x3", (b, full, full, vae_ch[-2]), vae_ch[-2], 3))
    ops.append(("VAE dec conv_out", (b, full, full, vae_ch[-1]), vae_config.get("out_channels", 3), 3))
    for i, ch in enumerate(unet_config["block_out_channels"]):
        hw = lat // 2 ** i
        for n in (b, 2 * b):
            ops.append((f"UNet level {i} conv3x3 (batch {n})", (n, hw, hw, ch), ch, 3))
    ch = unet_config["block_out_channels"][-1]
    hw = lat // 2 ** (len(unet_config["block_out_channels"]) - 1)
    ops.append(("UNet GEGLU ff.proj linear", (b * hw * hw, ch), 8 * ch, 0))
    return ops


def time_op(shape: tuple, cout: int, kernel: int, repeats: int) -> dict:
    """One op in XLA (jit: NHWC with the HWIO kernel our Conv2d now uses; NHWC with the OIHW kernel it used
    before, at top level and inside a while loop; NCHW) and in torch (F.conv2d NCHW and channels_last; a
    matmul for a linear), interleaved. In-loop times are per iteration of a 4-trip lax.scan whose input
    depends on the carry (so nothing is hoisted out of the loop)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, np.float32)
    trips = 4
    if kernel == 0:  # a linear: (rows, in) x (in, out)
        w = (0.05 * rng.standard_normal((cout, shape[1]))).astype(np.float32)
        ours = {"xla": lambda x, w: x @ w.T}
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        theirs = {"torch": lambda: F.linear(tx, tw)}
    else:
        w = (0.05 * rng.standard_normal((cout, shape[-1], kernel, kernel))).astype(np.float32)
        pad = [(kernel // 2, kernel // 2)] * 2

        def conv(lhs, rhs, out):
            return lambda x, w: jax.lax.conv_general_dilated(
                x, w.transpose(2, 3, 1, 0) if rhs == "HWIO" else w, (1, 1), pad, dimension_numbers=(lhs, rhs, out))

        ours = {"xla NHWC/HWIO": conv("NHWC", "HWIO", "NHWC"), "xla NHWC/OIHW": conv("NHWC", "OIHW", "NHWC"),
                "xla NCHW/OIHW": conv("NCHW", "OIHW", "NCHW")}
        tx, tw = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(w)
        tx_cl = tx.contiguous(memory_format=torch.channels_last)
        theirs = {"torch NCHW": lambda: F.conv2d(tx, tw, padding=kernel // 2),
                  "torch channels_last": lambda: F.conv2d(tx_cl, tw, padding=kernel // 2)}
    sides = {}
    for name, op in ours.items():
        xin = jnp.asarray(x.transpose(0, 3, 1, 2) if name.startswith("xla NCHW") else x)
        wj = jnp.asarray(w)
        once = jax.jit(lambda x, w, c, op=op: op(x + c, w))
        sides[name] = lambda once=once, xin=xin, wj=wj: once(xin, wj, jnp.float32(0)).block_until_ready()

        def looped(x, w, op=op):
            def body(c, _):
                y = op(x + c, w)
                return y.reshape(-1)[0] * 0.0, None
            return jax.lax.scan(body, jnp.float32(0), None, length=trips)[0]

        in_loop = jax.jit(looped)
        sides[f"{name} in loop"] = (lambda f=in_loop, xin=xin, wj=wj: f(xin, wj).block_until_ready(), trips)
    for name, fn in theirs.items():
        sides[name] = lambda fn=fn: fn()
    per_call = {k: (v[1] if isinstance(v, tuple) else 1) for k, v in sides.items()}
    with torch.no_grad():
        times = interleave({k: (v[0] if isinstance(v, tuple) else v) for k, v in sides.items()}, repeats)
    out = {}
    for k, st in times.items():
        n = per_call[k]
        out[k] = {key: (val / n if key.endswith("_s") else val) for key, val in st.items()}
    return out


def bench_unet(args, results: dict) -> None:
    """(e) One UNet forward of SDXL's architecture at a real size, ours vs diffusers', in bf16 weights and
    compute, random weights (speed does not depend on their values). Each of our attention implementations is
    compiled separately; one that fails to compile on this backend is recorded with its error, not fatal."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel as PeerUNet
    from flax import nnx

    from tdd_jax.models.layers import ModelOptions
    from tdd_jax.models.loading import read_config
    from tdd_jax.models.unet import SDXL_UNET_CONFIG, UNet2DConditionModel

    gpu = args.device == "gpu"
    device = "cuda" if gpu else "cpu"
    config = read_config(Path(args.pipeline) / "unet") if args.quick else dict(SDXL_UNET_CONFIG)
    latent = (args.size // vae_factor(args)) if args.quick else args.unet_size // 8
    batches = (2,) if args.quick else (1, 4)
    with torch.device(device):
        peer = PeerUNet.from_config(config).to(torch.bfloat16).eval().requires_grad_(False)
    peers = {"diffusers": peer}
    if args.torch_compile:
        peers["diffusers torch.compile"] = torch.compile(peer)
    impls = {"tdd_jax": None, "tdd_jax cudnn attention": "cudnn"} if gpu else {"tdd_jax": None}
    ours, state = {}, None
    for name, impl in impls.items():
        opts = ModelOptions(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl=impl)
        if state is None:  # one copy of the weights serves every implementation
            graphdef, state = nnx.split(UNet2DConditionModel(config, opts=opts, rngs=nnx.Rngs(0)))
        else:
            graphdef = nnx.graphdef(nnx.eval_shape(lambda opts=opts: UNet2DConditionModel(config, opts=opts,
                                                                                           rngs=nnx.Rngs(0))))
        ours[name] = (jax.jit(lambda state, x, t, ctx, pooled, ids, graphdef=graphdef: nnx.merge(graphdef, state)(
            x, t, ctx, {"text_embeds": pooled, "time_ids": ids})), state)
    rng = np.random.default_rng(0)
    ctx_dim = config["cross_attention_dim"]
    ctx_dim = ctx_dim[0] if isinstance(ctx_dim, (list, tuple)) else ctx_dim
    pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    results["unet"] = []
    for b in batches:
        x = rng.standard_normal((b, latent, latent, config["in_channels"])).astype(np.float32)
        ctx = rng.standard_normal((b, 77, ctx_dim)).astype(np.float32)
        pooled = rng.standard_normal((b, pooled_dim)).astype(np.float32)
        ids = np.tile(np.float32([1024, 1024, 0, 0, 1024, 1024]), (b, 1))
        t = np.full((b,), 999, np.int32)
        jx = [jnp.asarray(a, jnp.bfloat16) for a in (x, ctx, pooled)] + [jnp.asarray(ids), jnp.asarray(t)]
        tx = torch.from_numpy(x).permute(0, 3, 1, 2).to(device, torch.bfloat16)
        tctx, tpooled = (torch.from_numpy(a).to(device, torch.bfloat16) for a in (ctx, pooled))
        tids, tt = torch.from_numpy(ids).to(device), torch.from_numpy(t).to(device)
        sides, errors = {}, {}
        for name, (fwd, state) in ours.items():
            def run(fwd=fwd, state=state):
                fwd(state, jx[0], jx[4], jx[1], jx[2], jx[3]).block_until_ready()
            try:
                run()
            except Exception as e:  # noqa: BLE001 - an implementation this backend lacks is a result, not a crash
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            sides[name] = run
        for name, model in peers.items():
            def run_peer(model=model):
                with torch.no_grad():
                    model(tx, tt, tctx, added_cond_kwargs={"text_embeds": tpooled, "time_ids": tids})
                if gpu:
                    torch.cuda.synchronize()
            sides[name] = run_peer
        times = interleave(sides, args.repeats)
        results["unet"].append({"batch": b, "latent": latent, "sides": times, "errors": errors})
        print(unet_table(results["unet"][-1:]), flush=True)  # each batch as it lands: a GPU lease may end first


def unet_table(rows: list[dict]) -> str:
    """One row per (batch, side): median [min-max] and diffusers eager / side (> 1: faster than diffusers)."""
    out = ["| UNet forward, bf16 | side | median [min-max] | diffusers / side |", "|---|---|---|---|"]
    for r in rows:
        base = r["sides"]["diffusers"]["median_s"]
        for side, st in r["sides"].items():
            out.append(f"| batch {r['batch']}, {r['latent']}x{r['latent']} latents | {side} | {fmt(st)} "
                       f"| {base / st['median_s']:.2f}x |")
        for side, err in r["errors"].items():
            out.append(f"| batch {r['batch']}, {r['latent']}x{r['latent']} latents | {side} | failed: {err} | |")
    return "\n".join(out)


def bench_profile(args, results: dict) -> None:
    """Each part of one render timed alone, ours vs diffusers on the same model, batch and threads (interleaved):
    text encoding, one UNet call at B and 2B, the VAE decode, our jitted render, the whole call; our host
    overhead (whole call minus the jitted render) and its pieces; then the biggest single ops, XLA vs torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline, TCDScheduler
    from diffusers.utils import logging
    from flax import nnx

    logging.set_verbosity_error()
    logging.disable_progress_bar()

    from tdd_jax import conditioning
    from tdd_jax.diffusion.sampler import SamplerSettings
    from tdd_jax.models.loading import read_config
    from tdd_jax.pipeline import TDDPipeline
    from tdd_jax.render import decode
    from tdd_jax.training import sharding

    folder = Path(args.pipeline)
    b, size = args.batch, args.size
    steps = int(args.steps.split(",")[0])
    prompts = (PROMPTS * b)[:b]
    pipe = TDDPipeline.from_pretrained(folder)
    device = "cuda" if args.device == "gpu" else "cpu"
    ref = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False).to(device)
    ref.scheduler = TCDScheduler.from_config(ref.scheduler.config, original_inference_steps=250)
    ref.set_progress_bar_config(disable=True)
    gd, params = pipe._graphdefs, pipe.params
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    latent_shape = pipe.geometry.latent_shape(size, size)

    @jax.jit
    def encode(p, ids, ids_2):
        return conditioning.encode_prompts(nnx.merge(gd["text_encoder"], p["text_encoder"]),
                                           nnx.merge(gd["text_encoder_2"], p["text_encoder_2"]), ids, ids_2)

    @jax.jit
    def unet(p, x, t, cond):
        return conditioning.unet_output(nnx.merge(gd["unet"], p["unet"]), x, t, cond)

    @jax.jit
    def vae_decode(p, z):
        return decode(nnx.merge(gd["vae"], p["vae"]), z)

    def our_encode():
        ids = conditioning.tokenize(pipe.tokenizers[0], prompts)
        ids_2 = conditioning.tokenize(pipe.tokenizers[1], prompts)
        jax.block_until_ready(encode(params, ids, ids_2))

    def their_encode():
        ref.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        sync()

    ids = jnp.asarray(conditioning.tokenize(pipe.tokenizers[0], prompts))
    ids_2 = jnp.asarray(conditioning.tokenize(pipe.tokenizers[1], prompts))
    embeds, pooled = encode(params, ids, ids_2)
    tids = np.tile(conditioning.time_ids((size, size)), (b, 1))
    cond = conditioning.Cond(embeds, pooled, jnp.asarray(tids))
    z = jax.random.normal(jax.random.PRNGKey(0), (b, *latent_shape), jnp.float32)
    with torch.no_grad():
        t_embeds, _, t_pooled, _ = ref.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False)
    t_z = torch.from_numpy(np.array(z)).permute(0, 3, 1, 2).contiguous().to(device)
    t_tids = torch.from_numpy(tids).to(device)

    def unet_rows(n):
        def cat(a):
            return jnp.concatenate([a] * n)

        x, t, c = cat(z), jnp.full((n * b,), 999, jnp.int32), jax.tree.map(cat, cond)
        tc = {"text_embeds": torch.cat([t_pooled] * n), "time_ids": torch.cat([t_tids] * n)}
        tx, tt, te = torch.cat([t_z] * n), torch.full((n * b,), 999, device=device), torch.cat([t_embeds] * n)

        def ours():
            jax.block_until_ready(unet(params, x, t, c))

        def theirs():
            ref.unet(tx, tt, te, added_cond_kwargs=tc)
            sync()

        return ours, theirs

    def our_decode():
        jax.block_until_ready(vae_decode(params, z))

    def their_decode():
        ref.vae.decode(t_z / ref.vae.config.scaling_factor)
        sync()

    rows = []

    def row(name, ours, theirs=None, note=""):
        with torch.no_grad():
            times = interleave(_pair(ours, theirs), args.repeats)
        rows.append({"part": name, "sides": times, "note": note,
                     "ratio": times["torch"]["median_s"] / times["tdd_jax"]["median_s"] if theirs else None})
        return times

    parts = {"encode": row("text encoders (tokenize + both CLIPs)", our_encode, their_encode),
             1: row(f"UNet call, batch {b}", *unet_rows(1)),
             2: row(f"UNet call, batch {2 * b} (CFG)", *unet_rows(2)),
             "vae": row("VAE decode", our_decode, their_decode, "ours includes the uint8 conversion")}
    placed = jax.device_put({"ids": np.asarray(ids), "ids_2": np.asarray(ids_2),
                             "seeds": np.arange(b, dtype=np.uint32), "time_ids": tids},
                            sharding.batch_sharding(pipe.mesh))
    for guidance in (1.0, 1.7):
        settings = SamplerSettings(num_steps=steps, gamma=0.2, guidance_scale=guidance, final_step="tcd")

        def our_render(settings=settings):
            jax.block_until_ready(pipe._render(params, placed, settings=settings, latent_shape=latent_shape,
                                               output_type="uint8"))

        def our_call(settings=settings):
            pipe(prompts, settings, seeds=list(range(b)), height=size, width=size)

        def their_call(guidance=guidance):
            ref(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, eta=0.2, height=size,
                width=size, generator=torch.Generator(device).manual_seed(0), output_type="np")
            sync()

        with torch.no_grad():
            times = interleave({"render": our_render, "whole": our_call, "torch": their_call}, args.repeats)
        for part, side, note in (("render (one jit)", "render", "peer: its whole pipeline call"),
                                 ("whole call", "whole", "")):
            rows.append({"part": f"{steps}-step {part}, CFG {guidance}", "note": note,
                         "sides": {"tdd_jax": times[side], "torch": times["torch"]},
                         "ratio": times["torch"]["median_s"] / times[side]["median_s"]})
        parts_sum = {side: parts["encode"][side]["median_s"] + steps * parts[1 + (guidance != 1.0)][side]["median_s"]
                     + parts["vae"][side]["median_s"] for side in ("tdd_jax", "torch")}
        rows.append({"part": f"sum of the parts above, CFG {guidance}", "ratio": None,
                     "note": f"medians: encoders + {steps} UNet calls + VAE",
                     "sides": {side: {"median_s": v} for side, v in parts_sum.items()}})
        rows.append({"part": f"our host overhead, CFG {guidance} (whole call - render)", "note": "medians",
                     "sides": {"tdd_jax": {"median_s": times["whole"]["median_s"] - times["render"]["median_s"]}},
                     "ratio": None})
    batch = {"ids": np.asarray(ids), "ids_2": np.asarray(ids_2), "seeds": np.arange(b, dtype=np.uint32),
             "time_ids": tids}
    image = pipe._render(params, placed, settings=settings, latent_shape=latent_shape, output_type="uint8")
    row("  host: tokenize (both tokenizers)", lambda: [conditioning.tokenize(tok, prompts) for tok in pipe.tokenizers])
    row("  host: device_put of the batch",
        lambda: jax.block_until_ready(jax.device_put(batch, sharding.batch_sharding(pipe.mesh))))
    row("  host: device -> host images", lambda: np.asarray(image).copy())
    ops = []
    unet_config, vae_config = read_config(folder / "unet"), read_config(folder / "vae")
    for name, shape, cout, kernel in profile_ops(args, unet_config, vae_config):
        ops.append({"op": name, "shape": list(shape), "out_channels": cout, "kernel": kernel,
                    "sides": time_op(shape, cout, kernel, args.repeats)})
    results["profile"] = {"steps": steps, "rows": rows, "ops": ops}


OP_COLUMNS = ("xla NHWC/HWIO", "xla NHWC/HWIO in loop", "xla NHWC/OIHW", "xla NHWC/OIHW in loop", "xla NCHW/OIHW",
              "torch NCHW", "torch channels_last")
LINEAR_COLUMNS = {"xla": "xla NHWC/HWIO", "xla in loop": "xla NHWC/HWIO in loop", "torch": "torch NCHW"}


def profile_table(profile: dict) -> str:
    """The per-part table, then the per-op table (ms; for a linear: xla under HWIO, torch under NCHW)."""
    rows = ["| part | tdd_jax median [min-max] | diffusers/torch median [min-max] | peer / tdd_jax |",
            "|---|---|---|---|"]
    for r in profile["rows"]:
        ours = r["sides"]["tdd_jax"]
        mine = fmt(ours) if "min_s" in ours else f"{ours['median_s']:.3f} s"
        theirs = r["sides"].get("torch")
        peer = "" if theirs is None else fmt(theirs) if "min_s" in theirs else f"{theirs['median_s']:.3f} s"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else ""
        note = f" ({r['note']})" if r.get("note") else ""
        rows.append(f"| {r['part']}{note} | {mine} | {peer} | {ratio} |")
    ops = ["| op: NHWC input -> out channels | " + " | ".join(f"{c} ms" for c in OP_COLUMNS) + " |",
           "|---" * (len(OP_COLUMNS) + 1) + "|"]
    for o in profile["ops"]:
        sides = {LINEAR_COLUMNS.get(k, k): v for k, v in o["sides"].items()}
        cells = [f"{1e3 * sides[c]['median_s']:.2f} [{1e3 * sides[c]['min_s']:.2f}-{1e3 * sides[c]['max_s']:.2f}]"
                 if c in sides else "" for c in OP_COLUMNS]
        ops.append(f"| {o['op']} {tuple(o['shape'])} -> {o['out_channels']} | " + " | ".join(cells) + " |")
    return "\n\n".join(["\n".join(rows), "\n".join(ops)])


# --- report -------------------------------------------------------------------------------------------------

def fmt(s: dict) -> str:
    return f"{s['median_s']:.3f} s [{s['min_s']:.3f}-{s['max_s']:.3f}]"


def table(results: dict) -> str:
    """A markdown table of every comparison (ratio > 1: tdd_jax is faster)."""
    rows = ["| benchmark | tdd_jax median [min-max] | peer median [min-max] | peer / tdd_jax |", "|---|---|---|---|"]
    if "train" in results:
        sides = results["train"]["sides"]
        peer = next(k for k in sides if k != "tdd_jax")
        rows.append(f"| train step ({peer}) | {fmt(sides['tdd_jax'])} | {fmt(sides[peer])} | "
                    f"{results['train']['ratio']:.2f}x |")
    for r in results.get("sample", []):
        name = f"sample {r['steps']} steps, CFG {r['guidance_scale']}, {'LoRA' if r['lora'] else 'no LoRA'}"
        rows.append(f"| {name} (diffusers TCD) | {fmt(r['sides']['tdd_jax'])} | {fmt(r['sides']['diffusers'])} | "
                    f"{r['ratio']:.2f}x |")
    for r in results.get("controlnet", []):
        rows.append(f"| sample {r['steps']} steps, CFG {r['guidance_scale']}, one ControlNet (diffusers ControlNet "
                    f"TCD) | {fmt(r['sides']['tdd_jax'])} | {fmt(r['sides']['diffusers'])} | {r['ratio']:.2f}x |")
    lines = ["\n".join(rows)]
    if "remat" in results:
        base = results["remat"]["none"]["median_s"]
        lines.append("\n".join(["| our train step, remat policy | median [min-max] | none / policy |", "|---|---|---|"]
                               + [f"| {policy} | {fmt(t)} | {base / t['median_s']:.2f}x |"
                                  for policy, t in results["remat"].items()]))
    if "flops" in results:
        f = results["flops"]
        lines.append(f"train step XLA FLOPs {f['xla_flops']:.3e}; achieved {f['achieved_flop_s'] / 1e9:.1f} GFLOP/s "
                     f"= {100 * f['fraction_of_peak']:.0f}% of the measured fp32 matmul peak "
                     f"({f['matmul_peak_flop_s'] / 1e9:.1f} GFLOP/s, jnp.dot {f['matmul_n']}^2)")
    if "step_profile" in results:
        sp = results["step_profile"]
        sides = [k for k in sp if k != "wall_s"]
        threads = "; ".join(f"{s}'s ops ran {1e3 * sp[s]['thread_s']:.0f} ms summed over threads" for s in sides
                            if "thread_s" in sp[s])
        lines.append("train step profile, ms per step by part and kind of op (" + " / ".join(sides) + ", under the "
                     "profiler); ops ran " + " / ".join(f"{1e3 * sp[s]['op_s']:.0f}" for s in sides)
                     + " ms, against an unprofiled step of " + " / ".join(f"{1e3 * sp['wall_s'][s]:.0f}" for s in sides)
                     + f" ms ({threads}; time that ops share is split among them)\n\n"
                     + step_profile.grid_table({s: sp[s] for s in sides}) + "\n\n"
                     + step_profile.top_table(sp["tdd_jax"]))
    if "profile" in results:
        lines.append(profile_table(results["profile"]))
    if "unet" in results:
        lines.append(unet_table(results["unet"]))
    return "\n\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    pin_threads(args)
    import tdd_jax  # noqa: F401  (its XLA:CPU settings must come before jax starts the backend)
    import jax
    import torch

    results = {"command": " ".join(["python -m launch.benchmark", *(argv if argv is not None else sys.argv[1:])]),
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
               "machine": f"{platform.processor() or platform.machine()}, {args.threads} pinned cores, "
                          f"{jax.devices()[0].device_kind}, "
                          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}",
               "pipeline": str(args.pipeline), "batch": args.batch, "size": args.size, "repeats": args.repeats,
               "dtype": "float32", "xla_flags": os.environ.get("XLA_FLAGS", "")}
    parts = args.parts.split(",")
    if "train" in parts:
        bench_train(args, results)
    if "sample" in parts:
        bench_sample(args, results)
    if "controlnet" in parts:
        bench_controlnet(args, results)
    if "profile" in parts:
        bench_profile(args, results)
    if "unet" in parts:
        bench_unet(args, results)
    flags = f"; XLA_FLAGS={results['xla_flags']}" if results["xla_flags"] else ""
    print(f"{results['command']}  ({results['date_utc']} UTC; {results['machine']}; batch {args.batch}, "
          f"{args.size}x{args.size} px, fp32, {args.repeats} interleaved repeats after a warm-up{flags})")
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
