"""UNet2DConditionModel: parity with diffusers (SDXL- and SD1.5-style tiny configs), full-size SDXL parameter
count from abstract shapes, bf16/remat execution, config validation and loader errors."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from safetensors.numpy import load_file, save_file
from tiny_pipeline import assert_parity, randomize_norms, tiny_sd15_unet_config, tiny_unet_config

from tdd_jax.models.layers import GroupNorm, LayerNorm, ModelOptions
from tdd_jax.models.loading import WeightsError, build_model, count_params
from tdd_jax.models.unet import SDXL_UNET_CONFIG, UNet2DConditionModel

WEIGHTS = "diffusion_pytorch_model.safetensors"


@nnx.jit
def unet_forward(model, sample, timesteps, context, added):
    return model(sample, timesteps, context, added)


def sdxl_inputs(cfg: dict, batch: int = 2, hw: tuple[int, int] = (8, 8), tokens: int = 7, seed: int = 0):
    """Random NCHW latents, timesteps, text states and text_time conds for a tiny SDXL-style config."""
    rng = np.random.default_rng(seed)
    text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return dict(
        sample=rng.standard_normal((batch, cfg["in_channels"], *hw)).astype(np.float32),
        timesteps=np.array([999.0, 17.0][:batch], np.float32),
        context=rng.standard_normal((batch, tokens, cfg["cross_attention_dim"])).astype(np.float32),
        text_embeds=rng.standard_normal((batch, text_dim)).astype(np.float32),
        time_ids=np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 1024, 1024]][:batch], np.float32))


def torch_call(unet: torch.nn.Module, inputs: dict) -> torch.Tensor:
    added = None
    if "text_embeds" in inputs:
        added = {k: torch.from_numpy(inputs[k]) for k in ("text_embeds", "time_ids")}
    return unet(torch.from_numpy(inputs["sample"]), torch.as_tensor(inputs["timesteps"]),
                torch.from_numpy(inputs["context"]), added_cond_kwargs=added).sample


def torch_output(unet: torch.nn.Module, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return torch_call(unet, inputs).numpy()


def jax_args(inputs: dict) -> tuple:
    """The same inputs for our UNet: NHWC latents, and the added conds as a dict (None without them)."""
    added = None
    if "text_embeds" in inputs:
        added = {k: jnp.asarray(inputs[k]) for k in ("text_embeds", "time_ids")}
    return (jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1)), jnp.asarray(inputs["timesteps"]),
            jnp.asarray(inputs["context"]), added)


def jax_output(model: UNet2DConditionModel, inputs: dict) -> np.ndarray:
    return np.asarray(unet_forward(model, *jax_args(inputs)), np.float32).transpose(0, 3, 1, 2)


def numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def sdxl_unet_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir / "unet"


@pytest.fixture(scope="module")
def torch_sdxl_unet(sdxl_unet_dir):
    return TorchUNet.from_pretrained(sdxl_unet_dir).eval()


def test_sdxl_tiny_matches_diffusers(torch_sdxl_unet, sdxl_unet_dir):
    cfg = dict(torch_sdxl_unet.config)
    inputs = sdxl_inputs(cfg)
    expected = torch_output(torch_sdxl_unet, inputs)

    from_mapping = build_model(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)), numpy_state(torch_sdxl_unet))
    assert_parity("SDXL-style UNet (state dict)", jax_output(from_mapping, inputs), expected)

    from_folder = UNet2DConditionModel.from_pretrained(sdxl_unet_dir)
    assert_parity("SDXL-style UNet (from_pretrained)", jax_output(from_folder, inputs), expected)


def test_sd15_tiny_matches_diffusers():
    """Conv projections, no added conditions, a scalar timestep, and an odd latent size (9x7), which makes the
    up blocks resize to the skip connection's size instead of doubling."""
    torch.manual_seed(1)
    unet = randomize_norms(TorchUNet(**tiny_sd15_unet_config()), torch.Generator().manual_seed(1)).eval()
    cfg = dict(unet.config)
    rng = np.random.default_rng(1)
    inputs = dict(sample=rng.standard_normal((2, 4, 9, 7)).astype(np.float32), timesteps=np.float32(421.0),
                  context=rng.standard_normal((2, 5, cfg["cross_attention_dim"])).astype(np.float32))
    model = build_model(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)), numpy_state(unet))
    assert_parity("SD1.5-style UNet", jax_output(model, inputs), torch_output(unet, inputs))


def test_full_sdxl_parameter_count_and_keys():
    """Abstract shapes only: the count, and every state path/shape equal to diffusers' SDXL state_dict."""
    ctor = lambda: UNet2DConditionModel(SDXL_UNET_CONFIG, rngs=nnx.Rngs(0))  # noqa: E731
    assert count_params(ctor) == 2_567_463_684
    ours = {".".join(str(k) for k in path): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(nnx.eval_shape(ctor), nnx.Param))}
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in TorchUNet(**SDXL_UNET_CONFIG).state_dict().items()}
    assert ours == theirs


