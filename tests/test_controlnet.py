"""ControlNetModel: every down residual and the mid residual equal diffusers' on random SDXL-architecture configs
(weights from folders diffusers' save_pretrained wrote, fp16 variant too), the full-size SDXL ControlNet's keys, the
UNet with residuals equal to diffusers' UNet with the same residuals, config errors; and TDDPipeline with ControlNets
(+ a LoRA, TCD sampling) equal to diffusers' StableDiffusionXLControlNetPipeline, and its input errors."""

import dataclasses
import inspect
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from PIL import Image
from test_pipeline import _lora_file
from test_unet import jax_args, sdxl_inputs
from tiny_pipeline import assert_parity, randomize_norms, tiny_unet_config

from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.models import controlnet as controlnet_lib
from tdd_jax.models.controlnet import ControlNetModel
from tdd_jax.models.layers import state_key
from tdd_jax.models.loading import read_config
from tdd_jax.models.unet import SDXL_UNET_CONFIG, UNet2DConditionModel
from tdd_jax.pipeline import TDDPipeline

ZERO_INITIALISED = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


def random_controlnet(config: dict, seed: int) -> TorchControlNet:
    """A diffusers ControlNet with random weights everywhere, its zero convolutions and norms included (a zero
    residual or an identity norm could hide a wrong mapping)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = randomize_norms(TorchControlNet(**config), gen)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(ZERO_INITIALISED):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return model.eval()


def controlnet_config(unet_config: dict, **overrides) -> dict:
    """The ControlNet fields of a UNet config (what ``ControlNetModel.from_unet`` copies), plus overrides."""
    fields = set(inspect.signature(TorchControlNet.__init__).parameters)
    layers = unet_config["layers_per_block"]
    return {**{k: v for k, v in unet_config.items() if k in fields}, "layers_per_block": layers, **overrides}


TINY = controlnet_config(tiny_unet_config(), conditioning_embedding_out_channels=(8, 16))
# Three levels like SDXL (no attention, then two cross-attention levels), a 4x conditioning embedding, a
# one-channel control image read in BGR order (a no-op for one channel, so three channels there).
THREE_LEVELS = controlnet_config(
    tiny_unet_config(), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
    conditioning_embedding_out_channels=(8, 16, 16), controlnet_conditioning_channel_order="bgr")


def control_image(batch: int, hw: tuple[int, int], factor: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A random control image (B, C, H, W) in [0, 1] for latents of size hw."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (batch, channels, hw[0] * factor, hw[1] * factor)).astype(np.float32)


def torch_residuals(model: TorchControlNet, inputs: dict, image: np.ndarray, scale: float,
                    guess_mode: bool = False) -> list[np.ndarray]:
    """diffusers' down residuals then the mid residual, NHWC."""
    with torch.no_grad():
        down, mid = model(torch.from_numpy(inputs["sample"]), torch.as_tensor(inputs["timesteps"]),
                          torch.from_numpy(inputs["context"]), torch.from_numpy(image), conditioning_scale=scale,
                          added_cond_kwargs={k: torch.from_numpy(inputs[k]) for k in ("text_embeds", "time_ids")},
                          guess_mode=guess_mode, return_dict=False)
    return [r.numpy().transpose(0, 2, 3, 1) for r in (*down, mid)]


@nnx.jit(static_argnames="guess_mode")
def jax_residuals(model, sample, timesteps, context, added, image, scale, guess_mode=False):
    down, mid = model(sample, timesteps, context, image, scale, added, guess_mode=guess_mode)
    return [*down, mid]


def assert_residuals(name: str, ours: list, theirs: list[np.ndarray]) -> None:
    assert len(ours) == len(theirs), f"{name}: {len(ours)} residuals vs diffusers' {len(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_parity(f"{name} residual {i}", np.asarray(a), b)


