"""Mechanics of the FID Inception extractor on a random-init network (no weights can be downloaded here)."""

import numpy as np
import pytest
import torch

from tdd_jax.evaluation import metrics
from tdd_jax.evaluation.features import make_extractor
from tdd_jax.evaluation.inception import FEATURE_DIM, FIDInceptionV3, InceptionExtractor


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for module in model.modules():  # non-trivial BN statistics, so loading them is visible in the output
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_state_dict_names_follow_torchvision_inception3(weights):
    keys = set(weights[1].state_dict())
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch_pool.conv.weight",
                "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7a.branch7x7x3_4.conv.weight",
                "Mixed_7c.branch3x3dbl_3b.conv.weight", "fc.weight", "fc.bias"):
        assert key in keys
    assert weights[1].fc.weight.shape == (1008, 2048)


def test_loaded_weights_give_the_saved_networks_features(weights):
    path, model = weights
    extractor = make_extractor("inception", str(path))
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    features = extractor.features(images)
    assert features.shape == (2, FEATURE_DIM)
    with torch.no_grad():
        expected = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(features, InceptionExtractor(None).features(images))  # the file mattered
    assert abs(metrics.fid(features, features)) < 1e-6


def test_wrong_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs --weights"):
        make_extractor("inception")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        InceptionExtractor(tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="missing keys"):
        InceptionExtractor(tmp_path / "other.pth")