def test_bf16_compute_and_remat_run(sdxl_unet_dir, torch_sdxl_unet):
    """bf16 activations with fp32 weights stay close to fp32; remat changes memory, not values."""
    inputs = sdxl_inputs(dict(torch_sdxl_unet.config), batch=1)
    expected = torch_output(torch_sdxl_unet, inputs)
    bf16 = UNet2DConditionModel.from_pretrained(sdxl_unet_dir, opts=ModelOptions(dtype=jnp.bfloat16, remat="full"))
    out = unet_forward(bf16, *jax_args(inputs))
    assert out.dtype == jnp.bfloat16
    rel = np.abs(np.asarray(out, np.float32).transpose(0, 3, 1, 2) - expected).max() / np.abs(expected).max()
    print(f"bf16 UNet: max abs error / max |output| = {rel:.3g}")
    assert rel < 0.05


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_norms_match_torch_in_the_model_dtype(dtype):
    """GroupNorm and LayerNorm keep their statistics at least in float32 and in float64 for a float64 model (the
    layout-equality test of the train step runs one): against torch's float64 norms, float32 agrees to ~1e-6 and
    float64 to ~1e-13, which float32 statistics (rounding every input to 24 bits) could not."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6, 32)) * 3 + 1  # NHWC, 32 channels in 8 groups
    w, b = rng.standard_normal(32), rng.standard_normal(32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    want_gn = torch.nn.functional.group_norm(xt, 8, torch.from_numpy(w), torch.from_numpy(b), eps=1e-5)
    want_ln = torch.nn.functional.layer_norm(torch.from_numpy(x), (32,), torch.from_numpy(w), torch.from_numpy(b))
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    with jax.enable_x64(dtype == jnp.float64):
        opts = ModelOptions(dtype=dtype, param_dtype=dtype)
        gn, ln = GroupNorm(8, 32, opts=opts), LayerNorm(32, opts=opts)
        for m in (gn, ln):
            m.weight.value, m.bias.value = jnp.asarray(w, dtype), jnp.asarray(b, dtype)
        got_gn, got_ln = gn(jnp.asarray(x, dtype)), ln(jnp.asarray(x, dtype))
        assert got_gn.dtype == got_ln.dtype == dtype
        np.testing.assert_allclose(np.asarray(got_gn), want_gn.numpy().transpose(0, 2, 3, 1), rtol=0, atol=tol)
        np.testing.assert_allclose(np.asarray(got_ln), want_ln.numpy(), rtol=0, atol=tol)


def test_unsupported_config_fields_are_named():
    base = tiny_unet_config()
    for field, value in [("class_embed_type", "timestep"), ("down_block_types", ("AttnDownBlock2D", "DownBlock2D")),
                         ("addition_embed_type", "text"), ("time_cond_proj_dim", 256),
                         ("resnet_time_scale_shift", "scale_shift"), ("only_cross_attention", True),
                         ("downsample_padding", 0)]:
        with pytest.raises(ValueError, match=field):
            UNet2DConditionModel({**base, field: value}, rngs=nnx.Rngs(0))


def test_missing_added_conditions_are_reported():
    model = nnx.eval_shape(lambda: UNet2DConditionModel(tiny_unet_config(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="text_embeds"):
        model(jnp.zeros((1, 8, 8, 4)), 1.0, jnp.zeros((1, 3, 64)))


def test_bad_directories_give_clear_errors(sdxl_unet_dir, tmp_path):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(sdxl_unet_dir / WEIGHTS, no_config)
    with pytest.raises(FileNotFoundError, match="config.json"):
        UNet2DConditionModel.from_pretrained(no_config)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(sdxl_unet_dir / "config.json", no_weights)
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        UNet2DConditionModel.from_pretrained(no_weights)

    tensors = load_file(sdxl_unet_dir / WEIGHTS)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    model_shape = tensors[key].shape
    tensors[key] = np.zeros((model_shape[0], model_shape[1] + 1), np.float32)
    wrong = tmp_path / "wrong_shape"
    wrong.mkdir()
    shutil.copy(sdxl_unet_dir / "config.json", wrong)
    save_file(tensors, wrong / WEIGHTS)
    with pytest.raises(WeightsError) as err:
        UNet2DConditionModel.from_pretrained(wrong)
    assert key in str(err.value) and str(tensors[key].shape) in str(err.value) and str(model_shape) in str(err.value)


def test_variant_weights_are_found(sdxl_unet_dir, tmp_path):
    shutil.copy(sdxl_unet_dir / "config.json", tmp_path)
    shutil.copy(sdxl_unet_dir / WEIGHTS, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    model = UNet2DConditionModel.from_pretrained(tmp_path, variant="fp16")
    np.testing.assert_array_equal(np.asarray(model.conv_in.weight[...]),
                                  load_file(sdxl_unet_dir / WEIGHTS)["conv_in.weight"])
