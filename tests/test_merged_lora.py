"""Merged LoRA in TDDPipeline: sampling on W + s·B·A gives the images of the unfused LoRA branches, the base
weights come back bit-exactly, and a new scale re-merges (without recompiling)."""

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from tdd_jax import conditioning
from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.diffusion.schedule import NoiseSchedule
from tdd_jax.models import lora_formats
from tdd_jax.models.layers import state_key
from tdd_jax.models.lora import lora_modules
from tdd_jax.pipeline import MODELS, ImageGeometry, TDDPipeline, load_lora
from tdd_jax.training import sharding

PROMPTS = ["a photo of a cat", "a red car on the street"]
NEGATIVES = [None, "blurry"]
SETTINGS = SamplerSettings(num_steps=4, gamma=0.2, guidance_scale=1.7)
TARGETS = {"unet": ("to_q", "to_out.0", "conv1", "conv_shortcut", "downsamplers.0.conv", "time_emb_proj"),
           "text_encoder": ("q_proj", "fc1")}
SCALE = 0.7


@pytest.fixture(scope="module")
def lora_file(tiny_pipeline_dir, tmp_path_factory):
    """A random rank-4 LoRA in diffusers keys on UNet Linear/Conv layers (3x3, strided, 1x1) and text encoder
    1, with alpha != rank (scale 0.5) so alpha / rank has to be honoured."""
    base = TDDPipeline.from_pretrained(tiny_pipeline_dir)
    rng = np.random.default_rng(0)
    tensors = {}
    for component, targets in TARGETS.items():
        model = nnx.merge(base._graphdefs[component], base.base_params[component])
        for path, mod in lora_modules(model, targets):
            shape = lora_formats.layer_shapes(model)[path]
            up = (shape[0], 4) + (1, 1) * (len(shape) == 4)
            tensors[f"{component}.{path}.lora_A.weight"] = 0.2 * rng.standard_normal((4, *shape[1:]), np.float32)
            tensors[f"{component}.{path}.lora_B.weight"] = 0.2 * rng.standard_normal(up, np.float32)
            tensors[f"{component}.{path}.alpha"] = np.asarray(2.0, np.float32)
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    save_file(tensors, str(path))
    return path


def _unfused(pipeline_dir, lora, scale):
    """The reference: models carrying the LoRA branches (computed per call), alpha / rank multiplied by scale."""
    mesh = sharding.make_mesh(data=-1, fsdp=1)
    models = {name: cls.from_pretrained(pipeline_dir / name, shardings=sharding.replicated(mesh))
              for name, cls in MODELS.items()}
    load_lora(lora, models)
    graphdefs, params = {}, {}
    for name, model in models.items():
        for _, mod in nnx.iter_modules(model):
            if getattr(mod, "lora_A", None) is not None:
                mod.lora_alpha_over_rank *= scale
        graphdefs[name], params[name] = nnx.split(model)
    return TDDPipeline(graphdefs=graphdefs, params=params, tokenizers=conditioning.load_tokenizers(pipeline_dir),
                       schedule=NoiseSchedule.from_pretrained(pipeline_dir),
                       geometry=ImageGeometry.from_pretrained(pipeline_dir), mesh=mesh)


def _leaves(params):
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {state_key(p): np.asarray(v[...]) for p, v in leaves}


@pytest.fixture(scope="module")
def merged(tiny_pipeline_dir, lora_file):
    return TDDPipeline.from_pretrained(tiny_pipeline_dir, lora=lora_file, lora_scale=SCALE)


def test_merged_sampling_matches_unfused_branches(tiny_pipeline_dir, lora_file, merged):
    modules = merged.lora_info["loras"][0]["modules"]
    assert modules["text_encoder"] > 0 and modules["unet"] > 0
    graph_has_lora = [name for name, g in merged._graphdefs.items()
                      if any(getattr(m, "lora_A", None) is not None for _, m in nnx.iter_modules(
                          nnx.merge(g, merged.params[name])))]
    assert not graph_has_lora
    reference = _unfused(tiny_pipeline_dir, lora_file, SCALE)
    kwargs = dict(seeds=[1, 2], negative_prompts=NEGATIVES)
    ours, ref = (p(PROMPTS, SETTINGS, output_type="float", **kwargs) for p in (merged, reference))
    merged.set_lora_scale(0.0)  # the base model, same compiled function
    base = merged(PROMPTS, SETTINGS, output_type="float", **kwargs)
    merged.set_lora_scale(SCALE)
    err, effect = float(np.abs(ours - ref).max()), float(np.abs(ref - base).max())
    print(f"merged vs unfused LoRA, 4 steps CFG 1.7: max |image diff| = {err:.2e} (LoRA effect {effect:.2e})")
    assert effect > 0.05  # the LoRA really changes the images
    assert err <= 1e-4  # fp32 reassociation only: (W + sBA)x vs Wx + s·B(Ax)


def test_unmerge_restores_base_and_new_scale_remerges(tiny_pipeline_dir, lora_file, merged):
    plain = _leaves(TDDPipeline.from_pretrained(tiny_pipeline_dir).params)
    pipe = merged
    assert _leaves(pipe.base_params).keys() == plain.keys()  # no LoRA leaves: a LoRA-free graph
    for key, value in _leaves(pipe.base_params).items():
        np.testing.assert_array_equal(value, plain[key], err_msg=key)

    files, _ = lora_formats.read_lora_file(lora_file, {c: lora_formats.layer_shapes(
        nnx.merge(pipe._graphdefs[c], pipe.base_params[c])) for c in lora_formats.COMPONENTS})
    render = dict(output_type="float", seeds=[1, 2], negative_prompts=NEGATIVES)  # as in the test above
    first = pipe(PROMPTS, SETTINGS, **render)
    for scale in (0.3, 0.0):
        pipe.set_lora_scale(scale)
        merged = _leaves(pipe.params)
        changed = set()
        for component, lora in files.items():  # numpy fusion of the file, independent of the merge code
            for path, m in lora.items():
                key = f"{component}.{path}.weight"
                np.testing.assert_allclose(merged[key], plain[key] + scale * m.delta(), rtol=1e-5, atol=1e-6)
                changed.add(key)
        for key in plain.keys() - changed:
            np.testing.assert_array_equal(merged[key], plain[key], err_msg=key)
        if scale == 0.0:  # unmerged: exactly the base weights again
            for key in plain:
                np.testing.assert_array_equal(merged[key], plain[key], err_msg=key)
    pipe.set_lora_scale(SCALE)
    np.testing.assert_array_equal(pipe(PROMPTS, SETTINGS, **render), first)
    assert pipe._render._cache_size() == 1  # the weights are arguments: no scale (0 included) recompiles
