"""Image files for the metrics (`vd_jax.eval.fid`, `vd_jax.eval.clip_score`): folders listed,
images decoded in chunks on a thread pool (30k images fit) and fitted to a size.

Reference images (e.g. COCO val2014, photos of every size) are brought to the size of the
generated samples before the Inception network sees them: centre-cropped to the target
aspect ratio, then resized with Pillow's bicubic filter (`fit`). Without this, each distinct
photo size would be its own batch shape (one compile each), and FID would compare 512 px
samples with full-size photos. `size=None` keeps the images as they are.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from vd_jax.errors import InputError
from vd_jax.image_io import load_image

# the extensions pytorch-fid reads from a folder
IMAGE_EXTENSIONS = ('bmp', 'jpg', 'jpeg', 'pgm', 'png', 'ppm', 'tif', 'tiff', 'webp')


def list_images(folder: str) -> List[str]:
    """Image files directly in `folder` (not sub-folders), sorted by name."""
    if not os.path.isdir(folder):
        raise InputError(f"reference image folder '{folder}' does not exist")
    names = sorted(n for n in os.listdir(folder)
                   if n.rsplit('.', 1)[-1].lower() in IMAGE_EXTENSIONS
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise InputError(f"reference image folder '{folder}' has no images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in names]


def fit(image: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3): centre crop to the aspect ratio of hw, then
    Pillow bicubic resize (no-op when the size already matches)."""
    h, w = hw
    H, W = image.shape[:2]
    if (H, W) == (h, w):
        return image
    # lazy: PIL (+9 ms)
    from PIL import Image  # noqa: PLC0415
    if H * w > W * h:      # too tall: crop rows
        ch, cw = max(1, round(W * h / w)), W
    else:                  # too wide: crop columns
        ch, cw = H, max(1, round(H * w / h))
    top, left = (H - ch) // 2, (W - cw) // 2
    crop = image[top:top + ch, left:left + cw]
    return np.asarray(Image.fromarray(crop).resize((w, h), Image.BICUBIC))


def load_fitted(path: str, hw: Optional[Tuple[int, int]]) -> np.ndarray:
    """The image file at `path`, uint8 (H, W, 3), `fit` to hw unless None."""
    img = load_image(path)
    return img if hw is None else fit(img, hw)


def iter_images(paths: Sequence[str], hw: Optional[Tuple[int, int]], chunk: int):
    """Yield lists of uint8 images, `chunk` at a time, decoded on a thread pool (Pillow
    releases the GIL while decoding and resizing)."""
    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), chunk):
            yield list(pool.map(lambda p: load_fitted(p, hw), paths[start:start + chunk]))
