"""Trainer config files and ``validate``: every shipped config is valid, and each kind of mistake is rejected
before anything is loaded, with the offending field named first in the message."""

import importlib
import math

import pytest
from absl import flags
from ml_collections import config_flags

from configs.methods import METHODS
from tdd_jax.training.config import ConfigError, validate
from tdd_jax.training.step import make_optimizer


def load_config(spec: str):
    """A config as ``--config=configs/NAME.py:ARG`` gives it (``spec`` = 'NAME' or 'NAME:ARG')."""
    name, _, arg = spec.partition(":")
    return importlib.import_module(f"configs.{name}").get_config(arg or None)


@pytest.fixture
def cfg(tiny_pipeline_dir):
    """The SDXL defaults pointed at the tiny pipeline and a data path, on 8 devices."""
    cfg = load_config("tdd_sdxl")
    cfg.pipeline_dir = str(tiny_pipeline_dir)
    cfg.data.path = "/data/shards/{0000..0009}.tar"
    return cfg


@pytest.mark.parametrize("name", [f"{scale}:{method}" for scale in ("tdd_sdxl", "tdd_tiny") for method in METHODS])
def test_shipped_configs_are_valid(name):
    cfg = load_config(name)
    cfg.data.path = cfg.data.path or "/data/shards/{0000..0009}.tar"
    validate(cfg, num_devices=8, process_count=2, check_pipeline=False)


def test_paper_defaults():
    cfg = load_config("tdd_sdxl")
    assert (cfg.resolution, cfg.lora.rank, cfg.solver.num_steps) == (1024, 64, 250)
    assert (cfg.target.kind, cfg.target.k_min, cfg.target.k_max, cfg.target.eta) == ("tdd", 4, 8, 0.3)
    assert (cfg.guidance.w_min, cfg.guidance.w_max, cfg.guidance.rho) == (3.5, 3.5, 0.2)
    assert (cfg.loss.kind, cfg.loss.huber_c, cfg.optim.lr, cfg.optim.grad_clip) == ("huber", 0.001, 1e-6, 1.0)
    assert (cfg.batch.global_batch, cfg.model.dtype, cfg.model.remat, cfg.ema_decay) == (512, "bfloat16", "full", 0.0)
    assert (cfg.mesh.fsdp, cfg.mesh.lora_sharding) == (-1, "fsdp")  # base and LoRA state split over every device


@pytest.mark.parametrize("scale", ["tdd_sdxl", "tdd_tiny"])
def test_baselines_differ_only_in_target_rule_and_published_settings(scale):
    base = load_config(scale).to_dict()
    allowed = {"target", "solver", "guidance", "validation"}
    for method in ("lcm", "pcm", "tcd"):  # the same-budget baselines
        other = load_config(f"{scale}:{method}").to_dict()
        assert {k for k in base if base[k] != other[k]} <= allowed, method
        assert other["target"]["kind"] == method
    assert load_config(f"{scale}:tdd").to_dict() == base
    # The adversarial variants add only the adversarial term (and on SDXL the official adversarial run's rate).
    for method, plain in (("tdd_adv", "tdd"), ("pcm_adv", "pcm")):
        adv, ref = load_config(f"{scale}:{method}").to_dict(), load_config(f"{scale}:{plain}").to_dict()
        assert adv["adv"]["enabled"] and not ref["adv"]["enabled"]
        assert {k for k in ref if ref[k] != adv[k]} <= {"adv", "optim"}, method
        assert {k for k in ref["optim"] if ref["optim"][k] != adv["optim"][k]} <= {"lr"}, method
    # The published recipes: their method's target rule, their own w range and rate.
    for method, kind, w, lr in (("lcm_paper", "lcm", (3.0, 15.0), 1e-4), ("pcm_paper", "pcm", (6.0, 7.0), 2e-6),
                                ("tcd_paper", "tcd", (2.0, 14.0), 4.5e-6)):
        paper = load_config(f"{scale}:{method}")
        assert paper.target.kind == kind and (paper.guidance.w_min, paper.guidance.w_max) == w, method
        assert paper.optim.lr == lr and paper.optim.schedule == "constant", method
        assert paper.adv.enabled == (kind == "pcm"), method
    assert load_config(f"{scale}:tcd_paper").optim.weight_decay == 0.01
    assert load_config(f"{scale}:tcd_paper").batch.global_batch == (256 if scale == "tdd_sdxl" else 16)


