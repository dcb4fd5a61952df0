"""Random-access readers of image-text data as it lies on disk: webdataset ``.tar`` shards and image folders.

Both are grain ``RandomAccessDataSource``s (``__len__`` + ``__getitem__``) returning raw records
``{"key", "image": bytes | None, "caption": str | None}`` or skip records; decoding happens later in the
(parallel) preprocessing stage. Random access is what makes the loader's shuffling, sharding and checkpointed
position exact, so tar shards are indexed once (member offsets from the tar headers) and members are then read
with a seek, never by streaming.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import tarfile
from collections.abc import Sequence
from concurrent import futures

from absl import logging

from tdd_jax.data.preprocess import MISSING_CAPTION, READ_ERROR, skip_record

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_EXTENSIONS = (".txt", ".json")
JSON_CAPTION_FIELDS = ("caption", "text")

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style braces: ``{000..099}`` (zero padding kept) and ``{a,b}``; nested left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    if ".." in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()):
            raise ValueError(f"Bad numeric range {{{body}}} in shard pattern {pattern!r}.")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def list_shards(pattern: str) -> list[str]:
    """Sorted, de-duplicated shard files matching a brace and/or glob pattern; an error if none exist."""
    paths = set()
    for expanded in expand_braces(pattern):
        if any(c in expanded for c in "*?["):
            paths.update(glob.glob(expanded))
        elif os.path.isfile(expanded):
            paths.add(expanded)
    if not paths:
        raise FileNotFoundError(f"data.path={pattern!r} matches no webdataset shard files.")
    return sorted(paths)


@dataclasses.dataclass(frozen=True)
class _Member:
    """Byte range of one tar member."""
    path: str
    offset: int
    size: int
    ext: str


def _split_key(name: str) -> tuple[str, str]:
    """Webdataset grouping: key = member path up to the first dot of its basename, ext = the rest, lowercased."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(directory, stem), (dot + ext).lower()


def _index_tar(path: str) -> list[tuple[str, _Member | None, _Member | None]]:
    """(key, image member, caption member) for each sample key in one shard, in tar order."""
    groups: dict[str, dict[str, _Member]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    key, ext = _split_key(info.name)
                    groups.setdefault(key, {})[ext] = _Member(path, info.offset_data, info.size, ext)
    except (tarfile.TarError, OSError) as e:
        # A damaged shard costs its unreadable tail, not the run; members cut short become read_error skips.
        logging.warning("Webdataset shard %s is damaged after %d samples: %s", path, len(groups), e)
    samples = []
    for key, members in groups.items():
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        caption = next((members[e] for e in CAPTION_EXTENSIONS if e in members), None)
        samples.append((f"{os.path.basename(path)}/{key}", image, caption))
    return samples


def _read(member: _Member) -> bytes:
    with open(member.path, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise OSError(f"{member.path} is truncated: member at byte {member.offset} has "
                      f"{len(data)} of {member.size} bytes.")
    return data


def parse_caption(data: bytes, ext: str) -> str | None:
    """Caption text from a ``.txt`` member/file, or the first of the caption/text fields of a ``.json`` one."""
    text = data.decode("utf-8")
    if ext != ".json":
        return text
    record = json.loads(text)
    if not isinstance(record, dict):
        return None
    return next((record[f] for f in JSON_CAPTION_FIELDS if isinstance(record.get(f), str)), None)


def _read_record(key: str, image: _Member | None, caption: _Member | None) -> dict:
    """Raw record for one sample, with I/O and caption-format problems turned into skip records."""
    if caption is None:
        return skip_record(key, MISSING_CAPTION, "no .txt/.json caption")
    try:
        text = parse_caption(_read(caption), caption.ext)
        data = None if image is None else _read(image)
    except (OSError, UnicodeDecodeError) as e:
        return skip_record(key, READ_ERROR, f"{type(e).__name__}: {e}")
    except json.JSONDecodeError as e:
        return skip_record(key, MISSING_CAPTION, f"unparsable {caption.ext}: {e}")
    return {"key": key, "image": data, "caption": text}


class WebDatasetSource:
    """Samples of the given ``.tar`` shards (every process indexes all of them and reads only its examples).

    Indexing reads only the tar headers, in parallel over shards; a sample with a caption but no image (or the
    reverse) stays in the index and becomes a counted skip record when read.
    """

    def __init__(self, shards: Sequence[str], num_threads: int = 8):
        if not shards:
            raise ValueError("WebDatasetSource needs at least one shard.")
        with futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
            per_shard = list(pool.map(_index_tar, shards))
        self._samples = [s for samples in per_shard for s in samples]
        if not self._samples:
            raise ValueError(f"The webdataset shards {list(shards)[:3]}... hold no files.")

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict:
        return _read_record(*self._samples[index])


class ImageFolderSource:
    """Images under a directory (recursive), each captioned by the same-name ``.txt`` beside it."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data.path={root!r} is not a directory of images.")
        self._root = root
        self._images = sorted(
            os.path.relpath(os.path.join(d, f), root)
            for d, _, files in os.walk(root) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self._images:
            raise ValueError(f"data.path={root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict:
        rel = self._images[index]
        path = os.path.join(self._root, rel)
        caption_path = os.path.splitext(path)[0] + ".txt"
        if not os.path.exists(caption_path):
            return skip_record(rel, MISSING_CAPTION, f"no {os.path.basename(caption_path)}")
        try:
            with open(caption_path, "rb") as f:
                caption = f.read().decode("utf-8")
            with open(path, "rb") as f:
                data = f.read()
        except (OSError, UnicodeDecodeError) as e:
            return skip_record(rel, READ_ERROR, f"{type(e).__name__}: {e}")
        return {"key": rel, "image": data, "caption": caption}
