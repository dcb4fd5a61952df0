"""Primitive layers shared by the UNet, the CLIP text encoders and the VAE.

Why custom layers instead of ``nnx.Linear``/``nnx.Conv``: every parameter is stored under the *PyTorch*
name and layout (``weight`` as (out, in) or OIHW, ``bias``), and modules are named like the diffusers /
transformers modules. A state path joined with '.' is therefore exactly the checkpoint key, which keeps
loading, LoRA export and kohya/diffusers conversion free of hand-written key tables. Activations are NHWC.

LoRA lives on ``Linear`` and ``Conv2d`` as two optional ``LoRAParam`` variables (``lora_A``, ``lora_B``,
PEFT layouts), so ``nnx.split(model, LoRAParam, ...)`` yields the LoRA tree separately from the frozen base.
There is no global LoRA switch: the base model is the same architecture built without LoRA slots (see
``lora.base_graphdef``), which runs on the very same base-weight state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec


class LoRAParam(nnx.Param):
    """A trainable LoRA weight; everything else in a model is a frozen ``nnx.Param``."""


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Numerics and memory policy shared by all layers of a model.

    dtype: compute dtype (activations, matmuls); param_dtype: storage dtype of weights.
    attention_impl: None/'xla'/'cudnn' are passed to ``jax.nn.dot_product_attention`` (None = XLA chooses,
    'cudnn' on GPUs); 'splash' runs the Pallas TPU splash-attention kernel (interpret mode off TPU), see
    ``attention``.
    remat: policy name for gradient checkpointing of resnet/transformer blocks (see ``REMAT_POLICIES``).
    scan_blocks: run the identical transformer blocks of each ``Transformer2DModel`` (and the CLIP encoder
    layers) as one ``lax.scan`` over their stacked weights instead of unrolled, so the compiler sees one block
    per stack, not SDXL's 70 (+ 12 + 32): the compile-time and compile-memory lever for pod-scale programs;
    same math, parameter layout unchanged (``scan_identical``).
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"
    scan_blocks: bool = False


def stats_dtype(dtype):
    """The dtype of normalisation statistics: float32 for bf16/fp16/fp32 activations, float64 for float64 ones
    (a float64 model, as the layout-equality tests run, must not round its norms to float32)."""
    return jnp.promote_types(dtype, jnp.float32)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def checkpointed(fn, remat: str):
    """Wrap a block's forward in ``nnx.remat`` with the named policy ('none' returns it unchanged).

    ``graph_updates=False``: blocks never change the module graph, and propagating graph updates fails
    (TraceContextError) when the model was merged inside ``jax.grad``, as the LoRA trainer does.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    if remat == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[remat], graph_updates=False)


def scan_identical(modules, fn, carry, *args, remat: str = "none", name: str = "layers"):
    """``carry = fn(module, carry, *args)`` for each of ``modules`` in order, as one ``lax.scan`` over their
    states stacked on a new leading axis (``ModelOptions.scan_blocks``). The stack is built per call, so each
    module keeps its own parameters, checkpoint keys and LoRA; the modules must be identical in structure.
    ``remat`` checkpoints the scan body; ``name`` is the modules' attribute, for the error message."""
    graphdef = nnx.graphdef(modules[0])
    states = []
    for i, module in enumerate(modules):
        module_graphdef, state = nnx.split(module)
        if module_graphdef != graphdef:
            raise ValueError(f"model.scan_blocks: {name}.{i} differs in structure from {name}.0 (e.g. a LoRA on "
                             "only some of them); scanning needs identical modules")
        states.append(state)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    def body(c, state):
        return fn(nnx.merge(graphdef, state), c, *args), None

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(body, carry, stacked)[0]


def _param_key(rngs: nnx.Rngs):
    """The key ``rngs.params()`` would return, advancing the same counter.

    flax's in-place counter update probes ``.sharding`` on the new count; under ``nnx.eval_shape`` that is a
    tracer, and JAX answers by scanning the whole trace for an error message, which makes abstract construction
    quadratic in model size (SDXL UNet: 23 s instead of 2 s). Replacing the value avoids the probe.
    """
    stream = rngs.params
    key = jax.random.fold_in(stream.key[...], stream.count[...])
    stream.count.set_value(stream.count[...] + 1)
    return key


