"""Several LoRAs at once: a diffusers/PEFT file and a kohya file with conv LoRA (LoCon) keys, different ranks and
alphas, merged by TDDPipeline = diffusers' load_lora_weights(adapter_name=...) + set_adapters(weights) +
fuse_lora on the UNet; which LoRA's metadata sets the sampler defaults; unsupported files are named errors that
change nothing."""

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from convert import fuse_unet
from tdd_jax import sample
from tdd_jax.lora_source import LoRASpec
from tdd_jax.models import lora_formats
from tdd_jax.models.layers import state_key
from tdd_jax.models.loading import read_config
from tdd_jax.models.lora import matches_target
from tdd_jax.models.unet import UNet2DConditionModel
from tdd_jax.pipeline import TDDPipeline
from tiny_pipeline import assert_parity, tiny_sd15_unet_config

PEFT = dict(rank=4, alpha=8.0, targets=("to_q", "to_out.0", "ff.net.0.proj", "conv1"))  # scale 2
# kohya as sd-scripts writes SDXL: SGM module names, 3x3 conv LoRA on resnets, alpha per module (scale 0.5).
KOHYA = dict(rank=8, alpha=4.0, targets=("to_v", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                                         "time_emb_proj", "proj_in"))
STRENGTHS = (1.0, 0.8)
DISTILLED = {"method": "tdd", "solver_steps": 50, "w_min": 3.0, "w_max": 7.0, "guidance_mode": "decoupled"}


def unet_shapes(config):
    return lora_formats.layer_shapes(nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0))))


def _random_lora(shapes, rank, targets, seed):
    rng = np.random.default_rng(seed)
    lora = {}
    for name, shape in shapes.items():
        if matches_target(name, targets):
            up = (shape[0], rank) + (1, 1) * (len(shape) == 4)
            lora[name] = (0.1 * rng.standard_normal((rank, *shape[1:]), np.float32),
                          0.1 * rng.standard_normal(up, np.float32))
    return lora


def peft_file(path, shapes, metadata=None):
    """diffusers' own LoRA layout: unet.<module>.lora_A/B.weight, lora_alpha in lora_adapter_metadata; header
    ``metadata`` as the trainer's export writes it (JSON values)."""
    lora = _random_lora(shapes, PEFT["rank"], PEFT["targets"], 0)
    tensors = {}
    for name, (down, up) in lora.items():
        tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = down, up
    config = {"unet.r": PEFT["rank"], "unet.lora_alpha": PEFT["alpha"], "unet.target_modules": sorted(lora)}
    header = {lora_formats.DIFFUSERS_METADATA_KEY: json.dumps(config),
              **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, str(path), metadata=header)
    return path


def kohya_file(path, shapes):
    lora = _random_lora(shapes, KOHYA["rank"], KOHYA["targets"], 1)
    sgm = lora_formats.sgm_unet_names(shapes)
    assert any(len(shapes[name]) == 4 and shapes[name][2] == 3 for name in lora)  # 3x3 conv LoRA present
    tensors = {}
    for name, (down, up) in lora.items():
        key = "lora_unet_" + sgm[name].replace(".", "_")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        tensors[f"{key}.alpha"] = np.asarray(KOHYA["alpha"], np.float32)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(KOHYA["rank"])})
    return path


@pytest.fixture(scope="module")
def files(tiny_pipeline_dir, tmp_path_factory):
    """(distillation LoRA in diffusers/PEFT format with the trainer's metadata, style LoRA in kohya format)."""
    folder = tmp_path_factory.mktemp("loras")
    shapes = unet_shapes(read_config(tiny_pipeline_dir / "unet"))
    return (peft_file(folder / "tdd.safetensors", shapes, DISTILLED),
            kohya_file(folder / "style.safetensors", shapes))


