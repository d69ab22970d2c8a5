"""Demo inputs: uploads decoded safely, example images and masks made in code (work offline).

Uploads are checked before decoding: size in bytes, then the pixel count from the header
(before any pixel is decoded), and only the formats in `FORMATS` are tried (Pillow never
hands a browser upload to its Ghostscript or other external decoders). Any failure is an
`InputError` whose message names the file and the problem, shown in the page.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
from typing import Dict, Optional, Tuple

import numpy as np

from vd_jax.errors import InputError

FORMATS = ('PNG', 'JPEG', 'WEBP', 'BMP', 'GIF')
EXTENSIONS = ['png', 'jpg', 'jpeg', 'webp', 'bmp', 'gif']

EXAMPLE_PROMPTS = (
    'a red bicycle leaning against a brick wall',
    'a watercolor painting of a lighthouse at sunset',
    'a cat sits on a mat',
)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What an uploaded file may be (checked before it is decoded)."""
    max_bytes: int = 10 * 2 ** 20
    max_pixels: int = 4096 * 4096


def decode_image(data: bytes, name: str, limits: Limits, *, grey: bool = False) -> np.ndarray:
    """Bytes of an uploaded image -> uint8 (H, W, 3) RGB, or (H, W) with `grey`.

    EXIF orientation is applied and alpha dropped, as `vd_jax.image_io.load_image` does for
    files; an animated GIF gives its first frame.
    """
    # lazy: PIL (+14 ms)
    from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: PLC0415
    n = len(data)
    if n == 0:
        raise InputError(f"'{name}' is empty")
    if n > limits.max_bytes:
        raise InputError(f"'{name}' is {n / 2 ** 20:.1f} MB; the limit is "
                         f'{limits.max_bytes / 2 ** 20:.1f} MB')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                w, h = im.size
                if w < 1 or h < 1:
                    raise InputError(f"'{name}' has no pixels ({w} x {h})")
                if w * h > limits.max_pixels:
                    raise InputError(f"'{name}' is {w} x {h} = {w * h:,} pixels; the limit is "
                                     f'{limits.max_pixels:,}')
                im.load()
                im = ImageOps.exif_transpose(im)
                return np.asarray(im.convert('L' if grey else 'RGB'), np.uint8).copy()
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"'{name}' is not an image in a supported format "
                         f"({', '.join(FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"'{name}' has too many pixels (limit {limits.max_pixels:,})") from None
    except Exception as e:  # truncated or corrupt data: any decoder error becomes a message
        raise InputError(f"cannot decode '{name}': {type(e).__name__}: {e}") from None


def decode_mask(data: bytes, name: str, limits: Limits) -> np.ndarray:
    """An uploaded keep-mask (white = use this region) -> float32 (H, W) in [0, 1]."""
    return decode_image(data, name, limits, grey=True).astype(np.float32) / 255.0


# ---------------------------------------------------------------------------------------
# Examples, drawn in code so that the demo works offline and ships no binary files
# ---------------------------------------------------------------------------------------
def _grid(size: int):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    return y, x


def _sunset(size: int) -> np.ndarray:
    y, x = _grid(size)
    sky = np.stack([0.95 - 0.3 * y, 0.45 + 0.3 * y, 0.35 + 0.5 * y], -1)
    sun = ((x - 0.5) ** 2 + (y - 0.55) ** 2) < 0.03
    sky[sun] = (1.0, 0.85, 0.3)
    sky[y > 0.7] = (0.12, 0.10, 0.20)
    return sky


def _checker(size: int) -> np.ndarray:
    y, x = _grid(size)
    cells = ((np.floor(x * 6) + np.floor(y * 6)) % 2).astype(bool)
    out = np.empty((size, size, 3), np.float32)
    out[cells] = (0.1, 0.3, 0.8)
    out[~cells] = (0.95, 0.9, 0.7)
    return out


def _rings(size: int) -> np.ndarray:
    y, x = _grid(size)
    r = np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2)
    return np.stack([0.5 + 0.5 * np.cos(r * 40), 0.5 + 0.5 * np.sin(r * 25), 1 - r], -1)


