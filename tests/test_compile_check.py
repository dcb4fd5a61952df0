"""Ahead-of-time compilation for a TPU topology on this CPU machine (libtpu, the `aot` extra): the TDD step of a
small SDXL-shaped model compiles for 4 TPU v5e chips, and FSDP over the chips divides the weights' memory."""

import builtins
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from _step_setup import one_level_unet_config, step_config
from tiny_pipeline import tiny_clip_configs, tiny_vae_config

from launch import compile_table
from tdd_jax import compile_check
from tdd_jax.models import layers
from tdd_jax.training import sharding
from tdd_jax.training.step import compiled_analysis

try:
    import libtpu  # noqa: F401
    HAVE_LIBTPU = True
except ImportError:
    HAVE_LIBTPU = False

needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu not installed (pip install -e '.[aot]')")


def _configs() -> dict:
    first, second = tiny_clip_configs()
    return {"unet": one_level_unet_config(), "vae": tiny_vae_config(), "text_encoder": first,
            "text_encoder_2": second}


def _check(data: int, fsdp: int, compile: bool = True, attention_impl: str | None = None,
           sampler_batch: int = 0, resolution: int = 16, topology: str = "v5e-4", **overrides) -> dict:
    cfg = step_config(**{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.min_shard_size": 1024,
                         "model.attention_impl": attention_impl, **overrides})
    cfg.resolution = resolution
    if topology != "v5e-4":
        cfg.batch.global_batch = compile_check.TOPOLOGIES[topology].chips
    return compile_check.run(cfg, topology, configs=_configs(), batch_kind="cached", compile=compile,
                             sampler_batch=sampler_batch)


@needs_libtpu
def test_tpu_step_compiles_and_fsdp_splits_the_weights():
    replicated, split = _check(4, 1), _check(1, 4)
    for report in (replicated, split):
        assert report["num_devices"] == 4 and report["settings"]["device_kind"] == "TPU v5 lite"
        step = report["train_step"]
        assert step["fits"] and step["hbm_bytes"] == 16 * 2**30
        assert step["flops"] > 0 and step["roofline_images_per_s"] > 0
        # The TPU compiler's own cost-model time is read and kept beside the FLOP roofline.
        assert step["xla_optimal_s"] > 0 and step["while_loops"] == 0 and step["cost_model_s"] == step["xla_optimal_s"]
        accounting = step["flop_accounting"]
        assert 1.0 <= accounting["ratio"] <= 1.2, accounting  # the program does no more than the TDD step needs
    # Base weights, LoRA and Adam moments are the arguments: 4-way FSDP holds a quarter of the arrays of at least
    # min_shard_size elements; this tiny model's many small ones (norms, biases) stay replicated. Measured:
    # 4,087,296 -> 2,366,976 bytes per chip.
    args = [r["train_step"]["memory"]["argument"] for r in (replicated, split)]
    assert args[1] < 0.7 * args[0], args
    # The README's table is made from these reports.
    table = "\n".join(compile_table.rows([replicated, split]) + compile_table.accounting([split]))
    # The test config departs from configs/tdd_sdxl.py in remat (none), and the row says so.
    assert table.count("| v5e-4 | 4 | 4 x 1 | TDD train step, cached, remat none |") == 1
    assert "| v5e-4 | 4 | 1 x 4 | TDD train step, cached, remat none |" in table
    assert "x** the analytic minimum" in table
    # The paper-run budget: days and chip-hours by the roofline and by the cost model (loop-free here).
    budget = compile_table.budget([split])[2]
    assert budget.startswith("| v5e-4 | 4 | cached, ") and budget.count(" / ") == 3 and "%" in budget, budget
    # The best fitting setting of the two meshes, by the cost model (both have one): the faster one's mesh.
    fastest = min((replicated, split), key=lambda r: compile_check.cost_model_estimate(r["train_step"]))
    mesh = fastest["settings"]["mesh"]
    ranked, = compile_table.best([replicated, split])[2:]
    assert ranked.startswith("| v5e-4 | cached | ") and "| cost model (of 2 fitting) |" in ranked, ranked
    assert f"mesh {mesh['data']}x{mesh['fsdp']}," in ranked, ranked
    # A report without a cost model (older than the check's reading of it) is not ranked against those with one,
    # even where its roofline is faster.
    unpriced = {**fastest, "train_step": {**fastest["train_step"], "xla_optimal_s": None,
                                          "roofline_images_per_s": 1e9}}
    slower = max((replicated, split), key=lambda r: compile_check.cost_model_estimate(r["train_step"]))
    ranked, = compile_table.best([unpriced, slower])[2:]
    assert "| cost model (of 1 fitting; 1 more without a cost model) |" in ranked, ranked
    slow_mesh = slower["settings"]["mesh"]
    assert f"mesh {slow_mesh['data']}x{slow_mesh['fsdp']}," in ranked, ranked
    # --compile=false: the same FLOP accounting from tracing alone, and no memory claimed.
    counted_only = _check(1, 4, compile=False)["train_step"]
    assert "memory" not in counted_only and "fits" not in counted_only
    assert counted_only["flop_accounting"] == split["train_step"]["flop_accounting"]


