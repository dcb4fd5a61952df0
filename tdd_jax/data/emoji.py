"""The Noto colour emoji dataset: a real, small image-text dataset built offline from two Debian packages.

Each of the 3,655 fully-qualified emoji of Unicode's ``emoji-test.txt`` (package ``unicode-data``) becomes one
example: the glyph rendered by Pillow from ``NotoColorEmoji.ttf`` (package ``fonts-noto-color-emoji``; a CBDT
bitmap font, so only size 109 exists), cropped to its bounding box, centred on a white square and resized; the
caption is its CLDR name ("grinning face", "flag: Japan"), with its group and subgroup as labels. It is written
as a TFDS dataset in array_record format, which builds and reads without tensorflow (``as_data_source()``).

The held-out ``test`` split (~5%, for VAE reconstruction PSNR) is chosen by a hash of the code points, so it is
the same on every machine and does not move when another emoji is added or removed.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST_FILE = "/usr/share/unicode/emoji/emoji-test.txt"
FONT_SIZE = 109  # The only size the CBDT bitmaps exist at.
TEST_MODULUS = 20  # crc32(code points) % 20 == 0 -> test split (173 of 3,655).
_SETUP_HINT = "install the Debian packages with `sudo launch/setup_system.sh`"


@dataclasses.dataclass(frozen=True)
class EmojiEntry:
    codepoints: str  # e.g. "1F468 200D 1F469 200D 1F467"
    name: str  # CLDR short name, the caption.
    group: str
    subgroup: str

    @property
    def text(self) -> str:
        return "".join(chr(int(cp, 16)) for cp in self.codepoints.split())

    @property
    def split(self) -> str:
        return "test" if zlib.crc32(self.codepoints.encode()) % TEST_MODULUS == 0 else "train"


@functools.lru_cache(maxsize=None)
def read_emoji_test(path: str = EMOJI_TEST_FILE) -> tuple[EmojiEntry, ...]:
    """The fully-qualified entries of ``emoji-test.txt``, in file order.

    Line format: ``1F600 ; fully-qualified # 😀 E1.0 grinning face`` under ``# group:``/``# subgroup:`` headers.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; {_SETUP_HINT}.")
    entries, group, subgroup = [], None, None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif line.startswith("# subgroup:"):
                subgroup = line.split(":", 1)[1].strip()
            elif "; fully-qualified" in line:
                codepoints, comment = line.split(";", 1)[0].strip(), line.split("#", 1)[1].split()
                # comment = [emoji, version "E1.0", *name words]
                if len(comment) < 3 or not comment[1].startswith("E") or group is None:
                    raise ValueError(f"{path}:{lineno}: unexpected line format: {line.strip()!r}")
                entries.append(EmojiEntry(codepoints, " ".join(comment[2:]), group, subgroup))
    if not entries:
        raise ValueError(f"{path} holds no fully-qualified emoji.")
    return tuple(entries)


def _ordered_unique(values) -> list[str]:
    return list(dict.fromkeys(values))