def _uniform(key, shape, bound, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class _LoRAMixin:
    """LoRA branch state for Linear/Conv2d; ``attach_lora`` (see lora.py) fills it in."""

    lora_A: LoRAParam | None
    lora_B: LoRAParam | None
    lora_alpha_over_rank: float

    def _init_no_lora(self):
        self.lora_A = nnx.data(None)
        self.lora_B = nnx.data(None)
        self.lora_alpha_over_rank = 0.0

    def _lora_active(self) -> float:
        """The LoRA branch's multiplier, 0 for a layer without one. It is a static attribute (part of the
        graphdef, hence of every jit cache key): which model a compiled function runs is fixed by the graph it
        was traced from, never by state read at trace time."""
        return 0.0 if self.lora_A is None else self.lora_alpha_over_rank


class Linear(nnx.Module, _LoRAMixin):
    """torch.nn.Linear: weight (out, in), optional bias (out,); y = x W^T + b (+ LoRA)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, opts: ModelOptions,
                 rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nnx.Param(_uniform(_param_key(rngs), (out_features, in_features), bound, opts.param_dtype))
        self.bias = nnx.Param(_uniform(_param_key(rngs), (out_features,), bound, opts.param_dtype)) if bias else None
        self.dtype = opts.dtype
        self._init_no_lora()

    def __call__(self, x):
        x = x.astype(self.dtype)
        y = x @ self.weight[...].astype(self.dtype).T
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        scale = self._lora_active()
        if scale:
            h = x @ self.lora_A[...].astype(self.dtype).T
            y = y + scale * (h @ self.lora_B[...].astype(self.dtype).T)
        return y


def _conv(x, w, stride, padding, dtype):
    """NHWC conv with a torch-layout (O, I, kh, kw) kernel, transposed to HWIO in the graph.

    XLA:CPU rewrites only HWIO-kernel convolutions into its fast (YNNPACK) conv; it does that for an OIHW
    kernel at the top level (by transposing a parameter), but not inside a while body (``lax.scan``: the
    sampler loop, gradient accumulation), where an OIHW conv falls back to a naive loop about 8x slower
    (jax-ml/jax#12868). The explicit transpose is the same math and a free layout change elsewhere."""
    pad = [(padding, padding), (padding, padding)]
    return jax.lax.conv_general_dilated(x, w.astype(dtype).transpose(2, 3, 1, 0), (stride, stride), pad,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv2d(nnx.Module, _LoRAMixin):
    """torch.nn.Conv2d on NHWC activations: weight (out, in, kh, kw), symmetric zero padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, bias: bool = True, opts: ModelOptions, rngs: nnx.Rngs):
        fan_in = in_channels * kernel_size * kernel_size
        bound = 1.0 / math.sqrt(fan_in)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = nnx.Param(_uniform(_param_key(rngs), shape, bound, opts.param_dtype))
        self.bias = nnx.Param(_uniform(_param_key(rngs), (out_channels,), bound, opts.param_dtype)) if bias else None
        self.dtype = opts.dtype
        self._init_no_lora()

    def __call__(self, x):
        x = x.astype(self.dtype)
        y = _conv(x, self.weight[...], self.stride, self.padding, self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        scale = self._lora_active()
        if scale:
            # PEFT Conv2d LoRA: down = conv with the layer's kernel/stride/padding, up = 1x1 conv.
            h = _conv(x, self.lora_A[...], self.stride, self.padding, self.dtype)
            y = y + scale * _conv(h, self.lora_B[...], 1, 0, self.dtype)
        return y


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over the channel (last) axis of NHWC or (B, T, C) inputs; statistics in
    ``stats_dtype``."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5, opts: ModelOptions):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups, self.eps, self.dtype = num_groups, eps, opts.dtype
        self.weight = nnx.Param(jnp.ones((num_channels,), opts.param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), opts.param_dtype))

    def __call__(self, x):
        # Two-pass mean/variance per (example, group), reduced first over positions per channel (one plain
        # column reduction of (B, T, C)) and then over the group's channels: the same statistics as reducing
        # (B, T, G, C/G) over axes (1, 3) at once, which XLA:CPU runs 3-9x slower at VAE sizes.
        shape, g = x.shape, self.num_groups
        b, c = shape[0], shape[-1]
        f = stats_dtype(x.dtype)
        x3 = x.astype(f).reshape(b, -1, c)
        n = x3.shape[1] * (c // g)

        def group_mean(per_channel_sum):  # (B, C) -> (B, 1, C): each channel gets its group's mean
            return jnp.repeat(per_channel_sum.reshape(b, g, c // g).sum(-1) / n, c // g, axis=-1)[:, None]

        centered = x3 - group_mean(x3.sum(1))
        var = group_mean(jnp.square(centered).sum(1))
        scale = jax.lax.rsqrt(var + self.eps) * self.weight[...].astype(f)
        y = centered * scale + self.bias[...].astype(f)
        return y.reshape(shape).astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis; statistics in ``stats_dtype``."""

    def __init__(self, dim: int, *, eps: float = 1e-5, elementwise_affine: bool = True, opts: ModelOptions):
        self.eps, self.dtype = eps, opts.dtype
        self.weight = nnx.Param(jnp.ones((dim,), opts.param_dtype)) if elementwise_affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), opts.param_dtype)) if elementwise_affine else None

    def __call__(self, x):
        f = stats_dtype(x.dtype)
        xf = x.astype(f)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight[...].astype(f) + self.bias[...].astype(f)
        return y.astype(self.dtype)