def test_config_flag_argument_selects_the_method():
    """``--config=configs/tdd_tiny.py:pcm`` as the trainer's absl flag parses it, and a bad argument is named."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    values(["prog", "--config=configs/tdd_tiny.py:pcm"])
    assert (values.config.target.kind, values.config.resolution) == ("pcm", 64)
    assert values.config.solver.num_steps == 40  # PCM's own grid, under the tiny cap of 50
    with pytest.raises(ValueError, match="unknown config argument 'adv2'"):
        load_config("tdd_sdxl:adv2")


def test_valid_with_pipeline(cfg):
    validate(cfg, num_devices=8, process_count=1)


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.target.update(k_min=9), "target.k_min"),
    (lambda c: c.target.update(kind="ctm"), "target.kind"),
    (lambda c: c.target.update(eta=1.5), "target.eta"),
    (lambda c: c.guidance.update(mode="paper"), "guidance.mode"),
    (lambda c: c.guidance.update(w_min=8.0), "guidance.w_min"),
    (lambda c: c.loss.update(kind="l1"), "loss.kind"),
    (lambda c: c.optim.update(schedule="warmup"), "optim.warmup_steps"),
    (lambda c: c.model.update(dtype="float8"), "model.dtype"),
    (lambda c: c.model.update(remat="yes"), "model.remat"),
    (lambda c: c.batch.update(global_batch=500), "batch.global_batch"),
    (lambda c: c.batch.update(grad_accum=3), "batch.global_batch"),
    (lambda c: c.mesh.update(data=3, fsdp=1), "mesh.data"),
    (lambda c: c.mesh.update(data=3), "mesh.fsdp"),
    (lambda c: c.mesh.update(data=-1, fsdp=-1), "mesh.data"),
    (lambda c: c.mesh.update(lora_sharding="zero3"), "mesh.lora_sharding"),
    (lambda c: c.lora.update(rank=0), "lora.rank"),
    (lambda c: c.lora.update(rnak=4), "lora.rnak"),
    (lambda c: c.update(ema_decay=1.0), "ema_decay"),
    (lambda c: c.update(pipeline_dir="/nonexistent/sdxl"), "pipeline_dir"),
    (lambda c: c.update(pipeline_dir=""), "pipeline_dir"),
    (lambda c: c.data.update(path=""), "data.path"),
    (lambda c: c.data.update(source="s3"), "data.source"),
    (lambda c: c.adv.update(head_groups=0), "adv.head_groups"),
    (lambda c: c.adv.update(enabled=True, head_groups=3), "adv.head_groups"),  # the tiny UNet's widths: 32, 64
])
def test_bad_field_is_named(cfg, mutate, field):
    mutate(cfg)
    with pytest.raises(ConfigError) as e:
        validate(cfg, num_devices=8, process_count=1)
    assert str(e.value).startswith(field), str(e.value)


def test_missing_pipeline_component_is_named(cfg, tmp_path):
    import shutil

    broken = tmp_path / "pipe"
    shutil.copytree(cfg.pipeline_dir, broken)
    shutil.rmtree(broken / "vae")
    cfg.pipeline_dir = str(broken)
    with pytest.raises(ConfigError, match=r"^pipeline_dir: .*vae/config.json"):
        validate(cfg, num_devices=8, process_count=1)


def test_resolution_reference_follows_override():
    cfg = load_config("tdd_tiny")
    cfg.resolution = 32
    assert cfg.data.resolution == 32
    cfg.batch.global_batch = 64
    assert cfg.data.batch_size == 64


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 0, {0: 1.0, 5: 1.0, 10: 1.0}),
    ("warmup", 4, {0: 0.0, 2: 0.5, 4: 1.0, 10: 1.0}),
    # linear warm-up over 2 steps, then half a cosine period down to 0 at num_train_steps = 10
    ("cosine", 2, {0: 0.0, 1: 0.5, 2: 1.0, 6: 0.5, 4: 0.5 * (1 + math.cos(math.pi / 4)), 10: 0.0}),
    ("cosine", 0, {0: 1.0, 5: 0.5, 10: 0.0}),
])
def test_learning_rate_schedules(schedule, warmup, expected):
    cfg = load_config("tdd_sdxl")
    cfg.optim.update(lr=1.0, schedule=schedule, warmup_steps=warmup)
    _, lr = make_optimizer(cfg.optim, num_train_steps=10)
    for step, value in expected.items():
        assert float(lr(step)) == pytest.approx(value, abs=1e-6), (schedule, step)
