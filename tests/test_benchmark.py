"""launch/benchmark.py in its quick mode (batch 2, 16 px, 1 repeat) on the one-level tiny pipeline, so the
side-by-side benchmark cannot rot: every part runs and reports positive times and ratios."""

import json

import pytest

from _step_setup import save_step_pipeline


@pytest.fixture(scope="module")
def step_pipeline_dir(tmp_path_factory):
    return save_step_pipeline(tmp_path_factory.mktemp("step_pipeline"))


def test_quick_train_parts(step_pipeline_dir, tmp_path, capsys):
    """The train-step parts alone (the whole benchmark is too slow for the default run): both steps run and are
    profiled, every UNet pass of both sides runs convolutions in its own part, and the table is printed."""
    from launch import benchmark

    results = benchmark.main(["--quick", "--parts", "train,step_profile,flops", "--pipeline", str(step_pipeline_dir)])
    assert results["train"]["ratio"] > 0 and 0 < results["flops"]["fraction_of_peak"]
    for side in ("tdd_jax", "torch_eager"):
        grid = results["step_profile"][side]["grid"]
        assert all(grid[part]["conv"] > 0 for part in ("student forward", "student backward", "teacher", "target"))
    out = capsys.readouterr().out
    assert "| student backward |" in out and "| XLA op | kind | part | ms per step |" in out


@pytest.mark.slow  # 552 s wall before the profile part, 351 s with it (less loaded): over the 60 s budget
def test_quick_benchmark_runs_every_part(step_pipeline_dir, tmp_path, capsys):
    from launch import benchmark

    out = tmp_path / "bench.json"
    parts = "train,step_profile,sample,flops,profile,remat,controlnet"  # the default parts, opt-in remat, controlnet
    results = benchmark.main(["--quick", "--parts", parts, "--pipeline", str(step_pipeline_dir), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    train = results["train"]
    assert set(train["sides"]) == {"tdd_jax", "torch_eager"} and train["ratio"] > 0 and train["xla_flops"] > 0
    assert 0 < results["flops"]["fraction_of_peak"]
    step = results["step_profile"]
    for side in ("tdd_jax", "torch_eager"):
        grid = step[side]["grid"]
        assert all(grid[part]["conv"] > 0 for part in ("student forward", "student backward", "teacher", "target"))
    from tdd_jax.models.layers import REMAT_POLICIES

    assert set(results["remat"]) == set(REMAT_POLICIES) and all(t["median_s"] > 0 for t in results["remat"].values())
    grid = {(r["steps"], r["guidance_scale"], r["lora"]) for r in results["sample"]}
    assert grid == {(4, g, lora) for g in (1.0, 1.7) for lora in (False, True)}
    assert all(r["sides"]["diffusers"]["median_s"] > 0 and r["ratio"] > 0 for r in results["sample"])
    assert [(r["steps"], r["guidance_scale"]) for r in results["controlnet"]] == [(4, 1.0), (4, 1.7)]
    assert all(r["sides"]["diffusers"]["median_s"] > 0 and r["ratio"] > 0 for r in results["controlnet"])
    profile = results["profile"]
    parts = {r["part"]: r for r in profile["rows"]}
    assert all(r["sides"]["tdd_jax"]["median_s"] > 0 for r in profile["rows"] if "overhead" not in r["part"])
    assert any(p.startswith("UNet call, batch 4 (CFG)") for p in parts) and "VAE decode" in parts
    assert all(r["ratio"] > 0 for r in profile["rows"] if r["ratio"] is not None)
    assert profile["ops"] and all(o["sides"]["xla NHWC/HWIO in loop"]["median_s"] > 0 for o in profile["ops"]
                                  if o["kernel"])
    out = capsys.readouterr().out
    assert "| train step (torch_eager) |" in out and "| student backward |" in out and "| op: NHWC input -> out channels |" in out
    assert "| our train step, remat policy | median [min-max] | none / policy |" in out
    assert "| sample 4 steps, CFG 1.7, one ControlNet (diffusers ControlNet TCD) |" in out


def test_quick_unet_part(step_pipeline_dir, capsys):
    """The 'unet' part (the GPU-sized SDXL UNet forward) on the tiny UNet: both sides run, nothing fails."""
    from launch import benchmark

    results = benchmark.main(["--quick", "--parts", "unet", "--pipeline", str(step_pipeline_dir)])
    (row,) = results["unet"]
    assert set(row["sides"]) == {"tdd_jax", "diffusers"} and not row["errors"]
    assert all(t["median_s"] > 0 for t in row["sides"].values())
    assert "| UNet forward, bf16 | side | median [min-max] | diffusers / side |" in capsys.readouterr().out

