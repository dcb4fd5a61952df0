"""The Noto colour emoji dataset: parsing, rendering, the full TFDS build (3,655 examples) and its use by the loader."""

import os
import time

import numpy as np
import pytest

from tdd_jax.data import build_emoji_dataset, default_data_config, load_emoji, make_train_iterator
from tdd_jax.data import emoji

pytestmark = pytest.mark.skipif(
    not (os.path.exists(emoji.EMOJI_FONT) and os.path.exists(emoji.EMOJI_TEST_FILE)),
    reason="needs the Debian packages of launch/setup_system.sh")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    build_emoji_dataset(path)
    return path


def test_emoji_test_file_parsing():
    entries = emoji.read_emoji_test()
    assert len(entries) == 3655
    assert len({e.name for e in entries}) == 3655  # CLDR names are unique: captions identify the emoji.
    assert (entries[0].codepoints, entries[0].name, entries[0].group, entries[0].subgroup) == (
        "1F600", "grinning face", "Smileys & Emotion", "face-smiling")
    by_codepoints = {e.codepoints: e for e in entries}
    assert by_codepoints["1F1EF 1F1F5"].name == "flag: Japan"
    assert by_codepoints["0023 FE0F 20E3"].name == "keycap: #"
    assert len({e.group for e in entries}) == 9  # "Component" has no fully-qualified emoji.


def test_render_crops_centres_and_resizes():
    font = emoji.load_font()
    entries = {e.codepoints: e for e in emoji.read_emoji_test()}
    for codepoints in ("1F600", "1F468 200D 1F469 200D 1F467", "1F1EF 1F1F5", "2757"):
        image = np.asarray(emoji.render_emoji(font, entries[codepoints], 32))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert (image < 250).any(axis=-1).mean() > 0.15  # Mostly glyph, not an empty white square.
    # "❗" is tall and thin: centred, with white margins left and right after squaring.
    tall = np.asarray(emoji.render_emoji(font, entries["2757"], 32))
    assert (tall[:, :4] >= 250).all() and (tall[:, -4:] >= 250).all()


def test_full_build_counts_splits_and_labels(data_dir):
    builder = emoji.emoji_builder(data_dir)
    splits = builder.info.splits
    assert splits["train"].num_examples + splits["test"].num_examples == 3655
    assert splits["test"].num_examples == 173  # The fixed crc32 held-out set (~4.7%).
    features = builder.info.features
    assert features["group"].num_classes == 9 and features["subgroup"].num_classes > 90
    test = load_emoji(data_dir, "test")
    assert test["images"].shape == (173, 64, 64, 3) and test["images"].dtype == np.uint8
    assert all(emoji.EmojiEntry(c, n, g, s).split == "test" for c, n, g, s in
               zip(test["codepoints"], test["captions"], test["groups"], test["subgroups"]))
    assert list(test["codepoints"]) == sorted(test["codepoints"])


def test_build_is_idempotent(data_dir):
    files = sorted(os.listdir(emoji.emoji_builder(data_dir).data_dir))
    start = time.perf_counter()
    build_emoji_dataset(data_dir)
    assert time.perf_counter() - start < 2.0
    assert sorted(os.listdir(emoji.emoji_builder(data_dir).data_dir)) == files


def test_emoji_source_through_the_loader(data_dir):
    cfg = default_data_config()
    cfg.update(dict(source="emoji", path=data_dir, resolution=64, batch_size=16, random_flip=True))
    batch = next(make_train_iterator(cfg, process_index=0, process_count=1))
    assert batch["pixels"].shape == (16, 64, 64, 3)
    np.testing.assert_array_equal(batch["time_ids"][:, [0, 1, 2, 4, 5]], [[64, 64, 0, 64, 64]] * 16)
    names = {e.name for e in emoji.read_emoji_test()}
    assert set(batch["captions"]) <= names
    cfg.update(dict(split="test", num_epochs=1, drop_remainder=False, batch_size=50))
    held_out = [c for b in make_train_iterator(cfg, process_index=0, process_count=1) for c in b["captions"]]
    assert sorted(held_out) == sorted(load_emoji(data_dir, "test")["captions"])


def test_group_selection(data_dir):
    """data.emoji_groups keeps just those groups (the tiny teacher's), in the loader and in load_emoji; a name
    that is not a group is an error naming the field."""
    flags = load_emoji(data_dir, "train", groups=("Flags",))
    assert 200 < len(flags["captions"]) < 300 and set(flags["groups"]) == {"Flags"}
    cfg = default_data_config()
    cfg.update(dict(source="emoji", path=data_dir, resolution=64, batch_size=8, emoji_groups=("Flags",),
                    num_epochs=1, drop_remainder=False))
    seen = [c for b in make_train_iterator(cfg, process_index=0, process_count=1) for c in b["captions"]]
    assert sorted(seen) == sorted(flags["captions"])
    cfg.emoji_groups = ("Flags", "Flag")
    with pytest.raises(ValueError, match=r"data.emoji_groups.*\['Flag'\] are not emoji groups"):
        make_train_iterator(cfg, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"groups.*\['Smileys'\] are not emoji groups"):
        load_emoji(data_dir, "train", groups=("Smileys",))


def test_loader_batch_matches_the_compiled_step_spec(data_dir, tiny_pipeline_dir):
    """The trainer compiles its step from ``step.batch_spec`` before any data arrives: the loader's real batch
    must match it, and a batch of another size is refused naming the field."""
    from configs.tdd_tiny import get_config
    from tdd_jax.models.loading import read_config
    from tdd_jax.training.loop import SPEC_COMPONENTS, tokenizer_fn
    from tdd_jax.training.step import batch_kind, batch_spec, check_batch, select_batch

    cfg = get_config("tdd")
    cfg.data.path = data_dir
    tokenize = tokenizer_fn(tiny_pipeline_dir)
    batch = select_batch(next(make_train_iterator(cfg.data, tokenize=tokenize, process_index=0, process_count=1)))
    configs = {name: read_config(os.path.join(tiny_pipeline_dir, name)) for name in SPEC_COMPONENTS}
    spec = batch_spec(cfg, configs, batch_kind(cfg))
    assert sorted(spec) == sorted(batch)
    check_batch(batch, spec)
    cfg.resolution = 2 * cfg.resolution
    with pytest.raises(ValueError, match=r"pixels: \(16, 64, 64, 3\) uint8 \(expected \(16, 128, 128, 3\) uint8\)"):
        check_batch(batch, batch_spec(cfg, configs, batch_kind(cfg)))
