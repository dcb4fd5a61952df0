"""Several LoRAs at once: a diffusers/PEFT file and a kohya file with conv LoRA (LoCon) keys, different ranks and
alphas, merged by TDDPipeline = diffusers' load_lora_weights(adapter_name=...) + set_adapters(weights) +
fuse_lora on the UNet; which LoRA's metadata sets the sampler defaults; unsupported files are named errors that
change nothing."""

import json
import re

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from tdd_jax import lora_source
from tdd_jax.lora_source import LoRASpec
from tdd_jax.models import lora_formats
from tdd_jax.models.layers import state_key
from tdd_jax.models.loading import read_config
from tdd_jax.models.lora import matches_target
from tdd_jax.models.unet import UNet2DConditionModel
from tdd_jax.pipeline import TDDPipeline
from tiny_pipeline import assert_parity

PEFT = dict(rank=4, alpha=8.0, targets=("to_q", "to_out.0", "ff.net.0.proj", "conv1"))  # scale 2
# kohya as sd-scripts writes SDXL: SGM module names, 3x3 conv LoRA on resnets, alpha per module (scale 0.5).
KOHYA = dict(rank=8, alpha=4.0, targets=("to_v", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                                         "time_emb_proj", "proj_in"))
STRENGTHS = (1.0, 0.8)


def _unet_shapes(pipeline_dir):
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(read_config(pipeline_dir / "unet"), rngs=nnx.Rngs(0)))
    return lora_formats.layer_shapes(unet)


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
    """diffusers' own LoRA layout: unet.<module>.lora_A/B.weight, lora_alpha in lora_adapter_metadata."""
    lora = _random_lora(shapes, PEFT["rank"], PEFT["targets"], 0)
    tensors = {}
    for name, (down, up) in lora.items():
        tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = down, up
    config = {"unet.r": PEFT["rank"], "unet.lora_alpha": PEFT["alpha"], "unet.target_modules": sorted(lora)}
    header = {lora_formats.DIFFUSERS_METADATA_KEY: json.dumps(config), **(metadata or {})}
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
    folder = tmp_path_factory.mktemp("loras")
    shapes = _unet_shapes(tiny_pipeline_dir)
    return peft_file(folder / "tdd.safetensors", shapes), kohya_file(folder / "style.safetensors", shapes)


def _diffusers_fused_unet(pipeline_dir, files):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir, add_watermarker=False)
    for path, name in zip(files, ("tdd", "style")):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(["tdd", "style"], adapter_weights=list(STRENGTHS))
    pipe.fuse_lora(components=["unet"], adapter_names=["tdd", "style"])
    pipe.unload_lora_weights()  # keeps the fused weights
    return {k: v.numpy() for k, v in pipe.unet.state_dict().items()}


def test_stacked_loras_match_diffusers_fuse_lora(tiny_pipeline_dir, files):
    pipe = TDDPipeline.from_pretrained(tiny_pipeline_dir, lora=[LoRASpec(str(p), s) for p, s in zip(files, STRENGTHS)])
    leaves = jax_leaves(pipe.params["unet"])
    base = jax_leaves(pipe.base_params["unet"])
    expected = _diffusers_fused_unet(tiny_pipeline_dir, files)
    assert set(leaves) == set(expected)
    changed = [k for k in expected if np.abs(expected[k] - base[k]).max() > 1e-6]
    both = {f"{name}.weight" for name in _random_lora(_unet_shapes(tiny_pipeline_dir), 1, PEFT["targets"], 0)} & {
        f"{name}.weight" for name in _random_lora(_unet_shapes(tiny_pipeline_dir), 1, KOHYA["targets"], 1)}
    assert both and both <= set(changed)  # conv1: adapted by both LoRAs, the deltas add up
    assert len(changed) > 30
    assert_parity("fused UNet weights, two stacked LoRAs",
                  np.concatenate([leaves[k].ravel() for k in sorted(expected)]),
                  np.concatenate([expected[k].ravel() for k in sorted(expected)]))
    info = pipe.lora_info
    assert [entry["scale"] for entry in info["loras"]] == list(STRENGTHS) and info["settings_from"] is None


def jax_leaves(params):
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {state_key(p): np.asarray(v[...]) for p, v in leaves}