@needs_libtpu
def test_windowed_einsums_off_on_a_long_fsdp_axis():
    """On 16 v5e chips (FSDP over 16, one image each) the TPU compiler turns the FSDP all-gathers into windowed
    einsums: while loops of collective permutes, whose temporaries the tiny step's show (and SDXL's, docs/tpu.md).
    ``mesh.windowed_einsum=False`` compiles the plain all-gathers instead: no loop, fewer temporaries."""
    default, plain = (_check(1, -1, topology="v5e-16", **{"mesh.windowed_einsum": on}) for on in (True, False))
    steps = default["train_step"], plain["train_step"]
    assert steps[0]["while_loops"] > 0 and steps[1]["while_loops"] == 0, [s["while_loops"] for s in steps]
    assert steps[1]["memory"]["temp"] < steps[0]["memory"]["temp"], [s["memory"] for s in steps]
    assert plain["settings"]["windowed_einsum"] is False
    assert ", no windowed einsum |" in compile_table.budget([plain])[2]


@needs_libtpu
def test_a_step_over_the_hbm_is_reported_as_not_fitting():
    """At 1024² the tiny UNet's self-attention alone needs far more than v5e's 16 GiB: the TPU compiler refuses
    the program, and the check says so in its report and tables instead of failing."""
    report = _check(1, 4, resolution=1024)
    step = report["train_step"]
    assert step["fits"] is False and "memory" not in step and "RESOURCE_EXHAUSTED" in step["out_of_memory"]
    assert step["temp_available"] < 16 * 2**30 < step["temp_required"], step
    assert step["flops"] > 0  # the FLOP accounting needs no compiled program
    assert "(does not fit)" in compile_table.rows([report])[2]
    assert "| no |" in compile_table.budget([report])[2]
    assert "none of the 1 compiled settings fits" in compile_table.best([report])[2]
    assert "DOES NOT FIT" in compile_check.format_report(report)