@pytest.fixture(scope="module")
def diffusers_fused(tiny_pipeline_dir, files):
    """diffusers' UNet weights with both LoRAs fused at STRENGTHS."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir, add_watermarker=False)
    for path, name in zip(files, ("tdd", "style")):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(["tdd", "style"], adapter_weights=list(STRENGTHS))
    pipe.fuse_lora(components=["unet"], adapter_names=["tdd", "style"])
    pipe.unload_lora_weights()  # keeps the fused weights
    return {k: v.numpy() for k, v in pipe.unet.state_dict().items()}


def _leaves(params):
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {state_key(p): np.asarray(v[...]) for p, v in leaves}


def _flat(weights, keys):
    return np.concatenate([weights[k].ravel() for k in keys])


def test_stacked_loras_match_diffusers_fuse_lora(tiny_pipeline_dir, files, diffusers_fused):
    pipe = TDDPipeline.from_pretrained(tiny_pipeline_dir, lora=[LoRASpec(str(p), s) for p, s in zip(files, STRENGTHS)])
    ours, base = _leaves(pipe.params["unet"]), _leaves(pipe.base_params["unet"])
    assert set(ours) == set(diffusers_fused)
    changed = {k for k in diffusers_fused if np.abs(diffusers_fused[k] - base[k]).max() > 1e-3}
    assert {"down_blocks.0.resnets.0.conv1.weight", "up_blocks.1.resnets.2.conv1.weight"} <= changed  # both LoRAs
    assert len(changed) > 30
    keys = sorted(diffusers_fused)
    assert_parity("fused UNet weights, two stacked LoRAs", _flat(ours, keys), _flat(diffusers_fused, keys))
    info = pipe.lora_info
    assert [entry["scale"] for entry in info["loras"]] == list(STRENGTHS)
    assert info["settings_from"] == 0 and info["solver_steps"] == 50 and info["w_max"] == 7.0
    # New strengths re-merge from the kept base weights; 0 gives the base back exactly.
    pipe.set_lora_scales([0.0, 0.0])
    for key, value in _leaves(pipe.params["unet"]).items():
        np.testing.assert_array_equal(value, base[key], err_msg=key)
    pipe.set_lora_scales(STRENGTHS)
    assert_parity("re-merged", _flat(_leaves(pipe.params["unet"]), keys), _flat(diffusers_fused, keys))


def test_fuse_unet_takes_several_loras(tiny_pipeline_dir, files, diffusers_fused, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "fused"
    fuse_unet.main(["--base", str(tiny_pipeline_dir), "--lora", f"{files[1]}:{STRENGTHS[1]}", "--lora", str(files[0]),
                    "--out", str(out)])
    with safe_open(str(out / fuse_unet.WEIGHTS), framework="numpy") as f:
        fused = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata()
    keys = sorted(diffusers_fused)
    assert_parity("convert.fuse_unet, two LoRAs", _flat(fused, keys), _flat(diffusers_fused, keys))
    assert json.loads(header["solver_steps"]) == 50  # the distillation LoRA's metadata, not the style LoRA's
    assert json.loads(header["fused_lora"]) == [[str(files[1]), STRENGTHS[1]], [str(files[0]), 1.0]]


def _job(pipeline_dir, tmp_path, loras, **fields):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    return sample.SampleJob(pipeline=str(pipeline_dir), prompts=str(prompts), out=str(tmp_path / "out"),
                            lora=tuple(loras), **fields)


def test_sampler_defaults_come_from_the_distillation_lora(tiny_pipeline_dir, files, tmp_path):
    tdd, style = map(str, files)
    auto = frozenset({"grid_steps", "w_prime"})
    for loras, index in (([tdd, f"{style}:0.8"], 0), ([f"{style}:0.8", tdd], 1)):
        plan = sample.prepare(_job(tiny_pipeline_dir, tmp_path, loras, from_lora=auto))
        assert (plan.settings.grid_steps, plan.settings.w_prime) == (50, 5.0)
        assert plan.sources["grid_steps"] == "the LoRA's metadata (solver_steps=50)"
        assert plan.records[0]["lora"][1 - index][1] == 0.8 and plan.records[0]["lora_trained"]["w_max"] == 7.0
    # Two distillation LoRAs that disagree: an error naming both, unless --lora_settings_from says which.
    other = peft_file(tmp_path / "tdd_100.safetensors", unet_shapes(read_config(tiny_pipeline_dir / "unet")),
                      {**DISTILLED, "solver_steps": 100})
    with pytest.raises(ValueError, match=rf"{re.escape(tdd)} \(index 0\) and {re.escape(str(other))} \(index 1\) "
                                         r".*solver_steps=50 vs 100.*--lora_settings_from"):
        sample.prepare(_job(tiny_pipeline_dir, tmp_path, [tdd, str(other)]))
    plan = sample.prepare(_job(tiny_pipeline_dir, tmp_path, [tdd, str(other)], lora_settings_from=1))
    assert plan.settings.grid_steps == 100
    assert sample.prepare(_job(tiny_pipeline_dir, tmp_path, [tdd, tdd])).settings.grid_steps == 50  # they agree
    with pytest.raises(ValueError, match="lora_settings_from=2 is not the index of one of the 2 LoRAs"):
        sample.prepare(_job(tiny_pipeline_dir, tmp_path, [tdd, style], lora_settings_from=2))


def unsupported_files(folder, pipeline_dir):
    """{what: (file, words its error must hold)} for LoRA files we do not support."""
    module = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    rng = np.random.default_rng(2)
    loha = {f"{module}.{k}": rng.standard_normal((4, 64), np.float32)
            for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    lokr = {f"{module}.lokr_w1": rng.standard_normal((8, 8), np.float32),
            f"{module}.lokr_w2": rng.standard_normal((8, 8), np.float32)}
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    te_only = {f"{te}.lora_down.weight": rng.standard_normal((4, 32), np.float32),
               f"{te}.lora_up.weight": rng.standard_normal((32, 4), np.float32)}
    out = {}
    for name, tensors, words in (("loha", loha, "holds LoHa weights"), ("lokr", lokr, "holds LoKr weights"),
                                 ("te_only", te_only, "text-encoder-only LoRAs are not supported")):
        save_file(tensors, str(folder / f"{name}.safetensors"))
        out[name] = (folder / f"{name}.safetensors", words)
    peft_file(folder / "sd15.safetensors", unet_shapes(tiny_sd15_unet_config()))  # same targets, SD1.5 layout
    out["sd15"] = (folder / "sd15.safetensors", "another architecture")
    return out


def test_unsupported_loras_are_named_errors_that_change_nothing(tiny_pipeline_dir, files, tmp_path):
    for name, (path, words) in unsupported_files(tmp_path, tiny_pipeline_dir).items():
        pattern = rf"{re.escape(str(path))}: .*{words}"
        with pytest.raises(lora_formats.LoRAFormatError, match=pattern) as error:
            TDDPipeline.from_pretrained(tiny_pipeline_dir, lora=[files[0], path])
        out = tmp_path / f"fused_{name}"
        with pytest.raises(lora_formats.LoRAFormatError, match=pattern):
            fuse_unet.fuse(tiny_pipeline_dir, [files[0], path], out)
        assert not out.exists()
        print(f"{name}: {error.value}")
    job = _job(tiny_pipeline_dir, tmp_path, [str(files[0]), str(tmp_path / "loha.safetensors")])
    with pytest.raises(sample.JobError, match="holds LoHa weights"):
        sample.run(job)
    assert not (tmp_path / "out").exists()