class Embedding(nnx.Module):
    """torch.nn.Embedding: weight (num, dim)."""

    def __init__(self, num: int, dim: int, *, opts: ModelOptions, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(_param_key(rngs), (num, dim), opts.param_dtype))
        self.dtype = opts.dtype

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)


class Placeholder(nnx.Module):
    """A parameter-free slot that keeps list indices aligned with PyTorch (e.g. Dropout in ``to_out``)."""

    def __call__(self, x):
        return x


# Whether the 'splash' attention kernel runs in Pallas interpret mode. None (the default) decides per call
# (``_splash_interpret``). Tests or a debugging session may set it to True/False.
SPLASH_INTERPRET: bool | None = None
SPLASH_BLOCK_SIZES = (512, 256, 128)  # tried in this order; lengths are padded to a multiple of the last


def _splash_interpret(mesh: jax.sharding.AbstractMesh) -> bool:
    """Interpret mode unless the program is built for TPU: the platform of the context ``mesh``'s devices where
    one is set (so a TPU topology compiled on a CPU host gets the real Mosaic kernel), else the default backend."""
    if SPLASH_INTERPRET is not None:
        return bool(SPLASH_INTERPRET)
    device = None if mesh.empty else mesh.abstract_device
    return (jax.default_backend() if device is None else device.platform) != "tpu"


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, tq: int, tk: int, causal: bool, interpret: bool):
    """The splash MHA kernel for one (heads, padded tq, padded tk, causal) shape, with forward and backward
    block sizes set (so ``jax.grad`` runs the Pallas dq/dkv kernels too). Built under
    ``ensure_compile_time_eval`` so the cached mask-info arrays are constants, never tracers of the trace that
    first asked for them."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sam

    bq = next(b for b in SPLASH_BLOCK_SIZES if tq % b == 0)
    bk = next(b for b in SPLASH_BLOCK_SIZES if tk % b == 0)
    sizes = sak.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                           block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    head_mask = sam.CausalMask((tq, tk)) if causal else sam.FullMask((tq, tk))
    with jax.ensure_compile_time_eval():
        return sak.make_splash_mha(sam.MultiHeadMask([head_mask] * heads), block_sizes=sizes, head_shards=1,
                                   q_seq_shards=1, interpret=interpret)


def _splash_attention(q, k, v, *, is_causal: bool):
    """Splash attention on (B, T, N, H) q and (B, S, N, H) k/v; returns (B, T, N, H) in q's dtype.

    A Mosaic kernel cannot be partitioned by XLA, so under a context mesh (``jax.sharding.get_abstract_mesh``,
    entered by ``training.sharding.traced_on``) the kernel runs in a ``shard_map``: the batch split over every
    mesh axis, each device running it on its own examples with all heads. A batch the mesh does not divide (one
    image on 8 devices) runs whole on every device (replicated in and out: the same kernel and numbers, the
    work repeated per device). Without a mesh (one device, tests) it is the kernel vmapped over the batch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_splash_local, is_causal=is_causal, interpret=_splash_interpret(mesh))
    if mesh.empty:
        return local(q, k, v)
    spec = PartitionSpec(mesh.axis_names) if q.shape[0] % mesh.size == 0 else PartitionSpec()
    # check_vma=False: the Pallas kernel's output shapes carry no varying-axes annotation.
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