@needs_libtpu
def test_splash_compiles_the_mosaic_kernel_under_fsdp():
    """model.attention_impl='splash' on 4 v5e chips with FSDP: XLA cannot partition a Mosaic kernel, so it runs in a
    shard_map over the batch and compiles as one (tpu_custom_call), in the step and in the sampler; its FLOPs are
    counted with the XLA attention in its place, so they equal the default config's (counted without compiling),
    and the compiler's cost model figure is not used as a time (``test_cost_model_does_not_price_splash_work``)."""
    splash = _check(1, 4, attention_impl="splash", sampler_batch=4)
    xla = _check(1, 4, compile=False, sampler_batch=4)
    for part in ("train_step", "sampler"):
        assert splash[part]["mosaic_kernels"] > 0 and splash[part]["fits"], part
        # The host memory between lowering and compiling: this process's, so at least the hundreds of MB that
        # JAX and libtpu take (0.6 GiB in the SDXL check's own process).
        assert 0.2 < splash[part]["host_lowered_gib"], splash[part]
        assert "host_lowered_gib" not in xla[part]  # not compiled, so no lowering either
        assert splash[part]["flops"] == xla[part]["flops"] and splash[part]["roofline_s"] == xla[part]["roofline_s"]
    # One-level UNet: 4 transformer blocks x (self + cross) attention; the step runs it 3 times forward (teacher's
    # 2B call, target, student) and once backward (dq and dkv kernels): 8 x (3 + 2) calls.
    step = splash["train_step"]
    assert step["mosaic_kernels"] == 40
    assert step["flop_accounting"] == xla["train_step"]["flop_accounting"]
    assert step["xla_optimal_s"] > 0 and "cost_model_s" not in step and step["while_loops"] == 0
    assert "40 Pallas TPU kernel calls" in compile_check.format_report(splash)
    assert "host memory when lowered, before the compiler:" in compile_check.format_report(splash)
    assert "does not price the Pallas kernels' work" in compile_check.format_report(splash)


@needs_libtpu
def test_cost_model_does_not_price_splash_work():
    """Why a program with Pallas kernels gets no cost-model time: one attention call (SDXL's 10 x 64 heads, 2
    images) at 4x the tokens is 16x the work. The TPU compiler prices XLA's attention accordingly (measured on
    v5p: 98 -> 1,250 us) but the splash kernel by its length (51 -> 205 us; at 16,384 tokens 464 us, where its
    FLOPs need 3.1 ms at v5p's peak)."""
    devices, _, _ = compile_check.topology_devices("v5p-8")
    mesh = jax.sharding.Mesh(devices[:1], ("x",))
    shape = {t: jax.ShapeDtypeStruct((2, t, 640), jnp.bfloat16, sharding=jax.sharding.NamedSharding(mesh, P()))
             for t in (1024, 4096)}

    def price(impl, tokens):
        fn = sharding.traced_on(mesh, lambda q, k, v: layers.attention(q, k, v, heads=10, impl=impl))
        with jax.default_matmul_precision("default"):  # bf16 in, as in the SDXL step (conftest asks fp32 passes)
            analysis = compiled_analysis(jax.jit(fn).lower(*[shape[tokens]] * 3).compile())
        assert analysis["mosaic_kernels"] == (impl == "splash") and analysis["unpriced_ops"] == 0
        return analysis["optimal_seconds"]

    growth = {impl: price(impl, 4096) / price(impl, 1024) for impl in ("xla", "splash")}
    assert growth["xla"] > 8 and growth["splash"] < 6, growth
    assert compile_check.cost_model_estimate({"xla_optimal_s": 0.1, "mosaic_kernels": 3, "while_loops": 0}) is None


