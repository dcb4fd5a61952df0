"""SDXL training preprocessing: decode, resize the shorter side, crop, flip, and record the micro-conditioning.

SDXL's UNet is conditioned on ``time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)``; they must
describe what was actually done to each image, so the geometry here follows diffusers'
``train_text_to_image_sdxl.py`` exactly (torchvision's shorter-side resize rule, ``RandomCrop.get_params`` ranges,
centre-crop rounding, and its crop_left convention under flipping) and is unit-tested against hand-computed values.

Records flow through the pipeline as dicts. A record that cannot be used becomes a *skip record*
(``{"key", "skip", "detail"}``) instead of raising, so that a bad file costs one example, never the run; the
loader counts skip records by reason.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageOps

# Reasons an example is skipped (the keys of the loader's skip counters).
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
DECODE_ERROR = "decode_error"
READ_ERROR = "read_error"
TOO_SMALL = "too_small"
SKIP_REASONS = (MISSING_IMAGE, MISSING_CAPTION, DECODE_ERROR, READ_ERROR, TOO_SMALL)

INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}


def skip_record(key: str, reason: str, detail: str = "") -> dict:
    """A placeholder for an unusable example; the loader drops and counts it."""
    assert reason in SKIP_REASONS, reason
    return {"key": key, "skip": reason, "detail": detail}


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Size after resizing the shorter side to ``resolution`` (torchvision ``Resize(int)``: long side truncated)."""
    if height <= width:
        return resolution, int(resolution * width / height)
    return int(resolution * height / width), resolution


def crop_top_left(height: int, width: int, resolution: int, center: bool,
                  rng: np.random.Generator | None) -> tuple[int, int]:
    """Top-left corner of the ``resolution``² crop in the resized image (diffusers' SDXL script conventions)."""
    if center:
        return (max(0, int(round((height - resolution) / 2.0))),
                max(0, int(round((width - resolution) / 2.0))))
    return (int(rng.integers(0, height - resolution + 1)),
            int(rng.integers(0, width - resolution + 1)))


def decode_image(data: bytes | np.ndarray) -> Image.Image:
    """Encoded bytes or a uint8 HxWx3 array -> fully loaded RGB image (EXIF rotation applied, alpha on white).

    Raises whatever PIL raises for undecodable or truncated data; the caller turns that into a skip record.
    """
    if isinstance(data, np.ndarray):
        return Image.fromarray(data).convert("RGB")
    image = Image.open(io.BytesIO(data))
    image.load()  # Forces the full decode so truncated files fail here, not later.
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def fixed_time_ids(record: dict, resolution: int) -> dict:
    """The official TDD run's ``--use_fix_crop_and_size``: the record claims (R, R, 0, 0, R, R), an uncropped
    R x R original, whatever its real size and crop were."""
    if "skip" in record:
        return record
    return {**record, "time_ids": np.array([resolution, resolution, 0, 0, resolution, resolution], np.float32)}


@dataclasses.dataclass(frozen=True)
class SDXLPreprocessor:
    """Raw record ``{"key", "image", "caption"}`` -> ``{"key", "pixels" uint8 (R,R,3), "time_ids" (6,), "caption"}``.

    A grain random-map transform: ``rng`` is derived from the pipeline seed and the element index, so crops and
    flips are the same whatever the number of threads or worker processes. Pixels stay uint8 until batching to
    keep inter-process transfers small.
    """

    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    interpolation: str = "bilinear"
    min_image_size: int = 0

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        if "skip" in record:
            return record
        key = record["key"]
        if record["image"] is None:
            return skip_record(key, MISSING_IMAGE)
        caption = record["caption"]
        if caption is None or not caption.strip():
            return skip_record(key, MISSING_CAPTION)
        try:
            image = decode_image(record["image"])
        except Exception as e:  # PIL plugins raise OSError, ValueError, SyntaxError, EOFError, struct.error...
            return skip_record(key, DECODE_ERROR, f"{type(e).__name__}: {e}")
        orig_w, orig_h = image.size
        if min(orig_h, orig_w) < self.min_image_size:
            return skip_record(key, TOO_SMALL, f"{orig_w}x{orig_h} < min_image_size={self.min_image_size}")
        res = self.resolution
        new_h, new_w = resized_size(orig_h, orig_w, res)
        if (new_h, new_w) != (orig_h, orig_w):
            image = image.resize((new_w, new_h), INTERPOLATIONS[self.interpolation])
        top, left = crop_top_left(new_h, new_w, res, self.center_crop, rng)
        image = image.crop((left, top, left + res, top + res))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            # diffusers' convention (x1 = cropped_width - x1), kept so time_ids match SDXL fine-tuning practice.
            left = res - left
        return {
            "key": key,
            "pixels": np.asarray(image, dtype=np.uint8),
            "time_ids": np.array([orig_h, orig_w, top, left, res, res], dtype=np.float32),
            "caption": caption.strip(),
        }
