"""The add-ons shipped for the tiny SDXL. The edge-map ControlNet (tdd_jax/assets/tiny_controlnet_edges): its edge
maps and their F1 score on synthetic images, its recipe, diffusers loads it, and under it the shipped tiny SDXL's
samples follow the control edges better than without it. The sepia style LoRA (tdd_jax/assets/tiny_style_sepia):
the sepia measure, diffusers loads it, and it makes samples sepia."""

import json
from pathlib import Path

import numpy as np

from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.pipeline import TDDPipeline
from tdd_jax.pretrain.assemble import folder_mb
from tdd_jax.pretrain.edges import control_images, edge_f1, edge_map
from tdd_jax.pretrain.style_lora import sepia, sepia_distance

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "tdd_jax" / "assets" / "tiny_sdxl"
SHIPPED = REPO / "tdd_jax" / "assets" / "tiny_controlnet_edges"
STYLE = REPO / "tdd_jax" / "assets" / "tiny_style_sepia.safetensors"


def _square(value, size: int = 16) -> np.ndarray:
    """A (size, size, 3) float image: ``value`` (an RGB triple) on rows/cols 4..11, black elsewhere."""
    image = np.zeros((size, size, 3), np.float32)
    image[4:12, 4:12] = value
    return image


def test_edge_map_marks_strong_luma_steps():
    """A white square: edges on exactly the pixels whose 3x3 neighbourhood is not constant (both sides of the
    step, the corners' diagonal neighbours too); the same from uint8; colours count by their luma."""
    image = _square((1.0, 1.0, 1.0))
    luma = image[..., 0]
    padded = np.pad(luma, 1, mode="edge")
    windows = np.stack([padded[dy:dy + 16, dx:dx + 16] for dy in range(3) for dx in range(3)])
    np.testing.assert_array_equal(edge_map(image), windows.max(0) != windows.min(0))
    np.testing.assert_array_equal(edge_map((image * 255).astype(np.uint8)), edge_map(image))
    assert edge_map(np.stack([image, image])).shape == (2, 16, 16)
    assert edge_map(_square((0.0, 1.0, 0.0))).any()  # green: luma 0.587, a Sobel magnitude of 2.3
    assert not edge_map(_square((0.0, 0.0, 1.0))).any()  # blue: luma 0.114, 0.46, under the threshold
    assert not edge_map(_square((0.25, 0.25, 0.25))).any()  # a faint grey square: 1.0
    control = control_images(edge_map(image))
    assert control.shape == (16, 16, 3) and set(np.unique(control)) == {0.0, 1.0}


def test_edge_f1_tolerates_one_pixel():
    edges = edge_map(_square((1.0, 1.0, 1.0)))
    shifted = np.roll(edges, 1, axis=1)
    far = np.roll(edges, 6, axis=1)
    empty = np.zeros_like(edges)
    scores = edge_f1(np.stack([edges, shifted, shifted, far, empty, empty]),
                     np.stack([edges, edges, edges, edges, edges, empty]))
    assert scores[0] == 1.0 and scores[1] == 1.0  # identical; one pixel off, within the tolerance
    assert scores[4] == 0.0 and scores[5] == 1.0  # nothing drawn; nothing to follow
    assert 0.0 < scores[3] < 0.8
    assert edge_f1(shifted, edges, tolerance=0) < 1.0


def test_shipped_controlnet_recipe_and_diffusers_load():
    from diffusers import ControlNetModel as TorchControlNet

    assert folder_mb(SHIPPED) <= 8.0
    recipe = json.loads((SHIPPED / "recipe.json").read_text())
    assert recipe["seed"] == 0 and recipe["pipeline"] == PIPELINE.name
    without, with_net = recipe["eps_mse_without_controlnet"], recipe["eps_mse_with_controlnet"]
    assert with_net["no_captions"] < without["no_captions"], recipe  # the edges tell the UNet something
    net = TorchControlNet.from_pretrained(SHIPPED)
    assert list(net.config.conditioning_embedding_out_channels) == recipe["conditioning_embedding_out_channels"]


def test_shipped_controlnet_makes_samples_follow_the_edges(tmp_path_factory):
    """4-step samples of the shipped tiny SDXL (CFG 1) with their own emoji's edge map as the control image: the
    ControlNet changes them, towards the edges (edge F1 up), from the same noises."""
    from tdd_jax.pretrain.contact_sheet import training_images

    names = ("grinning face", "red heart", "cat face", "rocket")
    control = edge_map(training_images(str(tmp_path_factory.mktemp("emoji")), names, 64))
    pipe = TDDPipeline.from_pretrained(PIPELINE, controlnets=SHIPPED)
    settings = SamplerSettings(num_steps=4, gamma=0.0, guidance_scale=1.0)
    render = lambda scale: pipe(list(names), settings, seeds=1, control_image=list(control_images(control)),  # noqa
                                controlnet_conditioning_scale=scale, output_type="float")
    with_net, without = render(1.0), render(0.0)
    change = float(np.abs(with_net - without).mean())
    f1 = [float(edge_f1(edge_map(x), control).mean()) for x in (with_net, without)]
    print(f"shipped ControlNet: mean |change| {change:.4f}; edge F1 of 4-step samples with / without it: "
          f"{f1[0]:.3f} / {f1[1]:.3f}")
    assert change > 0.004  # measured 0.008 (2,000-step ControlNet)
    assert f1[0] > f1[1]


def test_sepia_distance_tells_sepia_prints_apart():
    rng = np.random.default_rng(0)
    colourful = rng.integers(0, 256, (4, 16, 16, 3), np.uint8)
    assert sepia_distance(colourful) > 0.1
    assert sepia_distance(sepia(colourful)) < 0.005 and sepia_distance(sepia(colourful / 255.0)) < 0.005
    grey = np.repeat(rng.uniform(0, 1, (4, 16, 16, 1)), 3, axis=-1)
    assert 0.0 < sepia_distance(grey) < sepia_distance(colourful)  # grey is not sepia, but nearer than colour


def test_shipped_style_lora_loads_in_diffusers_and_makes_samples_sepia():
    from diffusers import StableDiffusionXLPipeline

    recipe = json.loads(STYLE.with_suffix(".json").read_text())
    assert recipe["style"] == "sepia" and recipe["pipeline"] == PIPELINE.name
    ref = StableDiffusionXLPipeline.from_pretrained(PIPELINE, local_files_only=True)
    ref.load_lora_weights(str(STYLE))
    assert ref.get_list_adapters() == {"unet": ["default_0"]}
    names = ["grinning face", "red heart", "frog", "rocket"]
    settings = SamplerSettings(num_steps=4, gamma=0.0, guidance_scale=1.0)
    pipe = TDDPipeline.from_pretrained(PIPELINE, lora=STYLE)
    styled = pipe(names, settings, seeds=1, output_type="float")
    pipe.set_lora_scale(0.0)  # the base weights, same compile
    plain = pipe(names, settings, seeds=1, output_type="float")
    distances = sepia_distance(styled), sepia_distance(plain)
    print(f"sepia distance of 4-step samples with / without the style LoRA: {distances[0]:.4f} / {distances[1]:.4f}")
    assert distances[0] < 0.8 * distances[1]  # measured 0.069 / 0.102
