"""Reading images and preparing them for the CLIP image context encoder (numpy, no torch).

`clip_preprocess` reproduces transformers' `CLIPImageProcessor` (PIL backend, the one used
without torchvision) for openai/clip-vit-large-patch14: shortest side -> 224 with PIL's
bicubic, centre crop 224 x 224, x/255, normalise with CLIP's mean/std. The resampler is a
numpy re-implementation of Pillow's 8-bit convolution resampling (antialiased bicubic,
a = -0.5, fixed-point coefficients, horizontal pass rounded to uint8 before the vertical
pass), so on uint8 images the output equals the processor's bit for bit (tests measure
max |diff| = 0). Float input in [0, 1] is first quantised as VD does it (torchvision
`ToPILImage`: uint8(x * 255), truncating), which is what the original fed to the processor.

Channels-last throughout: images (H, W, 3) in, pixel values (B, 224, 224, 3) float32 out.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from vd_jax.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's 8-bit resampling keeps coefficients in fixed point with this many fraction bits
# (32 bits - 8 for the pixel - 2 of headroom).
_PRECISION_BITS = 22


# Transparent pixels are composited over white: what browsers (and so the demo's users) show,
# and what the training-data builder stores (`vd_jax.data.normalize_image_bytes`).
ALPHA_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = ('RGBA', 'RGBa', 'LA', 'La', 'PA')
_INT_MODES = ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N')


def _u8(a: np.ndarray, top: float) -> np.ndarray:
    """Values in [0, top] -> uint8, rounded to nearest (v * 255 / top); outside clipped."""
    a = np.nan_to_num(np.asarray(a, np.float64), nan=0.0, posinf=top, neginf=0.0)
    return np.rint(np.clip(a, 0.0, top) * (255.0 / top)).astype(np.uint8)


def pil_to_rgb(im) -> np.ndarray:
    """A PIL image of any mode -> upright uint8 (H, W, 3) RGB.

    * EXIF orientation is applied (`ImageOps.exif_transpose`, as transformers' `load_image`).
    * 16-bit and 32-bit integer grey ('I;16', 'I;16B', 'I', ...) are scaled from 0..65535, the
      range PIL gives 16-bit PNG/TIFF files (mode 'I' included); values outside are clipped.
      `convert('RGB')` would clip them at 255 instead (a 16-bit image comes out almost white).
    * 'F' (float grey) is taken as [0, 1] when its maximum is <= 1, else as 0..255.
    * Alpha ('RGBA', 'LA', 'PA', palette with transparency) is composited over
      `ALPHA_BACKGROUND` (white).
    * '1', 'L', 'P', 'CMYK', 'YCbCr', 'HSV', ... go through Pillow's `convert('RGB')`.
    """
    # lazy: PIL (+21 ms)
    from PIL import Image, ImageOps  # noqa: PLC0415
    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in _INT_MODES or mode == 'F':
        a = np.asarray(im)
        top = 65535.0 if mode != 'F' else (1.0 if np.nanmax(a, initial=0.0) <= 1.0 else 255.0)
        return np.repeat(_u8(a, top)[..., None], 3, axis=-1)
    if mode in _ALPHA_MODES or (mode == 'P' and 'transparency' in im.info):
        rgba = (im.convert('LA') if mode == 'La' else im).convert('RGBA')
        im = Image.alpha_composite(Image.new('RGBA', rgba.size, ALPHA_BACKGROUND + (255,)), rgba)
    try:
        rgb = im.convert('RGB')
    except ValueError as e:  # a mode Pillow cannot convert (e.g. multi-band float)
        raise ValueError(f'image mode {mode!r} cannot be converted to RGB: {e}') from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def load_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an image file (PNG, JPEG, TIFF, ... anything Pillow decodes) -> uint8 (H, W, 3) RGB.

    Every mode and bit depth is scaled to 8 bits as `pil_to_rgb` documents (EXIF orientation
    applied, 16-bit grey scaled, alpha composited over white, CMYK converted).
    Raises FileNotFoundError for a missing file, InputError (naming the file) for anything
    that is not a decodable image: a folder, an empty or truncated file, another format.
    """
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"'{path}' is a folder, not an image file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file '{path}' does not exist")
    if os.path.getsize(path) == 0:
        raise InputError(f"image file '{path}' is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()
            return pil_to_rgb(im)
    except UnidentifiedImageError:
        raise InputError(f"'{path}' is not an image file Pillow can read (PNG, JPEG, ...)") \
            from None
    except PermissionError:
        raise InputError(f"cannot read image file '{path}': permission denied") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"image file '{path}' is too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data, odd modes
        raise InputError(f"cannot decode image file '{path}': {e}") from None


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with a = -0.5 (Pillow's BICUBIC), support 2; same operation order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _resample_coeffs(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per output pixel: the first input index (out,) and fixed-point weights (out, taps).

    Antialiasing: when shrinking, the kernel is stretched by the scale factor so every
    input pixel contributes (support 2 * scale). Weights are normalised to sum 1 in float64,
    then rounded half away from zero to integers with 22 fraction bits.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C's (int) cast truncates toward zero; both bounds are then clamped to the image.
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    t = np.arange(taps)
    w = _bicubic((t[None] + xmin[:, None] - center[:, None] + 0.5) / filterscale)
    w = np.where(t[None] < xmax[:, None], w, 0.0)
    total = np.zeros(out_size)
    for i in range(taps):  # sequential sum, as the reference (pairwise sums round differently)
        total = total + w[:, i]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * (1 << _PRECISION_BITS)),
                     np.trunc(0.5 + w * (1 << _PRECISION_BITS))).astype(np.int64)
    return xmin, fixed