def test_missing_libtpu_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_libtpu(name, *args, **kwargs):
        if name == "libtpu":
            raise ImportError("No module named 'libtpu'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_libtpu)
    with pytest.raises(compile_check.MissingLibTPU, match=r"\.\[aot\]"):
        compile_check.topology_devices("v5e-8")


def test_every_named_topology_gives_one_device_a_chip_and_a_mesh():
    """v4's default chip config exposes each TensorCore as a device, which JAX's meshes refuse on TPU > v3; the
    check asks for megacore there, as Cloud TPU runs v4."""
    for name, topo in compile_check.TOPOLOGIES.items():
        devices, hbm, peak = compile_check.topology_devices(name)
        assert len(devices) == topo.chips and (hbm, peak) == (topo.hbm_bytes, topo.peak_flops), name
        assert sharding.make_mesh(1, -1, devices).devices.size == topo.chips, name


def test_unknown_topology_lists_the_known_ones():
    with pytest.raises(ValueError, match="v5p-8"):
        compile_check.topology_devices("v9-8")


def test_cost_model_estimate_counts_loop_bodies_and_drops_unpriced_programs():
    estimate = compile_check.cost_model_estimate
    assert estimate({"xla_optimal_s": 0.01, "while_loops": 0, "flops": 10.0, "xla_flops": 10.5}) == 0.01
    # XLA priced the loop bodies once: its FLOPs are a fifth of the counted ones, so is its time.
    assert estimate({"xla_optimal_s": 0.01, "while_loops": 2, "flops": 10.0, "xla_flops": 2.0}) == 0.05
    assert estimate({"xla_optimal_s": -0.9997, "while_loops": 1, "flops": 1.0, "xla_flops": 1.0}) is None
    # -1 s booked for each unpriced op is added back: 2 ops, 3 ms of priced work.
    assert abs(estimate({"xla_optimal_s": -1.997, "unpriced_ops": 2, "while_loops": 0, "flops": 1.0,
                         "xla_flops": 1.0}) - 0.003) < 1e-12
    assert estimate({"xla_optimal_s": -1.997, "unpriced_ops": 1, "while_loops": 0, "flops": 1.0,
                     "xla_flops": 1.0}) is None
    assert estimate({"xla_optimal_s": None, "while_loops": 0, "flops": 1.0, "xla_flops": 1.0}) is None
    # The table shows the estimate with the raw figure and the loop scale it was made of.
    part = {"xla_optimal_s": -1.99, "unpriced_ops": 2, "while_loops": 2, "flops": 10.0, "xla_flops": 2.0, "images": 4}
    assert compile_table._cost_model(part) == "50 ms (10 x 5.00) | 80.0"


def _blocks(x, weights, scan: bool):
    """A stack of pre-norm transformer blocks (attention + GELU MLP), scanned over its weights or unrolled."""
    length, width = x.shape

    def block(x, w):
        wq, wk, wv, wo, w1, w2 = w
        h = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)
        q, k, v = ((h @ m).reshape(length, -1, 64) for m in (wq, wk, wv))
        a = jax.nn.softmax(jnp.einsum("qhd,khd->hqk", q, k).astype(jnp.float32) / 8.0).astype(x.dtype)
        x = x + jnp.einsum("hqk,khd->qhd", a, v).reshape(length, width) @ wo
        return x + jax.nn.gelu(x @ w1) @ w2

    if scan:
        return jax.lax.scan(lambda y, w: (block(y, w), None), x, weights)[0]
    for i in range(weights[0].shape[0]):
        x = block(x, tuple(w[i] for w in weights))
    return x


