"""Loading from diffusers/transformers folders: clear errors on bad folders, sharded placement, and the tiny
pipeline fixture itself (diffusers must be able to load and run it)."""

import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from flax import nnx
from safetensors.numpy import load_file, save_file

from tdd_jax.models.clip import CLIPTextModel
from tdd_jax.models.loading import WeightsError
from tdd_jax.models.vae import AutoencoderKL


@pytest.fixture
def text_encoder_copy(tiny_pipeline_dir, tmp_path):
    """A writable copy of the tiny text_encoder folder and its tensors."""
    folder = tmp_path / "text_encoder"
    shutil.copytree(tiny_pipeline_dir / "text_encoder", folder)
    return folder, load_file(folder / "model.safetensors")


def test_missing_folder_and_files(tiny_pipeline_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        AutoencoderKL.from_pretrained(tmp_path / "nowhere")
    shutil.copy(tiny_pipeline_dir / "vae" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no safetensors weights in .*diffusion_pytorch_model\.safetensors"):
        AutoencoderKL.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_wrong_shape_names_key_and_both_shapes(text_encoder_copy):
    folder, tensors = text_encoder_copy
    key = "encoder.layers.1.mlp.fc1.weight"
    tensors[key] = tensors[key][:, :16]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(WeightsError) as err:
        CLIPTextModel.from_pretrained(folder)
    assert f"{key}: checkpoint (64, 16) vs model (64, 32)" in str(err.value)
    assert str(folder / "model.safetensors") in str(err.value)


def test_missing_and_unexpected_keys_are_named(text_encoder_copy):
    folder, tensors = text_encoder_copy
    tensors["encoder.layers.2.mlp.fc1.weight"] = np.zeros((64, 32), np.float32)
    del tensors["final_layer_norm.bias"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=r"1 missing keys \(first: \['final_layer_norm.bias'\]\).*"
                                           r"1 unexpected keys \(first: \['encoder.layers.2.mlp.fc1.weight'\]\)"):
        CLIPTextModel.from_pretrained(folder)


@pytest.mark.parametrize("kind", ["single_device", "mesh"])
def test_load_with_sharding(tiny_pipeline_dir, kind):
    device = jax.devices()[0]
    if kind == "single_device":
        sharding = jax.sharding.SingleDeviceSharding(device)
    else:
        mesh = jax.sharding.Mesh(np.array([device]), ("data",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    folder = tiny_pipeline_dir / "text_encoder"
    sharded = CLIPTextModel.from_pretrained(folder, shardings=sharding)
    plain = CLIPTextModel.from_pretrained(folder)
    for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(nnx.state(plain))):
        assert a.get_value().sharding == sharding
        np.testing.assert_array_equal(a.get_value(), b.get_value())


def test_tiny_pipeline_runs_in_diffusers(tiny_pipeline_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a cat", num_inference_steps=1, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