def _resample_axis(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """uint8 image resampled along `axis` (0 = rows/height, 1 = columns/width), uint8 out."""
    in_size = img.shape[axis]
    xmin, fixed = _resample_coeffs(in_size, out_size)
    src = np.moveaxis(img, axis, 0).astype(np.int64)  # (in, other, C)
    acc = np.full((out_size,) + src.shape[1:], 1 << (_PRECISION_BITS - 1), np.int64)
    for i in range(fixed.shape[1]):
        idx = np.minimum(xmin + i, in_size - 1)  # taps past the end have weight 0
        acc += src[idx] * fixed[:, i].reshape((-1,) + (1,) * (src.ndim - 1))
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_bicubic(img: np.ndarray, size: Tuple[int, int], pillow13_order: bool = True
                   ) -> np.ndarray:
    """Pillow-exact `Image.resize((w, h), BICUBIC)` of a uint8 (H, W, C) array -> (h, w, C).

    Two 1-D passes, each only if that side changes; the first pass is rounded to uint8.
    Pillow <= 12 always resamples the width first. Pillow 13 (pinned here; python-pillow
    PR #9549) does the height first when it shrinks by more than twice as many pixels as the
    width: h < H and H - h > 2 (W - w) (measured: this rule reproduces Pillow 13 on 400
    random size pairs). The order changes results by a few uint8 levels, so
    `pillow13_order=False` gives the width-first results of older Pillow (what VD's 2022
    environment computed) for such tall images.
    """
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f'resize_bicubic wants uint8 (H, W, C), got {img.dtype} {img.shape}')
    h, w = size
    H, W = img.shape[:2]
    height_first = pillow13_order and h < H and (H - h) > 2 * (W - w)
    for axis in ((0, 1) if height_first else (1, 0)):
        if img.shape[axis] != size[axis]:
            img = _resample_axis(img, size[axis], axis=axis)
    return img


