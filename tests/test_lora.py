"""LoRA on the UNet against PEFT: same adapted modules, same outputs and gradients, an exact teacher with LoRA
off, and PEFT's Conv2d LoRA semantics for strided 3x3 convs."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from peft.tuners.lora import LoraLayer
from test_unet import jax_args, sdxl_inputs, torch_call, unet_forward
from tiny_pipeline import assert_parity

from tdd_jax.models.layers import Conv2d, LoRAParam, ModelOptions
from tdd_jax.models.lora import (TDD_TARGETS, LoRAConfig, attach_lora, detach_lora, lora_modules, matches_target,
                                 merge_lora, split_lora)
from tdd_jax.models.unet import UNet2DConditionModel

RANK, ALPHA = 4, 8  # alpha != rank, so the alpha/rank scale is exercised


def peft_lora_config() -> peft.LoraConfig:
    # init_lora_weights=False keeps torch's default (non-zero, random) init for both A and B.
    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TDD_TARGETS), init_lora_weights=False)


def peft_weights(model: torch.nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module path -> (lora_A, lora_B) weights of every PEFT LoRA layer (PyTorch layouts, as ours)."""
    return {name: (m.lora_A["default"].weight.detach().numpy(), m.lora_B["default"].weight.detach().numpy())
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def with_peft_weights(model: nnx.Module, weights: dict, targets=TDD_TARGETS) -> list[str]:
    """Attach a LoRA to ``model`` and overwrite it with PEFT's weights; returns the adapted paths."""
    paths = attach_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA, targets=tuple(targets)), nnx.Rngs(0))
    for path, layer in lora_modules(model, targets):
        a, b = weights[path]
        layer.lora_A.set_value(jnp.asarray(a))
        layer.lora_B.set_value(jnp.asarray(b))
    return paths


@pytest.fixture(scope="module")
def unet_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir / "unet"


@pytest.fixture(scope="module")
def torch_lora_unet(unet_dir):
    torch.manual_seed(0)
    unet = TorchUNet.from_pretrained(unet_dir).eval()
    unet.add_adapter(peft_lora_config())
    return unet


@pytest.fixture(scope="module")
def inputs(torch_lora_unet):
    return sdxl_inputs(dict(torch_lora_unet.config))


def test_peft_lora_matches_outputs_and_gradients(torch_lora_unet, unet_dir, inputs):
    """Every default target adapted as in PEFT; outputs and LoRA gradients (through remat'ed blocks) equal PEFT's;
    the LoRA tree is the only thing differentiated. One compiled vjp serves the forward and backward checks."""
    weights = peft_weights(torch_lora_unet)
    model = UNet2DConditionModel.from_pretrained(unet_dir, opts=ModelOptions(remat="full"))
    paths = with_peft_weights(model, weights)
    assert sorted(paths) == sorted(weights)
    assert all(any(matches_target(p, [t]) for p in paths) for t in TDD_TARGETS)  # the tiny UNet has them all

    graphdef, lora_state, base_state = split_lora(model)
    assert len(nnx.to_flat_state(lora_state)) == 2 * len(paths)
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(lora_state))
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(base_state))

    probe = np.random.default_rng(3).standard_normal(inputs["sample"].shape).astype(np.float32)
    args = jax_args(inputs)

    @jax.jit
    def output_and_lora_grads(lora, base):
        out, vjp = jax.vjp(lambda lora: merge_lora(graphdef, lora, base)(*args), lora)
        return out, vjp(jnp.asarray(probe.transpose(0, 2, 3, 1)))[0]

    out, grads = output_and_lora_grads(lora_state, base_state)
    torch_lora_unet.zero_grad()
    expected = torch_call(torch_lora_unet, inputs)
    (expected * torch.from_numpy(probe)).sum().backward()
    assert_parity("SDXL-style UNet + PEFT LoRA", np.asarray(out).transpose(0, 3, 1, 2), expected.detach().numpy())

    ours = {".".join(str(k) for k in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    theirs = {f"{name}.lora_{ab}": getattr(m, f"lora_{ab}")["default"].weight.grad.numpy()
              for name, m in torch_lora_unet.named_modules() if isinstance(m, LoraLayer) for ab in "AB"}
    assert sorted(ours) == sorted(theirs)
    scale = max(1.0, max(float(np.abs(g).max()) for g in theirs.values()))
    worst = max(float(np.abs(ours[k] - g).max()) for k, g in theirs.items())
    print(f"LoRA gradients: max abs error {worst:.3g} (bound {1e-4 * scale:.3g})")
    assert worst <= 1e-4 * scale


def test_lora_off_is_the_base_model_bit_for_bit(torch_lora_unet, unet_dir, inputs):
    """The trainer's teacher (the LoRA-free graph on the student's base state) computes exactly the separately
    loaded base model, while the student differs (and equals it once its LoRA is detached): the graph says which."""
    base = UNet2DConditionModel.from_pretrained(unet_dir)
    student = UNet2DConditionModel.from_pretrained(unet_dir)
    with_peft_weights(student, peft_weights(torch_lora_unet))
    _, _, base_state = split_lora(student)
    teacher = nnx.merge(nnx.split(base)[0], base_state)
    args = jax_args(inputs)
    expected = np.asarray(unet_forward(base, *args))
    np.testing.assert_array_equal(np.asarray(unet_forward(teacher, *args)), expected)
    assert np.abs(np.asarray(unet_forward(student, *args)) - expected).max() > 1e-3
    detach_lora(student)
    np.testing.assert_array_equal(np.asarray(unet_forward(student, *args)), expected)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (3, 1, 1), (1, 1, 0)])
def test_conv_lora_matches_peft_conv2d(kernel, stride, padding):
    """PEFT Conv2d LoRA: down = conv with the layer's kernel/stride/padding, up = 1x1 conv, times alpha/r."""
    torch.manual_seed(kernel + stride)
    holder = torch.nn.Module()
    holder.conv = torch.nn.Conv2d(6, 10, kernel, stride=stride, padding=padding)
    peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["conv"],
                                                 init_lora_weights=False), holder)
    x = torch.randn(2, 6, 9, 8)
    with torch.no_grad():
        expected = holder.conv(x).numpy()

    class Holder(nnx.Module):
        def __init__(self):
            self.conv = Conv2d(6, 10, kernel, stride=stride, padding=padding, opts=ModelOptions(), rngs=nnx.Rngs(0))

    ours = Holder()
    base = holder.conv.base_layer
    ours.conv.weight.set_value(jnp.asarray(base.weight.detach().numpy()))
    ours.conv.bias.set_value(jnp.asarray(base.bias.detach().numpy()))
    with_peft_weights(ours, peft_weights(holder), targets=["conv"])
    out = np.asarray(ours.conv(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    assert_parity(f"conv LoRA k{kernel} s{stride}", out, expected)
