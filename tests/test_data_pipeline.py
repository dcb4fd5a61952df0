"""Readers, the training iterator and the cache: sharding, resume, skipped files, errors, round trips."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from absl import flags
from PIL import Image

from tdd_jax.data import (CacheSource, TrainIterator, default_data_config, make_train_iterator,
                          validate_data_config, write_cache)
from tdd_jax.data.sources import expand_braces, list_shards


def _jpeg(index: int, width: int = 40, height: int = 30) -> bytes:
    rng = np.random.default_rng(index)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _good_sample(key: str, index: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", _jpeg(index)), (f"{key}.txt", f"caption {key}".encode())]


# One of each kind of bad sample, and what the loader must count for it.
_BAD_SAMPLES = [
    ("trunc.jpg", _jpeg(100)[:200]), ("trunc.txt", b"truncated jpeg"),
    ("notimg.jpg", b"<html>not an image</html>"), ("notimg.txt", b"an html page"),
    ("nocap.jpg", _jpeg(101)),
    ("noimg.txt", b"a caption without image"),
    ("badjson.png", _jpeg(102)), ("badjson.json", json.dumps({"url": "x"}).encode()),
    ("tiny.jpg", _jpeg(103, 8, 8)), ("tiny.txt", b"too small"),
]
_BAD_COUNTS = {"decode_error": 2, "missing_caption": 2, "missing_image": 1, "too_small": 1, "read_error": 0}


def _webdataset(root, num_shards: int, per_shard: int, bad: bool = False) -> str:
    os.makedirs(root, exist_ok=True)
    for s in range(num_shards):
        members = [m for i in range(per_shard) for m in _good_sample(f"s{s}_{i:03d}", s * 100 + i)]
        if s == 0:  # The .json caption form (text field), in a subdirectory.
            members += [("sub/j.webp", _jpeg(999)), ("sub/j.json", json.dumps({"text": "json caption"}).encode())]
        if bad and s == 1:
            members += _BAD_SAMPLES
        _write_tar(os.path.join(root, f"shard-{s:05d}.tar"), members)
    return os.path.join(root, f"shard-{{00000..{num_shards - 1:05d}}}.tar")


def _folder(root, count: int, bad: bool = False) -> str:
    for i in range(count):
        directory = os.path.join(root, f"d{i % 3}")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"img{i:03d}.jpg"), "wb") as f:
            f.write(_jpeg(i))
        with open(os.path.join(directory, f"img{i:03d}.txt"), "w") as f:
            f.write(f"caption {i}")
    if bad:
        for name, data in _BAD_SAMPLES:
            if not name.endswith(".json"):  # Folders use .txt captions only: badjson.png counts as no caption.
                with open(os.path.join(root, name), "wb") as f:
                    f.write(data)
    return str(root)


def _config(source: str, path: str, **overrides):
    cfg = default_data_config()
    cfg.update(dict(source=source, path=path, resolution=16, batch_size=4, min_image_size=10, num_threads=2,
                    prefetch_buffer_size=8))
    cfg.update(overrides)
    return cfg


def _take(iterator: TrainIterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def _one_epoch_keys(cfg, process_index: int, process_count: int) -> list[str]:
    iterator = make_train_iterator(cfg, process_index=process_index, process_count=process_count)
    return [k for batch in iterator for k in batch["keys"]]


def _assert_batches_equal(expected: list[dict], actual: list[dict]) -> None:
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_expand_braces_and_list_shards(tmp_path):
    assert expand_braces("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    pattern = _webdataset(tmp_path, 3, 1)
    assert [os.path.basename(p) for p in list_shards(pattern)] == [f"shard-{i:05d}.tar" for i in range(3)]
    assert list_shards(str(tmp_path / "*.tar")) == list_shards(pattern)


def test_batch_layout_and_tokenize(tmp_path):
    def tokenize(captions):
        return {"input_ids": np.array([[len(c)] * 77 for c in captions], np.int32),
                "input_ids_2": np.zeros((len(captions), 77), np.int32)}

    cfg = _config("webdataset", _webdataset(tmp_path, 2, 3), random_flip=True)
    batch = next(make_train_iterator(cfg, tokenize=tokenize, process_index=0, process_count=1))
    assert batch["pixels"].shape == (4, 16, 16, 3) and batch["pixels"].dtype == np.uint8  # 4x fewer bytes
    assert batch["time_ids"].shape == (4, 6) and batch["time_ids"].dtype == np.float32
    np.testing.assert_array_equal(batch["time_ids"][:, [0, 1, 4, 5]], [[30, 40, 16, 16]] * 4)
    assert batch["captions"].dtype == object and all(isinstance(c, str) for c in batch["captions"])
    np.testing.assert_array_equal(batch["input_ids"][:, 0], [len(c) for c in batch["captions"]])
    assert batch["input_ids_2"].shape == (4, 77)



def test_fixed_time_ids_replace_the_real_size_and_crop(tmp_path):
    """data.fixed_time_ids (the official run's --use_fix_crop_and_size): the same images and crops, but every
    example claims an uncropped R x R original; off, the 40x30 originals' real geometry is kept."""
    cfg = _config("webdataset", _webdataset(tmp_path, 2, 3), random_flip=True)
    real = _take(make_train_iterator(cfg, process_index=0, process_count=1), 2)
    cfg.fixed_time_ids = True
    fixed = _take(make_train_iterator(cfg, process_index=0, process_count=1), 2)
    for r, f in zip(real, fixed):
        np.testing.assert_array_equal(r["pixels"], f["pixels"])
        np.testing.assert_array_equal(r["keys"], f["keys"])
        np.testing.assert_array_equal(r["time_ids"][:, [0, 1, 4, 5]], [[30, 40, 16, 16]] * 4)
        np.testing.assert_array_equal(f["time_ids"], [[16, 16, 0, 0, 16, 16]] * 4)
        assert f["time_ids"].dtype == np.float32

@pytest.mark.parametrize("source", ["folder", "webdataset"])
def test_processes_read_disjoint_shards_covering_the_data(tmp_path, source):
    path = _folder(tmp_path, 11) if source == "folder" else _webdataset(tmp_path, 4, 3)
    cfg = _config(source, path, num_epochs=1, drop_remainder=False)
    everything = _one_epoch_keys(cfg, 0, 1)
    assert len(everything) == len(set(everything)) == (11 if source == "folder" else 13)
    parts = [_one_epoch_keys(cfg, p, 2) for p in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(everything)


def _global_batches(cfg, process_count: int, n: int, state: dict | None = None) -> list[dict]:
    """The first ``n`` global batches as ``process_count`` processes see them, slices concatenated in order."""
    iterators = [make_train_iterator(cfg, process_index=p, process_count=process_count)
                 for p in range(process_count)]
    if state is not None:
        for it in iterators:
            it.set_state(state)
    out = []
    for _ in range(n):
        slices = [next(it) for it in iterators]
        out.append({k: np.concatenate([s[k] for s in slices]) for k in slices[0]})
    return out


@pytest.mark.parametrize("source", ["folder", "webdataset"])
def test_global_batches_do_not_depend_on_the_process_count(tmp_path, source):
    """Several epochs of different images, with unusable files among them (replaced, not shifting the order)."""
    path = _folder(tmp_path, 11, bad=True) if source == "folder" else _webdataset(tmp_path, 3, 4, bad=True)
    cfg = _config(source, path, batch_size=4, random_flip=True)
    one = _global_batches(cfg, 1, 9)
    for count in (2, 4):
        _assert_batches_equal(one, _global_batches(cfg, count, 9))
    pixels = np.concatenate([b["pixels"] for b in one])
    assert pixels.dtype == np.uint8
    assert len({p.tobytes() for p in pixels[:4]}) == 4  # real, different images in one batch
    assert len({k for b in one for k in b["keys"]}) >= 10


def test_resume_on_another_process_count_continues_with_the_same_examples(tmp_path):
    cfg = _config("webdataset", _webdataset(tmp_path, 3, 4, bad=True), batch_size=4, random_flip=True)
    expected = _global_batches(cfg, 1, 8)
    two = [make_train_iterator(cfg, process_index=p, process_count=2) for p in range(2)]
    for it in two:
        _take(it, 3)
    states = [json.loads(json.dumps(it.get_state())) for it in two]
    assert states[0]["global_batches"] == states[1]["global_batches"] == 3
    for state in states:  # either process's saved state resumes a one-process run, and a four-process one
        _assert_batches_equal(expected[3:], _global_batches(cfg, 1, 5, state))
    _assert_batches_equal(expected[3:], _global_batches(cfg, 4, 5, states[0]))


def test_epochs_are_reshuffled(tmp_path):
    cfg = _config("folder", _folder(tmp_path, 12), num_epochs=2)
    keys = _one_epoch_keys(cfg, 0, 1)
    assert sorted(keys[:12]) == sorted(keys[12:]) and keys[:12] != keys[12:]


def test_order_is_deterministic_and_independent_of_threads(tmp_path):
    path = _webdataset(tmp_path, 2, 5, bad=True)
    one = _take(make_train_iterator(_config("webdataset", path, random_flip=True, num_threads=1),
                                    process_index=0, process_count=1), 6)
    many = _take(make_train_iterator(_config("webdataset", path, random_flip=True, num_threads=4),
                                     process_index=0, process_count=1), 6)
    _assert_batches_equal(one, many)
    other_seed = _take(make_train_iterator(_config("webdataset", path, seed=1),
                                           process_index=0, process_count=1), 6)
    assert [list(b["keys"]) for b in one] != [list(b["keys"]) for b in other_seed]


@pytest.mark.parametrize("process_index", [0, 1])
def test_resume_gives_the_same_next_batches(tmp_path, process_index):
    cfg = _config("webdataset", _webdataset(tmp_path, 2, 5, bad=True), random_flip=True, batch_size=6)
    straight = make_train_iterator(cfg, process_index=process_index, process_count=2)
    expected = _take(straight, 12)  # Several epochs of a ~7-example shard.

    first = make_train_iterator(cfg, process_index=process_index, process_count=2)
    _take(first, 5)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    resumed = make_train_iterator(cfg, process_index=process_index, process_count=2)
    resumed.set_state(state)
    _assert_batches_equal(expected[5:], _take(resumed, 7))
    assert resumed.stats == straight.stats


def test_resume_under_a_different_order_is_refused(tmp_path):
    path = _folder(tmp_path, 6)
    state = make_train_iterator(_config("folder", path), process_index=0, process_count=1).get_state()
    other = make_train_iterator(_config("folder", path, seed=3), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


@pytest.mark.parametrize("source", ["folder", "webdataset"])
def test_bad_files_are_skipped_and_counted(tmp_path, source):
    path = _folder(tmp_path, 5, bad=True) if source == "folder" else _webdataset(tmp_path, 2, 2, bad=True)
    iterator = make_train_iterator(_config(source, path, num_epochs=1, drop_remainder=False),
                                   process_index=0, process_count=1)
    keys = [k for batch in iterator for k in batch["keys"]]
    assert len(keys) == 5
    stats = iterator.stats
    expected = dict(_BAD_COUNTS)
    if source == "folder":  # No caption-only "noimg" sample in a folder; "badjson.png" has no .txt.
        expected["missing_image"] = 0
    assert stats["skipped"] == expected
    assert stats["skipped_total"] == sum(expected.values()) and stats["examples"] == 5


def test_damaged_tar_keeps_its_readable_samples(tmp_path, caplog):
    pattern = _webdataset(tmp_path, 1, 4)
    shard = list_shards(pattern)[0]
    with open(shard, "rb") as f:
        data = f.read()
    with open(shard, "wb") as f:  # Cut inside the third sample's image.
        f.write(data[:4 * 512 + 2 * len(_jpeg(0)) + 1000])
    iterator = make_train_iterator(_config("webdataset", pattern, num_epochs=1, drop_remainder=False),
                                   process_index=0, process_count=1)
    keys = [k for batch in iterator for k in batch["keys"]]
    assert sorted(keys) == ["shard-00000.tar/s0_000", "shard-00000.tar/s0_001"]
    assert "shard-00000.tar is damaged after 2 samples" in caplog.text


def test_all_examples_skipped_is_an_error_not_a_hang(tmp_path):
    os.makedirs(tmp_path / "d")
    for i in range(3):
        with open(tmp_path / "d" / f"{i}.jpg", "wb") as f:
            f.write(_jpeg(i))  # No captions at all.
    iterator = make_train_iterator(_config("folder", str(tmp_path / "d")), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="were skipped"):
        next(iterator)


@pytest.mark.parametrize("source, error", [
    ("folder", FileNotFoundError), ("webdataset", FileNotFoundError), ("cache", FileNotFoundError),
])
def test_missing_path_is_a_clear_error(tmp_path, source, error):
    path = str(tmp_path / "no" / "such" / ("*.tar" if source == "webdataset" else "dir"))
    with pytest.raises(error, match="no/such"):
        make_train_iterator(_config(source, path), process_index=0, process_count=1)


def test_empty_folder_is_an_error(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no images"):
        make_train_iterator(_config("folder", str(tmp_path / "empty")), process_index=0, process_count=1)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 5, "data.batch_size=5"),
    ("source", "hdf5", "data.source='hdf5'"),
    ("interpolation", "nearest", "data.interpolation"),
    ("path", "", "data.path=''"),
])
def test_bad_config_names_the_field(field, value, message):
    cfg = _config("folder", "/x")
    cfg[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate_data_config(cfg, process_count=2)


def test_unknown_config_field_is_named():
    cfg = _config("folder", "/x")
    cfg.unlock()
    cfg.resoluton = 64
    with pytest.raises(ValueError, match="data.resoluton"):
        validate_data_config(cfg, process_count=1)


def _encode(batch):
    """Stand-in for VAE + text encoders: deterministic functions of pixels and captions."""
    pixels = batch["pixels"].astype(np.float32) / 127.5 - 1.0  # uint8 from the loader, as the VAE maps them
    return {"latents": pixels[:, ::4, ::4, :].repeat(2, -1)[..., :4],
            "prompt_embeds": np.stack([np.full((77, 8), len(c), np.float32) for c in batch["captions"]]),
            "pooled_prompt_embeds": pixels.mean(axis=(1, 2)).astype(np.float16)}


def _expected_cache(path: str) -> dict[str, dict]:
    cfg = _config("folder", path, num_epochs=1, drop_remainder=False, shuffle=False, center_crop=True)
    expected = {}
    for batch in make_train_iterator(cfg, process_index=0, process_count=1):
        encoded = _encode(batch)
        for i, key in enumerate(batch["keys"]):
            expected[key] = {"time_ids": batch["time_ids"][i], "caption": batch["captions"][i],
                             **{k: v[i] for k, v in encoded.items()}}
    return expected


def test_cache_round_trip_sharding_and_resume(tmp_path):
    images = _folder(tmp_path / "images", 10, bad=True)
    expected = _expected_cache(images)
    cache_dir = str(tmp_path / "cache")
    pixel_cfg = _config("folder", images, num_epochs=1, drop_remainder=False, shuffle=False, batch_size=6,
                        center_crop=True)
    for p in range(2):  # Two writer processes, each with its own pixel shard.
        batches = make_train_iterator(pixel_cfg, process_index=p, process_count=2)
        index = write_cache(batches, _encode, cache_dir, num_shards=2, process_index=p, process_count=2)
        assert index["num_examples"] == 5 and index["features"]["latents"] == {"shape": [4, 4, 4],
                                                                               "dtype": "<f4"}
    assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]
    assert len(CacheSource(cache_dir)) == 10

    cfg = _config("cache", cache_dir, batch_size=4)
    seen = {}
    for batch in _take(make_train_iterator(cfg, process_index=0, process_count=1), 5):
        assert batch["latents"].shape == (4, 4, 4, 4) and batch["prompt_embeds"].shape == (4, 77, 8)
        for i, key in enumerate(batch["keys"]):
            seen[key] = {k: batch[k if k != "caption" else "captions"][i] for k in expected[key]}
    assert seen.keys() == expected.keys()
    for key, fields in expected.items():
        for name, value in fields.items():
            np.testing.assert_array_equal(seen[key][name], value, err_msg=f"{key}/{name}")

    one = _one_epoch_keys(_config("cache", cache_dir, num_epochs=1, drop_remainder=False), 0, 2)
    two = _one_epoch_keys(_config("cache", cache_dir, num_epochs=1, drop_remainder=False), 1, 2)
    assert not set(one) & set(two) and set(one) | set(two) == expected.keys()

    fixed = next(make_train_iterator(_config("cache", cache_dir, batch_size=4, fixed_time_ids=True),
                                     process_index=0, process_count=1))  # applied to cached examples too
    np.testing.assert_array_equal(fixed["time_ids"], [[16, 16, 0, 0, 16, 16]] * 4)

    straight = _take(make_train_iterator(cfg, process_index=0, process_count=1), 6)
    first = make_train_iterator(cfg, process_index=0, process_count=1)
    _take(first, 2)
    resumed = make_train_iterator(cfg, process_index=0, process_count=1)
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    _assert_batches_equal(straight[2:], _take(resumed, 4))


def test_incomplete_cache_is_an_error(tmp_path):
    images = _folder(tmp_path / "images", 4)
    pixel_cfg = _config("folder", images, num_epochs=1, drop_remainder=False, batch_size=2)
    batches = make_train_iterator(pixel_cfg, process_index=0, process_count=2)
    write_cache(batches, _encode, str(tmp_path / "cache"), 1, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="incomplete"):
        CacheSource(str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="index"):
        CacheSource(str(tmp_path / "images"))


def test_worker_processes_give_the_same_batches_and_portable_state(tmp_path):
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (the trainer runs under app.run).
        flags.FLAGS.mark_as_parsed()
    cfg = _config("webdataset", _webdataset(tmp_path, 2, 5, bad=True), random_flip=True)
    expected = _take(make_train_iterator(cfg, process_index=0, process_count=1), 6)
    cfg.num_workers = 1
    with_worker = make_train_iterator(cfg, process_index=0, process_count=1)
    actual = _take(with_worker, 3)
    state = with_worker.get_state()
    with_worker.close()
    cfg.num_workers = 0  # A state saved with workers resumes without them (and vice versa).
    resumed = make_train_iterator(cfg, process_index=0, process_count=1)
    resumed.set_state(state)
    _assert_batches_equal(expected, actual + _take(resumed, 3))


def test_fixed_time_ids_reach_the_unet(tmp_path):
    """The loader's fixed time ids are what the step conditions the student on, and the UNet's output depends on
    them (so the option changes training, not just a logged field)."""
    import jax
    from _step_setup import cached_batch, save_step_pipeline, setup, step_config

    from tdd_jax.conditioning import unet_output
    from tdd_jax.data.preprocess import fixed_time_ids
    from tdd_jax.training import sharding

    pipeline_dir = save_step_pipeline(tmp_path / "pipeline")
    frozen, step = setup(step_config(), pipeline_dir, sharding.make_mesh(1, 1, jax.devices()[:1]), encoders=False)
    real = cached_batch()
    real["time_ids"] = np.tile(np.float32([30, 40, 3, 5, 16, 16]), (len(real["time_ids"]), 1))
    fixed = dict(real, time_ids=np.stack([fixed_time_ids({"time_ids": t}, 16)["time_ids"] for t in real["time_ids"]]))
    keys = jax.random.split(jax.random.PRNGKey(0), len(real["latents"]))
    lora = step.init_state(jax.random.PRNGKey(0)).lora
    outputs = []
    for batch in (real, fixed):
        x0, cond = step._inputs(frozen.params, batch, keys)
        np.testing.assert_array_equal(np.asarray(cond.time_ids), batch["time_ids"])
        t = np.full((len(x0),), 500, np.int32)
        outputs.append(np.asarray(unet_output(frozen.unet(frozen.params, lora), x0, t, cond)))
    np.testing.assert_array_equal(fixed["time_ids"], [[16, 16, 0, 0, 16, 16]] * len(fixed["time_ids"]))
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-4