@needs_libtpu
def test_cost_model_estimate_of_a_scanned_stack_matches_the_unrolled_program():
    """The TPU cost model books -1 s per unpriced op (here dozens of ConcatBitcasts in the unrolled program) and
    prices a loop body once; with both corrected, the scanned gradient's estimate agrees with the unrolled one's own
    figure (measured 2026-12-06: +9% at 10 blocks; the forward alone: -7%)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from tdd_jax.flops import function_flops
    from tdd_jax.training.step import compiled_analysis

    devices, _, _ = compile_check.topology_devices("v5e-4")
    rep = NamedSharding(Mesh(np.array(devices[:1]), ("d",)), PartitionSpec())
    width, length, depth = 1280, 1024, 10  # an SDXL-sized stack: at 640 x 512 x 6 the forward lands at -25%
    shapes = [(depth, width, width)] * 4 + [(depth, width, 4 * width), (depth, 4 * width, width)]
    args = (jax.ShapeDtypeStruct((length, width), jnp.bfloat16, sharding=rep),
            tuple(jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=rep) for s in shapes))
    estimates = {}
    for scan in (True, False):
        def fn(x, w, scan=scan):
            return jax.grad(lambda x: jnp.sum(_blocks(x, w, scan).astype(jnp.float32)))(x)
        analysis = compiled_analysis(jax.jit(fn).lower(*args).compile())
        assert (analysis["while_loops"] > 0) == scan
        if not scan:
            assert analysis["unpriced_ops"] > 0 and analysis["optimal_seconds"] < 0, analysis
        estimates[scan] = compile_check.cost_model_estimate(
            {"xla_optimal_s": analysis["optimal_seconds"], "unpriced_ops": analysis["unpriced_ops"],
             "while_loops": analysis["while_loops"], "xla_flops": analysis["flops"],
             "flops": function_flops(fn, *args)})
    assert estimates[False] is not None and 0.8 < estimates[True] / estimates[False] < 1.25, estimates


def test_host_memory_peak_sees_an_allocation_the_process_has_freed():
    """The sampled peak (RSS + swap) catches memory held only for a moment, and the table shows it beside RSS."""
    # Compared with the memory measured while the array is held, not before it: earlier tests' buffers may be freed
    # meanwhile, so "before + 64 MiB" need not ever be reached.
    with compile_check.HostMemoryPeak(interval_s=0.01) as peak:
        held = np.ones(64 * 2**20, np.uint8)  # 64 MiB, touched; above glibc's mmap threshold, so freed at del
        time.sleep(0.2)
        holding = compile_check.HostMemoryPeak.current_bytes()
        del held
        released = compile_check.HostMemoryPeak.current_bytes()
    assert released < holding - 60 * 2**20, (holding, released)  # the 64 MiB really left the process
    assert peak.peak_bytes >= holding - 16 * 2**20, (peak.peak_bytes, holding)  # and the sampling thread saw it
    report = {"host_peak_rss_gib": 23.04, "host_peak_rss_swap_gib": peak.peak_bytes / compile_check.GiB}
    assert compile_table._host_peak(report) == f"23.0 ({peak.peak_bytes / compile_check.GiB:.1f})"
    assert compile_table._host_peak({"host_peak_rss_gib": 23.04}) == "23.0"
    lowered = {**report, "train_step": {"host_lowered_gib": 3.14}, "sampler": {"host_lowered_gib": 5.0}}
    assert compile_table._host_peak(lowered) == f"23.0 ({peak.peak_bytes / compile_check.GiB:.1f}; lowered 3.1)"


def test_table_rows_name_the_settings_that_depart_from_the_config():
    """Two compiles of one topology that differ in remat or weight dtype get different program labels."""
    default = {"remat": "full", "param_dtype": "float32", "attention_impl": None, "windowed_einsum": True}
    assert compile_table._departures({"settings": default}) == ""
    changed = {**default, "remat": "dots", "param_dtype": "bfloat16", "windowed_einsum": False}
    assert compile_table._departures({"settings": changed}) == ", remat dots, weights bfloat16, no windowed einsum"
    # The sampler has no backward pass: remat does not change it, the rest does.
    sampler = ", weights bfloat16, no windowed einsum"
    assert compile_table._departures({"settings": changed}, sampler=True) == sampler
    # The LoRA's sharding changes only the train step; libtpu flags (LIBTPU_INIT_ARGS, which the check records)
    # change both programs.
    flagged = {"settings": {**default, "lora_sharding": "replicated"},
               "libtpu_init_args": "--xla_tpu_enable_latency_hiding_scheduler=false"}
    libtpu = ", libtpu `--xla_tpu_enable_latency_hiding_scheduler=false`"
    assert compile_table._departures(flagged) == ", LoRA replicated" + libtpu
    assert compile_table._departures(flagged, sampler=True) == libtpu
    assert compile_table._setting({**flagged, "settings": {**flagged["settings"], "micro_batch_per_device": 1,
                                                           "mesh": {"data": 1, "fsdp": 4}}}).endswith(libtpu)
    args = ["--topology=v5p-8", "--json=out.json"]
    assert compile_check.command_fields(args, {}) == {
        "command": "python -m tdd_jax.compile_check --topology=v5p-8 --json=out.json"}
    flags = flagged["libtpu_init_args"]
    assert compile_check.command_fields(args, {"LIBTPU_INIT_ARGS": flags}) == {
        "command": f"LIBTPU_INIT_ARGS={flags} python -m tdd_jax.compile_check --topology=v5p-8 --json=out.json",
        "libtpu_init_args": flags}