@pytest.mark.parametrize("config", [TINY, THREE_LEVELS], ids=["tiny", "three_levels_bgr"])
def test_residuals_match_diffusers(config, tmp_path):
    """Weights from a folder diffusers wrote; conditioning scale != 1, and guess_mode's log-spaced scales."""
    torch_model = random_controlnet(config, seed=3)
    torch_model.save_pretrained(tmp_path / "controlnet")
    model = ControlNetModel.from_pretrained(tmp_path / "controlnet")
    factor = 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)
    assert model.image_factor == factor
    inputs = sdxl_inputs(dict(torch_model.config))
    image = control_image(2, (8, 8), factor)
    args = (*jax_args(inputs), jnp.asarray(image.transpose(0, 2, 3, 1)))
    for scale, guess_mode in ((0.7, False), (1.3, True)):
        ours = jax_residuals(model, *args, scale, guess_mode=guess_mode)
        theirs = torch_residuals(torch_model, inputs, image, scale, guess_mode)
        assert_residuals(f"ControlNet scale {scale} guess_mode {guess_mode}", ours, theirs)
    assert tuple(r.shape[-1] for r in ours[:-1]) == model.skip_channels


def test_fp16_variant_loads(tmp_path):
    """``variant='fp16'`` reads diffusion_pytorch_model.fp16.safetensors (weights upcast to the model's dtype)."""
    torch_model = random_controlnet(TINY, seed=4).half()
    torch_model.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    model = ControlNetModel.from_pretrained(tmp_path, variant="fp16")
    inputs = sdxl_inputs(dict(torch_model.config))
    image = control_image(2, (8, 8), 2)
    ours = jax_residuals(model, *jax_args(inputs), jnp.asarray(image.transpose(0, 2, 3, 1)), 1.0)
    assert_residuals("ControlNet fp16 variant", ours, torch_residuals(torch_model.float(), inputs, image, 1.0))


def test_full_sdxl_controlnet_keys():
    """Abstract shapes only: every state path/shape equals diffusers' SDXL ControlNet state_dict (the layout of
    diffusers/controlnet-canny-sdxl-1.0, which ``from_unet`` of the SDXL UNet gives)."""
    config = controlnet_config(SDXL_UNET_CONFIG)
    abstract = nnx.eval_shape(lambda: ControlNetModel(config, rngs=nnx.Rngs(0)))
    ours = {".".join(str(k) for k in path): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in TorchControlNet(**config).state_dict().items()}
    assert ours == theirs


def test_unet_with_residuals_matches_diffusers(tiny_pipeline_dir):
    """Random residuals (shaped like a ControlNet's) added to the skips and mid block as diffusers' UNet does."""
    torch_unet = TorchUNet.from_pretrained(tiny_pipeline_dir / "unet").eval()
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    inputs = sdxl_inputs(dict(torch_unet.config))
    rng = np.random.default_rng(5)
    sizes = [8, 8, 8, 4, 4, 4]  # conv_in, level 0's two resnets and downsampler, level 1's two resnets
    down = [rng.standard_normal((2, c, s, s)).astype(np.float32) for c, s in zip(unet.skip_channels, sizes)]
    mid = rng.standard_normal((2, unet.skip_channels[-1], 4, 4)).astype(np.float32)
    with torch.no_grad():
        added = {k: torch.from_numpy(inputs[k]) for k in ("text_embeds", "time_ids")}
        args = (torch.from_numpy(inputs["sample"]), torch.as_tensor(inputs["timesteps"]),
                torch.from_numpy(inputs["context"]))
        call = lambda **kw: torch_unet(*args, added_cond_kwargs=added, **kw).sample  # noqa: E731
        expected = call(down_block_additional_residuals=[torch.from_numpy(d) for d in down],
                        mid_block_additional_residual=torch.from_numpy(mid)).numpy()
        plain = call().numpy()

    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    forward = nnx.jit(lambda m, args, d, r: m(*args, down_block_additional_residuals=d,
                                              mid_block_additional_residual=r))
    ours = forward(unet, jax_args(inputs), [nhwc(d) for d in down], nhwc(mid))
    assert_parity("UNet with ControlNet residuals", np.asarray(ours).transpose(0, 3, 1, 2), expected)
    assert np.abs(expected - plain).max() > 1e-2  # the residuals matter (test_unet: the output without them)
    with pytest.raises(ValueError, match="pass both down_block_additional_residuals"):
        unet(*jax_args(inputs), down_block_additional_residuals=[nhwc(d) for d in down])
    with pytest.raises(ValueError, match="has 5 entries for the UNet's 6 skip connections"):
        unet(*jax_args(inputs), down_block_additional_residuals=[nhwc(d) for d in down[:5]],
             mid_block_additional_residual=nhwc(mid))