def _stripes(size: int) -> np.ndarray:
    y, x = _grid(size)
    band = (np.floor((x + y) * 5) % 3).astype(int)
    palette = np.array([(0.9, 0.2, 0.2), (0.2, 0.7, 0.3), (0.95, 0.95, 0.95)], np.float32)
    return palette[band]


_EXAMPLES = {'sunset': _sunset, 'checkerboard': _checker, 'rings': _rings, 'stripes': _stripes}
EXAMPLE_IMAGES = tuple(_EXAMPLES)

# A model trained on the shapes world (VD-mini) knows nothing else: its examples are captions
# and renders of held-out attribute combinations (vd_jax.data.shapes), named by attributes.
SHAPES_PROMPTS = (
    'a large red circle at the center on a white background',
    'green triangle, large, right, black background',
    'a small cyan triangle at the top right on a white background',
)
_SHAPES_IMAGES = {
    'blue cross (shapes)': ('cross', 'blue', 'black', 'large', 'left'),
    'yellow square (shapes)': ('square', 'yellow', 'black', 'large', 'center'),
    'orange circle (shapes)': ('circle', 'orange', 'gray', 'large', 'bottom left'),
    'pink triangle (shapes)': ('triangle', 'pink', 'white', 'large', 'right'),
}


@dataclasses.dataclass(frozen=True)
class Examples:
    """The example prompts and image names a tab offers (`example_image` makes the images)."""
    prompts: Tuple[str, ...]
    images: Tuple[str, ...]


GENERAL_EXAMPLES = Examples(EXAMPLE_PROMPTS, EXAMPLE_IMAGES)
SHAPES_EXAMPLES = Examples(SHAPES_PROMPTS, tuple(_SHAPES_IMAGES))


def examples_for(source: str) -> Examples:
    """The examples for the model loaded from `source`: the shapes world's when the
    checkpoint's manifest says it was trained on it (`data: shapes`, written by training's
    export), else the general ones."""
    path = os.path.join(source, 'manifest.json')
    if os.path.isfile(path):
        try:
            with open(path) as f:
                if json.load(f).get('data') == 'shapes':
                    return SHAPES_EXAMPLES
        except (OSError, ValueError):
            pass  # an unreadable manifest only loses the tailored examples
    return GENERAL_EXAMPLES


def example_image(name: str, size: int = 128) -> np.ndarray:
    """A named example image, uint8 (size, size, 3), the same on every machine (a shapes
    world render is 64 x 64 whatever `size`: the pipeline resizes its inputs)."""
    if name in _SHAPES_IMAGES:
        # lazy: vd_jax.data.shapes pulls in tensorflow_datasets, grain, orbax, ... (+2.1 s)
        from vd_jax.data import shapes  # noqa: PLC0415
        return shapes.render(shapes.Attributes(*_SHAPES_IMAGES[name]))
    if name not in _EXAMPLES:
        raise KeyError(f"no example image '{name}'; examples: "
                       f'{list(_EXAMPLES) + list(_SHAPES_IMAGES)}')
    a = np.clip(_EXAMPLES[name](size), 0, 1)
    return (a * 255 + 0.5).astype(np.uint8)


MASK_PRESETS = ('whole image', 'left half', 'right half', 'top half', 'bottom half', 'centre')


def preset_mask(name: str, size: int = 64) -> Optional[np.ndarray]:
    """A keep-mask preset, float32 (size, size) in {0, 1}; None for the whole image."""
    if name not in MASK_PRESETS:
        raise KeyError(f"no mask preset '{name}'; presets: {list(MASK_PRESETS)}")
    if name == 'whole image':
        return None
    m = np.zeros((size, size), np.float32)
    h = size // 2
    q = size // 4
    region: Dict[str, tuple] = {'left half': (slice(None), slice(0, h)),
                                'right half': (slice(None), slice(h, None)),
                                'top half': (slice(0, h), slice(None)),
                                'bottom half': (slice(h, None), slice(None)),
                                'centre': (slice(q, size - q), slice(q, size - q))}
    m[region[name]] = 1.0
    return m
