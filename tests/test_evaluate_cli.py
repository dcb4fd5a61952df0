"""python -m tdd_jax.evaluate on sample folders in tdd_jax.sample's layout, with the shipped emoji classifier."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tdd_jax import evaluate
from tdd_jax.cli import UserError
from tdd_jax.data import emoji
from tdd_jax.data.emoji import build_emoji_dataset, load_emoji
from tdd_jax.evaluation import metrics

pytestmark = pytest.mark.skipif(
    not (os.path.exists(emoji.EMOJI_FONT) and os.path.exists(emoji.EMOJI_TEST_FILE)),
    reason="needs the Debian packages of launch/setup_system.sh")

GROUP = "Food & Drink"


def write_samples(folder, images, captions, tag):
    """A folder as tdd_jax.sample writes it; ``tag`` stands in for the settings digest in the file names."""
    folder.mkdir(parents=True)
    with open(folder / evaluate.METADATA, "w") as f:
        for i, (image, caption) in enumerate(zip(images, captions)):
            name = f"{i:05d}_{tag}.png"
            Image.fromarray(image).save(folder / name)
            f.write(json.dumps({"index": i, "file": name, "prompt": str(caption), "seed": 100 + i}) + "\n")
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data_dir = str(root / "tfds")
    build_emoji_dataset(data_dir)
    data = load_emoji(data_dir, "train", groups=(GROUP,))
    images, captions = data["images"][:60], data["captions"][:60]
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 40, images.shape), 0, 255).astype(np.uint8)
    reference = root / "reference"
    reference.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(reference / f"{i}.png")
    return {"data_dir": data_dir, "clean": write_samples(root / "clean", images, captions, "aaaa"),
            "noisy": write_samples(root / "noisy", noisy, captions, "bbbb"), "reference": str(reference),
            "root": root, "images": images, "noisy_images": noisy}


def test_cli_reports_fid_kid_accuracy_and_teacher_distance(folders, capsys):
    out = folders["root"] / "results.json"
    npz = folders["root"] / "ref.npz"
    evaluate.main(["--samples", folders["clean"], "--samples", folders["noisy"], "--reference",
                   folders["reference"], "--teacher", folders["clean"], "--out", str(out),
                   "--save_reference", str(npz)])
    results = json.loads(out.read_text())
    clean, noisy = results[folders["clean"]], results[folders["noisy"]]
    assert clean["images"] == noisy["images"] == 60
    assert clean["fid"] < 1e-6 and noisy["fid"] > 1e-3  # the reference is the clean images themselves
    assert noisy["kid"] > clean["kid"] + 3 * noisy["kid_std"]
    assert clean["prompt_accuracy"] > 0.6 and clean["prompt_accuracy"] >= noisy["prompt_accuracy"]
    assert clean["teacher_mean_abs_delta"] == 0.0
    # Matched by (prompt, seed) although the file names differ; the value is the plain per-pixel mean.
    expected = np.abs(folders["noisy_images"].astype(float) - folders["images"]).mean() / 255
    np.testing.assert_allclose(noisy["teacher_mean_abs_delta"], expected, rtol=1e-12)
    assert "| samples | images | fid |" in capsys.readouterr().out
    # The saved statistics give the same FID and KID as the image folder they came from.
    again = evaluate.evaluate_folders([folders["noisy"]], str(npz))[folders["noisy"]]
    np.testing.assert_allclose(again["fid"], noisy["fid"], rtol=1e-6)
    np.testing.assert_allclose(again["kid"], noisy["kid"], rtol=1e-5)
    np.testing.assert_allclose(metrics.load_statistics(npz)["mu"].shape, (128,))


def test_emoji_reference_and_pytorch_fid_npz_without_features(folders, tmp_path):
    results = evaluate.evaluate_folders([folders["clean"]], "emoji", data_dir=folders["data_dir"],
                                        emoji_groups=(GROUP,), save_reference=str(tmp_path / "ref.npz"))
    assert results[folders["clean"]]["fid"] > 0  # 60 of the group's images against all of them
    stats = metrics.load_statistics(tmp_path / "ref.npz")
    np.savez(tmp_path / "pf.npz", mu=stats["mu"], sigma=stats["sigma"])  # what pytorch-fid saves: no features
    result = evaluate.evaluate_folders([folders["clean"]], str(tmp_path / "pf.npz"))[folders["clean"]]
    assert "kid" not in result
    np.testing.assert_allclose(result["fid"], results[folders["clean"]]["fid"], rtol=1e-6)


def test_input_errors_name_the_problem(folders, tmp_path):
    with pytest.raises(UserError, match="metadata.jsonl"):
        evaluate.read_samples(tmp_path)
    with pytest.raises(UserError, match="neither"):
        evaluate.evaluate_folders([folders["clean"]], str(tmp_path / "nothing"))
    other = write_samples(tmp_path / "other", folders["images"][:2], ["grinning face", "red apple"], "cccc")
    with pytest.raises(UserError, match="no sample for"):
        evaluate.teacher_images(other, evaluate.read_samples(folders["clean"])[1])