def to_uint8_rgb(image, index: int) -> np.ndarray:
    """One image (file path, PIL image, or array) -> uint8 (H, W, 3).

    Arrays: channels last, (H, W, 3), (H, W, 1) or (H, W); uint8 as is, uint16 scaled from
    0..65535 (round(v / 257)), float in [0, 1] quantised as VD does (uint8(x * 255), truncating).
    Files and PIL images: `load_image` / `pil_to_rgb` (every mode and bit depth).
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if type(image).__module__.startswith('PIL.'):
        try:
            return pil_to_rgb(image)
        except ValueError as e:
            raise ValueError(f'image {index}: {e}') from None
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f'image {index}: expected (H, W, 3), (H, W, 1) or (H, W), channels last, '
                         f'got shape {a.shape}')
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f'image {index}: empty image of shape {a.shape}')
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return _u8(a, 65535.0)
    if np.issubdtype(a.dtype, np.floating):
        lo, hi = float(np.min(a)), float(np.max(a))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(f'image {index}: float images must lie in [0, 1], got values in '
                             f'[{lo:.4g}, {hi:.4g}]')
        # torchvision ToPILImage, as in VD's CLIPImageContextEncoder: float32 x*255, truncated.
        return (a.astype(np.float32) * np.float32(255)).astype(np.uint8)
    raise ValueError(f'image {index}: dtype {a.dtype} is not supported (uint8, uint16, or float '
                     'in [0, 1])')


def load_images(images, hw: Tuple[int, int]) -> np.ndarray:
    """Input images -> (B, h, w, 3) float32 in [0, 1], resized bicubically (as the demo) to hw.

    images: one image or a list / (B, H, W, C) batch of files, PIL images or arrays (any of
    `to_uint8_rgb`'s forms). Raises InputError for an unreadable file, ValueError for a
    malformed array or no image at all."""
    items = as_list(images)
    if not items:
        raise ValueError('no input image given')
    out = []
    for i, im in enumerate(items):
        a = to_uint8_rgb(im, i)
        if a.shape[:2] != tuple(hw):
            a = resize_bicubic(a, tuple(hw))
        out.append(a.astype(np.float32) / 255.0)
    return np.stack(out)


def load_mask(mask, hw: Tuple[int, int]) -> np.ndarray:
    """A keep-mask (file, or (H, W) / (H, W, C) array in [0, 1] or uint8) -> (h, w) float32
    in [0, 1], resized bilinearly (the demo resizes masks with PIL's BILINEAR). Raises
    ValueError for an array of another rank."""
    from PIL import Image  # noqa: PLC0415
    m = load_image(mask) if isinstance(mask, str) else np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    if m.ndim != 2:
        raise ValueError(f'a mask must be (H, W) or an image file, got shape {m.shape}')
    m = m.astype(np.float32) / (255.0 if m.dtype == np.uint8 or m.max() > 1 else 1.0)
    if m.shape != tuple(hw):
        m = np.asarray(Image.fromarray(m, mode='F').resize((hw[1], hw[0]), Image.BILINEAR))
    return np.clip(m, 0, 1)


def as_list(images) -> List:
    """One item, a list/tuple, or a (B, H, W, C) array -> a list of items (one per image or
    prompt); a single (H, W, C) image stays one item."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


def clip_preprocess(images, size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """Images of any size -> CLIP pixel values (B, size, size, 3) float32.

    Args:
      images: one image or a list: uint8 or float-in-[0, 1] arrays (H, W, 3) / (H, W), a
        batch array (B, H, W, 3), PIL images, or image file paths.
      size: the model's `image_size` (224 for ViT-L/14).
    Steps (CLIPImageProcessor): shortest side -> `size`, the other int(size * long / short);
    Pillow bicubic; centre crop (offsets (H - size) // 2, (W - size) // 2); x / 255;
    (x - mean) / std in float32.
    """
    items = as_list(images)
    if not items:
        raise ValueError('clip_preprocess: no images given')
    mean32 = np.asarray(mean, np.float32)
    std32 = np.asarray(std, np.float32)
    out = np.empty((len(items), size, size, 3), np.float32)
    for i, image in enumerate(items):
        a = to_uint8_rgb(image, i)
        h, w = a.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_hw = (new_long, size) if w <= h else (size, new_long)
        a = resize_bicubic(a, new_hw)
        top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
        a = a[top:top + size, left:left + size]
        # transformers rescales in float64 and then casts; keep that order for equal bits
        x = (a.astype(np.float64) * (1 / 255)).astype(np.float32)
        out[i] = (x - mean32) / std32
    return out


def _bilinear_torch(m: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """`F.interpolate(mode='bilinear', align_corners=False)` (no antialias) of a 2-D array."""
    def coords(n_in, n_out):
        x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        x = np.clip(x, 0, None)
        i0 = np.minimum(np.floor(x).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (x - i0).astype(np.float32)
    y0, y1, wy = coords(m.shape[0], hw[0])
    x0, x1, wx = coords(m.shape[1], hw[1])
    rows = m[y0] * (1 - wy)[:, None] + m[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx)[None] + rows[:, x1] * wx[None]


def clip_token_mask(mask, size: int = 224, patch_size: int = 14) -> Optional[np.ndarray]:
    """A keep-mask (H, W) in [0, 1] (1 = keep) -> CLIP token weights (1 + (size/p)^2,) float32.

    As the multi-context demo (`clip.py:_encode_wmask`): the mask is resized bilinearly to
    the CLIP input (the same shortest-side resize and centre crop as `clip_preprocess`, which
    for the demo's square inputs is a plain resize to size x size), each patch token gets its
    patch's mean, the CLS token the mean of the whole mask. Returns None for an all-ones mask
    (the demo then encodes without a mask).
    """
    m = np.clip(np.asarray(mask, np.float32), 0, 1)
    if m.ndim == 3:
        m = m[..., 0]
    if m.ndim != 2:
        raise ValueError(f'a mask must be (H, W) (or (H, W, C)), got shape {np.shape(mask)}')
    h, w = m.shape
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    m = _bilinear_torch(m, (new_long, size) if w <= h else (size, new_long))
    top, left = (m.shape[0] - size) // 2, (m.shape[1] - size) // 2
    m = m[top:top + size, left:left + size]
    if m.sum() == m.size:
        return None
    g = size // patch_size
    patches = m[:g * patch_size, :g * patch_size].reshape(g, patch_size, g, patch_size).mean((1, 3))
    return np.concatenate([[m.mean()], patches.reshape(-1)]).astype(np.float32)
