"""Image folders -> FID statistics and CLIP scores, streamed in chunks (30k images fit).

Reference images (e.g. COCO val2014, photos of every size) are brought to the size of the
generated samples before the Inception network sees them: centre-cropped to the target
aspect ratio, then resized with Pillow's bicubic filter (`fit`). Without this, each distinct
photo size would be its own batch shape (one compile each), and FID would compare 512 px
samples with full-size photos. `size=None` keeps the images as they are.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from vd_jax.eval.fid import FIDError, RunningStatistics, load_statistics
from vd_jax.models.inception import FEATURE_DIM

# the extensions pytorch-fid reads from a folder
IMAGE_EXTENSIONS = ('bmp', 'jpg', 'jpeg', 'pgm', 'png', 'ppm', 'tif', 'tiff', 'webp')


def list_images(folder: str) -> List[str]:
    """Image files directly in `folder` (not sub-folders), sorted by name."""
    if not os.path.isdir(folder):
        raise FIDError(f"reference image folder '{folder}' does not exist")
    names = sorted(n for n in os.listdir(folder)
                   if n.rsplit('.', 1)[-1].lower() in IMAGE_EXTENSIONS
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise FIDError(f"reference image folder '{folder}' has no images "
                       f"({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in names]


def check_statistics(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a statistics `.npz`, which must be Inception pool3 statistics:
    mu (2048,) and sigma (2048, 2048)."""
    mu, sigma = load_statistics(path)
    if mu.shape != (FEATURE_DIM,):
        raise FIDError(f"statistics file '{path}': mu has shape {mu.shape}, sigma "
                       f'{sigma.shape}; FID Inception statistics are ({FEATURE_DIM},) and '
                       f'({FEATURE_DIM}, {FEATURE_DIM})')
    return mu, sigma


def fit(image: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3): centre crop to the aspect ratio of hw, then
    Pillow bicubic resize (no-op when the size already matches)."""
    h, w = hw
    H, W = image.shape[:2]
    if (H, W) == (h, w):
        return image
    from PIL import Image
    if H * w > W * h:      # too tall: crop rows
        ch, cw = max(1, round(W * h / w)), W
    else:                  # too wide: crop columns
        ch, cw = H, max(1, round(H * w / h))
    top, left = (H - ch) // 2, (W - cw) // 2
    crop = image[top:top + ch, left:left + cw]
    return np.asarray(Image.fromarray(crop).resize((w, h), Image.BICUBIC))


def _load(path: str, hw: Optional[Tuple[int, int]]) -> np.ndarray:
    from vd_jax.image_io import load_image
    img = load_image(path)
    return img if hw is None else fit(img, hw)


def iter_images(paths: Sequence[str], hw: Optional[Tuple[int, int]], chunk: int):
    """Yield lists of uint8 images, `chunk` at a time, decoded on a thread pool (Pillow
    releases the GIL while decoding and resizing)."""
    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), chunk):
            yield list(pool.map(lambda p: _load(p, hw), paths[start:start + chunk]))


def folder_statistics(paths: Sequence[str], extractor, hw: Optional[Tuple[int, int]],
                      progress: Optional[Callable[[int], None]] = None) -> RunningStatistics:
    """Inception statistics of image files (`fit` to hw unless None), streamed."""
    stats = RunningStatistics()
    chunk = max(1, extractor.batch_size) * 4
    for images in iter_images(list(paths), hw, chunk):
        same = len({im.shape for im in images}) == 1
        stats.update(extractor(np.stack(images) if same else images))
        if progress:
            progress(len(images))
    return stats


def clip_scores(scorer, prompts: Sequence[str], paths: Sequence[str], chunk: int = 256,
                progress: Optional[Callable[[int], None]] = None, clamp: bool = True) -> np.ndarray:
    """(N,) CLIPScore of prompts[i] with the image file paths[i] (float64; `clamp=False`:
    100 * cos without the max(., 0))."""
    out = []
    for k, images in enumerate(iter_images(list(paths), None, chunk)):
        out.append(scorer.clip_score(list(prompts[k * chunk:k * chunk + len(images)]), images,
                                     clamp))
        if progress:
            progress(len(images))
    return np.concatenate(out)


def image_similarities(scorer, sources: Sequence[str], paths: Sequence[str], chunk: int = 256,
                       progress: Optional[Callable[[int], None]] = None,
                       clamp: bool = True) -> np.ndarray:
    """(N,) CLIP image similarity of the image files paths[i] and sources[i] (float64)."""
    out = []
    for k, images in enumerate(iter_images(list(paths), None, chunk)):
        src = [_load(p, None) for p in sources[k * chunk:k * chunk + len(images)]]
        out.append(scorer.image_similarity(images, src, clamp))
        if progress:
            progress(len(images))
    return np.concatenate(out)