def test_from_unet_matches_diffusers(tiny_pipeline_dir, tmp_path):
    """ControlNetModel.from_unet = diffusers' ControlNetModel.from_unet: the same config.json fields, the UNet's
    encoder weights, zero convolutions; only the conditioning embedding's other convolutions are random. The
    result saved as a component folder loads in diffusers."""
    from tdd_jax.pretrain.assemble import save_component

    torch_unet = TorchUNet.from_pretrained(tiny_pipeline_dir / "unet")
    theirs = TorchControlNet.from_unet(torch_unet, conditioning_embedding_out_channels=(8, 16))
    config = controlnet_lib.controlnet_config(read_config(tiny_pipeline_dir / "unet"),
                                              conditioning_embedding_out_channels=(8, 16))
    as_json = lambda c: json.loads(json.dumps(dict(c)))  # noqa: E731
    assert as_json({k: theirs.config[k] for k in config}) == as_json(config)
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    ours = ControlNetModel.from_unet(unet, config, rngs=nnx.Rngs(0))
    weights = {state_key(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    expected = {k: v.numpy() for k, v in theirs.state_dict().items()}
    assert set(weights) == set(expected)
    random = [k for k in expected if k.startswith("controlnet_cond_embedding.")
              and not k.startswith("controlnet_cond_embedding.conv_out")]
    assert random and not any(k.startswith("controlnet_cond_embedding.conv_out") for k in random)
    for key in sorted(set(expected) - set(random)):
        np.testing.assert_array_equal(weights[key], expected[key], err_msg=key)
    assert not np.any(weights["controlnet_mid_block.weight"]) and np.any(weights["mid_block.resnets.0.conv1.weight"])
    save_component(tmp_path, "controlnet", ours, config)
    loaded = TorchControlNet.from_pretrained(tmp_path)
    assert all(np.array_equal(v.numpy(), weights[k].astype(np.float16)) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match=r"not ControlNet config fields: \['block_out_channels'\]"):
        controlnet_lib.controlnet_config(read_config(tiny_pipeline_dir / "unet"), block_out_channels=(8,))


@pytest.mark.parametrize("field, value, message", [
    ("global_pool_conditions", True, "'global_pool_conditions' = True is not supported"),
    ("controlnet_conditioning_channel_order", "rbg", "'controlnet_conditioning_channel_order' = 'rbg'"),
    ("mid_block_type", "UNetMidBlock2D", "ControlNet config field 'mid_block_type'"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        nnx.eval_shape(lambda: ControlNetModel({**TINY, field: value}, rngs=nnx.Rngs(0)))



# --- sampling with ControlNets: TDDPipeline vs diffusers' StableDiffusionXLControlNetPipeline -------------------

SIZE = 16  # the tiny pipeline's default output size (latents 8x8, VAE factor 2)


@pytest.fixture(scope="module")
def controlnet_dirs(tmp_path_factory):
    """Two random ControlNets for the tiny pipeline, in folders diffusers wrote (the second reads BGR)."""
    root = tmp_path_factory.mktemp("controlnets")
    configs = (TINY, {**TINY, "conditioning_embedding_out_channels": (8, 8),
                      "controlnet_conditioning_channel_order": "bgr"})
    for i, config in enumerate(configs):
        random_controlnet(config, seed=10 + i).save_pretrained(root / f"controlnet_{i}")
    return [root / f"controlnet_{i}" for i in range(len(configs))]


@pytest.fixture(scope="module")
def lora_path(tiny_pipeline_dir, tmp_path_factory):
    return _lora_file(tiny_pipeline_dir, tmp_path_factory.mktemp("lora") / "lora.safetensors")[0]


def control_images() -> tuple[Image.Image, np.ndarray]:
    """A PIL image of another size (Lanczos-resized by both pipelines) and a float array in [0, 1] (nearest)."""
    rng = np.random.default_rng(7)
    pil = Image.fromarray(rng.integers(0, 256, (20, 12, 3), np.uint8))
    return pil, rng.uniform(0, 1, (10, 24, 3)).astype(np.float32)


# (prompt, ControlNets used, control images, guidance scale, conditioning scales, guidance starts, ends)
CASES = {
    "one_controlnet_cfg1": ("a photo of a cat", 1, [0], 1.0, 0.6, 0.25, 0.75),
    "two_controlnets_cfg2": ("a red car on the street", 2, [0, 1], 2.0, [0.8, 1.3], [0.0, 0.5], [0.75, 1.0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_diffusers_controlnet_pipeline(case, tiny_pipeline_dir, controlnet_dirs, lora_path):
    """ControlNet(s) + a LoRA + TCD sampling (γ = 0) = diffusers' StableDiffusionXLControlNetPipeline +
    TCDScheduler + the LoRA loaded and fused, from the same latents: CFG 1 and 2, scales != 1, guidance windows
    != (0, 1), a PIL control image of another size and a float array (the two resize paths), MultiControlNet."""
    from diffusers import StableDiffusionXLControlNetPipeline, TCDScheduler

    prompt, k, which, cfg, scales, starts, ends = CASES[case]
    dirs = controlnet_dirs[:k]
    images = [control_images()[i] for i in which]
    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(1))
    settings = SamplerSettings(num_steps=4, gamma=0.0, guidance_scale=cfg, final_step="tcd")

    nets = [TorchControlNet.from_pretrained(d).eval() for d in dirs]
    ref = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_pipeline_dir, controlnet=nets if k > 1 else nets[0], add_watermarker=False)
    ref.scheduler = TCDScheduler.from_config(ref.scheduler.config, original_inference_steps=250)
    ref.load_lora_weights(str(lora_path))
    ref.fuse_lora()
    ref.set_progress_bar_config(disable=True)
    # diffusers reads a bare (H, W, 3) array as a batch of H images: it takes an array image as a batch of one.
    theirs = [image[None] if isinstance(image, np.ndarray) else image for image in images]
    expected = ref(prompt=prompt, image=theirs if k > 1 else theirs[0], latents=latents, height=SIZE, width=SIZE,
                   num_inference_steps=4, guidance_scale=cfg, eta=0.0, controlnet_conditioning_scale=scales,
                   control_guidance_start=starts, control_guidance_end=ends, output_type="np").images

    pipe = TDDPipeline.from_pretrained(tiny_pipeline_dir, lora=lora_path, controlnets=dirs)
    kwargs = dict(latents=latents.numpy().transpose(0, 2, 3, 1), output_type="float",
                  control_image=images if k > 1 else images[0], controlnet_conditioning_scale=scales,
                  control_guidance_start=starts, control_guidance_end=ends)
    ours = pipe([prompt], settings, **kwargs)
    assert_parity(f"ControlNet pipeline ({case})", ours, expected)
    without = pipe([prompt], settings, **{**kwargs, "controlnet_conditioning_scale": 0.0})  # same compile
    assert np.abs(without - ours).max() > 1e-3  # the ControlNets change the image


def test_pipeline_control_errors(tiny_pipeline_dir, controlnet_dirs, tmp_path):
    random_controlnet(THREE_LEVELS, seed=2).save_pretrained(tmp_path / "three_levels")
    with pytest.raises(ValueError, match="does not fit the UNet: skip channels"):
        TDDPipeline.from_pretrained(tiny_pipeline_dir, controlnets=tmp_path / "three_levels")
    random_controlnet({**TINY, "conditioning_embedding_out_channels": (8, 8, 8)}, seed=2).save_pretrained(
        tmp_path / "factor4")
    with pytest.raises(ValueError, match="downsamples control images 4x, the pipeline's VAE 2x"):
        TDDPipeline.from_pretrained(tiny_pipeline_dir, controlnets=[tmp_path / "factor4"])
    pipe = TDDPipeline.from_pretrained(tiny_pipeline_dir, controlnets=controlnet_dirs)
    image = control_images()[0]
    for kwargs, message in (
            ({}, "control_image is required: 2 ControlNet"),
            ({"control_image": image}, "control_image must be a list of 2 entries"),
            ({"control_image": [[image], image]}, "control_image has 1 images for 2 prompts"),
            ({"control_image": [image, image], "controlnet_conditioning_scale": [1.0]},
             "controlnet_conditioning_scale has 1 entries for 2 ControlNets"),
            ({"control_image": [image, image], "control_guidance_start": 0.8, "control_guidance_end": 0.5},
             "must satisfy 0 <= start < end <= 1"),
            ({"control_image": [tmp_path / "missing.png", image]}, "control image not found")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            pipe(["a cat", "a dog"], **kwargs)
    plain = TDDPipeline.from_pretrained(tiny_pipeline_dir)
    with pytest.raises(ValueError, match="no ControlNet is loaded"):
        plain(["a cat"], control_image=image)


# --- the sampler CLI: --controlnet (repeatable), --control_image, a JSONL 'control_image', scales and windows ----


def test_sample_cli_with_controlnets(tiny_pipeline_dir, controlnet_dirs, tmp_path):
    """Flags parse into the job (repeatable --controlnet); a JSONL prompt's control images override the flag's;
    the images follow the control images; bad ControlNet inputs are JobErrors that write nothing."""
    from absl import flags

    from tdd_jax import sample
    from tdd_jax.sample import METADATA, JobError, run

    pil, array = control_images()
    pil.save(tmp_path / "a.png")
    Image.fromarray((array * 255).astype(np.uint8)).save(tmp_path / "b.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat", "seed": 1}\n{"prompt": "a cat", "seed": 1, "control_image": '
                       '["b.png", "a.png"]}\n')
    argv = ["sample", f"--pipeline={tiny_pipeline_dir}", f"--prompts={prompts}", f"--out={tmp_path / 'out'}",
            *(f"--controlnet={d}" for d in controlnet_dirs), f"--control_image={tmp_path / 'a.png'}",
            f"--control_image={tmp_path / 'b.png'}", "--controlnet_scale=0.7", "--controlnet_scale=1.2",
            "--control_guidance_end=0.5", "--guidance_scale=1"]
    flags.FLAGS(argv)
    try:
        job = sample.job_from_flags(flags.FLAGS)
    finally:
        flags.FLAGS.unparse_flags()
    assert job.controlnet == tuple(str(d) for d in controlnet_dirs) and job.controlnet_scale == (0.7, 1.2)
    assert (job.control_guidance_start, job.control_guidance_end) == ((0.0,), (0.5,))

    for overrides, message in (
            (dict(controlnet=()), "needs --controlnet"),
            (dict(control_image=(str(tmp_path / "a.png"),)), "--control_image gives 1 control images for 2"),
            (dict(control_image=(str(tmp_path / "a.png"), str(tmp_path / "c.png"))), "control image not found"),
            (dict(controlnet_scale=(1.0, 1.0, 1.0)), "--controlnet_scale has 3 values for 2 --controlnet"),
            (dict(control_guidance_start=(0.6,)), "must satisfy 0 <= start < end <= 1")):
        with pytest.raises(JobError, match=message):
            run(dataclasses.replace(job, **overrides))
        assert not (tmp_path / "out").exists(), overrides

    run(job)
    records = sorted((json.loads(line) for line in (tmp_path / "out" / METADATA).read_text().splitlines()),
                     key=lambda r: r["index"])
    assert [r["control_image"] for r in records] == [[str(tmp_path / "a.png"), str(tmp_path / "b.png")],
                                                     [str(tmp_path / "b.png"), str(tmp_path / "a.png")]]
    assert records[0]["controlnet_scale"] == [0.7, 1.2] and records[0]["file"] != records[1]["file"]
    first, second = (np.asarray(Image.open(tmp_path / "out" / r["file"]), np.int32) for r in records)
    assert np.abs(first - second).max() > 0  # same prompt and seed, other control images