def _splash_local(q, k, v, *, is_causal: bool, interpret: bool):
    """``_splash_attention`` on the examples one device holds.

    The kernel takes (heads, seq, head_dim) per example (vmapped over the batch) and does not scale the logits,
    so q is multiplied by 1/sqrt(H) here (in fp32, then cast back to q's dtype; exact for H = 64 in bf16). Logits,
    softmax and the output accumulator are fp32 inside the kernel, as in ``jax.nn.dot_product_attention``.
    T and S are zero-padded to a multiple of 128 (the smallest block). Padded keys get segment id 1 and every
    query segment id 0, so no query attends to them; padded queries attend to the real keys (never an empty
    row) and their outputs are sliced off. Causal masking is the kernel's ``CausalMask`` (top-left aligned,
    like ``is_causal`` of ``jax.nn.dot_product_attention``).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak

    b, tq, n, hd = q.shape
    tk = k.shape[1]
    last = SPLASH_BLOCK_SIZES[-1]
    tqp, tkp = -(-tq // last) * last, -(-tk // last) * last
    scale = 1.0 / math.sqrt(hd)
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    # (B, T, N, H) -> (B, N, T, H), sequence padded at the end.
    q, k, v = (jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, p - x.shape[1]), (0, 0)))
               for x, p in ((q, tqp), (k, tkp), (v, tkp)))
    kernel = _splash_kernel(n, tqp, tkp, bool(is_causal), interpret)
    if tkp != tk:
        seg = sak.SegmentIds(q=jnp.zeros((tqp,), jnp.int32), kv=(jnp.arange(tkp) >= tk).astype(jnp.int32))
        out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, seg)
    else:
        out = jax.vmap(kernel)(q, k, v)
    return out[:, :, :tq].transpose(0, 2, 1, 3)


def attention(q, k, v, *, heads: int, impl: str | None, mask=None, is_causal: bool = False):
    """Multi-head scaled dot-product attention on (B, T, heads*head_dim) tensors.

    ``impl`` None/'xla'/'cudnn' runs ``jax.nn.dot_product_attention`` (a GPU can select cuDNN flash attention).
    ``impl='splash'`` runs the Pallas TPU splash-attention kernel (``_splash_attention``; any T, S and
    head_dim, lengths padded to the block size), in Pallas interpret mode off TPU (see ``_splash_interpret``) so
    CPU tests exercise the same kernel code; under a context mesh, in a ``shard_map`` over the batch. An explicit
    ``mask`` is not expressed in splash's static masks: such a call falls back to XLA attention (no call site in
    this package passes one today).
    """
    b, tq, d = q.shape
    tk = k.shape[1]
    hd = d // heads
    q = q.reshape(b, tq, heads, hd)
    k = k.reshape(b, tk, heads, hd)
    v = v.reshape(b, tk, heads, hd)
    if impl == "splash" and mask is None:
        out = _splash_attention(q, k, v, is_causal=is_causal)
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                           implementation=None if impl == "splash" else impl)
    return out.reshape(b, tq, d)


def silu(x):
    return jax.nn.silu(x)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def state_key(path) -> str:
    """The PyTorch checkpoint key of an nnx state path: ('down_blocks', 0, 'resnets', 0, 'conv1', 'weight')
    -> 'down_blocks.0.resnets.0.conv1.weight'."""
    return ".".join(str(getattr(p, "key", p)) for p in path)