def load_font(path: str = EMOJI_FONT) -> ImageFont.FreeTypeFont:
    """The colour emoji font with RAQM layout (needed to shape ZWJ, flag and keycap sequences into one glyph)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; {_SETUP_HINT}.")
    return ImageFont.truetype(path, FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)


def render_emoji(font: ImageFont.FreeTypeFont, entry: EmojiEntry, image_size: int) -> Image.Image:
    """One emoji as an RGB ``image_size``² image: glyph bbox crop, centred on white, resized (antialiased)."""
    canvas = Image.new("RGBA", (3 * FONT_SIZE, 3 * FONT_SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((FONT_SIZE // 2, FONT_SIZE // 2), entry.text, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        raise ValueError(f"Emoji {entry.codepoints} ({entry.name}) renders as nothing with {EMOJI_FONT}.")
    glyph = canvas.crop(bbox)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((image_size, image_size), Image.Resampling.LANCZOS)


@dataclasses.dataclass
class NotoColorEmojiConfig(tfds.core.BuilderConfig):
    image_size: int = 64


class NotoColorEmoji(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder: features image, caption, codepoints, group and subgroup (ClassLabels named from the file)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version (made with Debian 12: Noto Color Emoji 2.042, emoji 15.0)."}
    BUILDER_CONFIGS = [NotoColorEmojiConfig(name="64px", image_size=64)]

    def _info(self) -> tfds.core.DatasetInfo:
        entries = read_emoji_test()
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3)),
                "caption": tfds.features.Text(),
                "codepoints": tfds.features.Text(),
                "group": tfds.features.ClassLabel(names=_ordered_unique(e.group for e in entries)),
                "subgroup": tfds.features.ClassLabel(names=_ordered_unique(e.subgroup for e in entries)),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded: the inputs are the installed Debian files.
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split: str):
        font, size = load_font(), self.builder_config.image_size
        for entry in read_emoji_test():
            if entry.split != split:
                continue
            png = io.BytesIO()
            render_emoji(font, entry, size).save(png, format="PNG", compress_level=1)
            yield entry.codepoints, {"image": png.getvalue(), "caption": entry.name,
                                     "codepoints": entry.codepoints, "group": entry.group,
                                     "subgroup": entry.subgroup}


def emoji_builder(data_dir: str, image_size: int = 64) -> NotoColorEmoji:
    """The builder for one image size under ``data_dir`` (configs are per size: ``"{image_size}px"``)."""
    if image_size <= 0:
        raise ValueError(f"data.emoji_image_size must be positive, got {image_size}.")
    name = f"{image_size}px"
    # A predefined config must be named, not passed: a passed object would not survive pickling into workers.
    registered = any(c.name == name for c in NotoColorEmoji.BUILDER_CONFIGS)
    config = name if registered else NotoColorEmojiConfig(name=name, image_size=image_size)
    return NotoColorEmoji(config=config, data_dir=data_dir or None, file_format="array_record")


def build_emoji_dataset(data_dir: str, image_size: int = 64) -> NotoColorEmoji:
    """Render and write the dataset once (a few seconds); later calls find it and return at once."""
    builder = emoji_builder(data_dir, image_size)
    builder.download_and_prepare()
    return builder


def check_groups(groups, known, field: str) -> None:
    """A clear error when ``groups`` (selected by config field ``field``) names a group not in ``known``."""
    unknown = sorted(set(groups) - set(known))
    if unknown:
        raise ValueError(f"{field}={list(groups)!r}: {unknown} are not emoji groups; the groups are {list(known)}.")


class EmojiSource:
    """One split of the built dataset as raw records ``{"key", "image" uint8 array, "caption"}`` for the loader,
    optionally only the emoji of some groups (empty ``groups``: all)."""

    def __init__(self, builder: NotoColorEmoji, split: str, groups=()):
        if split not in builder.info.splits:
            raise ValueError(f"data.split={split!r}: the emoji dataset has splits {list(builder.info.splits)}.")
        self._data = builder.as_data_source(split=split)
        self._index = list(range(len(self._data)))
        if groups:
            names = builder.info.features["group"].names
            check_groups(groups, names, "data.emoji_groups")
            wanted = {names.index(g) for g in groups}
            self._index = [i for i in self._index if self._data[i]["group"] in wanted]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict:
        example = self._data[self._index[index]]
        return {"key": example["codepoints"].decode(), "image": example["image"],
                "caption": example["caption"].decode()}


def load_emoji(data_dir: str, split: str, image_size: int = 64, groups=()) -> dict[str, np.ndarray]:
    """A whole split in memory (for VAE evaluation and tokenizer vocabularies), sorted by code points; with
    ``groups``, only those groups' emoji.

    Returns ``images`` uint8 (N,S,S,3), ``captions``, ``codepoints``, ``groups``, ``subgroups`` (str arrays).
    """
    builder = build_emoji_dataset(data_dir, image_size)
    data = builder.as_data_source(split=split)
    group_names = builder.info.features["group"].names
    subgroup_names = builder.info.features["subgroup"].names
    check_groups(groups, group_names, "groups")
    examples = [data[i] for i in range(len(data))]
    examples = sorted((e for e in examples if not groups or group_names[e["group"]] in groups),
                      key=lambda e: e["codepoints"])
    return {
        "images": np.stack([e["image"] for e in examples]),
        "captions": np.array([e["caption"].decode() for e in examples]),
        "codepoints": np.array([e["codepoints"].decode() for e in examples]),
        "groups": np.array([group_names[e["group"]] for e in examples]),
        "subgroups": np.array([subgroup_names[e["subgroup"]] for e in examples]),
    }
