"""Read the shapes world back: attributes from pixels (`read_image`) and from text (`parse_caption`).

Used to score generated samples: a text->image model is right when `read_image` of its image
gives the prompt's attributes, an image->text model when `parse_caption` of its text gives the
image's. Both return `vd_jax.data.shapes.Attributes`, with None for a field they cannot tell;
`attribute_accuracy` compares lists of them.

Pixel reader, built for imperfect (blurred, noisy, colour-shifted, compressed) images:
  1. background: palette vote of the 2-px border ring (a large shape covers at most a quarter of
     it); its observed colour is the median of the ring pixels that voted for the winner;
  2. colour: on a 3x3-averaged copy, median of the pixels far from the background, refined over
     the pixels that are mostly shape; the palette colour whose segment towards the background
     (mixes of >= 60% colour) passes nearest;
  3. alpha: each pixel's position between the observed background and shape colours, luma
     weighted over chroma; the shape is the 8-connected blob of (smoothed) alpha > 0.5 with the
     most alpha mass;
  4. shape, size, position: each shape is placed as the square box whose area and centroid give
     the blob's alpha mass and centroid (both survive blur), and compared by least squares with
     the world's own coverage of that box, sharp and blurred; the best fit gives the shape, its
     box side the size (threshold 24 px between 16 and 32) and its centre the nearest grid point.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

import functools

from vd_jax.data.shapes import (BACKGROUNDS, COLOURS, FIELDS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES,
                                TEMPLATE_WORDS, Attributes, coverage)

_BG = np.array(list(BACKGROUNDS.values()), np.float32)
_FG = np.array(list(COLOURS.values()), np.float32)
_GRID = np.array(sorted({x for x, _ in POSITIONS.values()}), np.float32)      # 16, 32, 48
_POSITION_AT = {xy: name for name, xy in POSITIONS.items()}
_SIZE_SPLIT = sum(SIZES.values()) / 2                                          # 24 px
MIN_CONTRAST = 40.0   # a shape must differ from the background by this much (0-255 RGB distance)
RING = 2              # border width (px) the background is read from
MIN_PURITY = 0.6      # least share of its own colour a shape's core keeps (see _colour)
MARGIN = 6            # px around the shape's box compared with the templates
BLURS = (0.7, 1.4, 2.1)  # Gaussian sigmas (px) the templates are also tried with


@functools.lru_cache(maxsize=None)
def _moments(shape: str) -> Tuple[float, float]:
    """(area / box area, (centroid y - box centre y) / box height) of a shape, from its render."""
    a = coverage(shape, 64, 64, 96, 96, supersample=4, image_size=128)
    return float(a.sum() / 96 ** 2), float(((a.sum(1) * (np.arange(128) + 0.5)).sum() / a.sum() - 64) / 96)




def _as_pixels(image) -> np.ndarray:
    """uint8 or float in [0, 1] (H, W, 3) -> float32 0..255."""
    x = np.asarray(image)
    if x.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f'expected an image of shape ({IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {x.shape}')
    if x.dtype == np.uint8:
        return x.astype(np.float32)
    if x.dtype.kind != 'f':
        raise ValueError(f'expected uint8 or float pixels, got {x.dtype}')
    if not np.isfinite(x).all() or x.min() < -0.5 or x.max() > 1.5:
        raise ValueError(f'float pixels must be in [0, 1] (got {x.min():.3g}..{x.max():.3g}); '
                         'convert [-1, 1] images with (x + 1) / 2')
    return np.clip(x.astype(np.float32), 0, 1) * 255


def _nearest(palette: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    return np.argmin(((rgb[..., None, :] - palette) ** 2).sum(-1), -1)


def read_image(image, return_confidence: bool = False, shapes: Sequence[str] = SHAPES
               ) -> Union[Attributes, Tuple[Attributes, float]]:
    """Attributes of one shapes-world image.

    Args:
      image: (64, 64, 3) uint8, or float in [0, 1].
      return_confidence: also return a confidence in [0, 1]: the IoU between the shape's
        alpha > 0.5 mask and the best template's (1 for an exact render; 0 when no shape is
        found, and then only `background` is set).
      shapes: the shapes to tell apart; default the world's, add `shapes.EXTRA_SHAPES` to
        read a model taught a new one (docs/lora.md).
    """
    x = _as_pixels(image)
    k, bg = _background(x)
    nothing = Attributes(background=list(BACKGROUNDS)[k])
    # colour and outline from a 3x3-averaged copy (noise / 3; a shape's core keeps its colour)
    smooth = ndimage.uniform_filter(x, size=(3, 3, 1), mode='nearest')
    dist = np.linalg.norm(smooth - bg, axis=-1)
    peak = np.percentile(dist, 99.5)   # a small triangle is 3% of the image
    if peak < MIN_CONTRAST:
        return (nothing, 0.0) if return_confidence else nothing
    fg = np.median(smooth[dist > peak / 2], axis=0)
    core = _alpha(smooth, bg, fg) > 0.75                                # mostly-shape pixels
    fg = np.median(smooth[core], axis=0) if core.any() else fg
    labels, n = ndimage.label(_alpha(smooth, bg, fg) > 0.5, structure=np.ones((3, 3)))
    if n == 0:
        return (nothing, 0.0) if return_confidence else nothing
    alpha = _alpha(x, bg, fg)          # unsmoothed for the fit: noise there is zero-mean
    blob = labels == 1 + int(np.argmax(ndimage.sum_labels(alpha, labels, np.arange(1, n + 1))))
    shape, (cx, cy, side), iou = _fit_shape(alpha, blob, shapes)
    gx, gy = (int(_GRID[np.argmin(np.abs(_GRID - c))]) for c in (cx, cy))
    attrs = Attributes(shape, _colour(fg, _BG[k]), nothing.background,
                       'large' if side >= _SIZE_SPLIT else 'small', _POSITION_AT[(gx, gy)])
    return (attrs, iou) if return_confidence else attrs


def _background(x: np.ndarray) -> Tuple[int, np.ndarray]:
    """(palette index, observed RGB) of the background, voted by the border ring's pixels."""
    r = RING
    ring = np.concatenate([x[:r].reshape(-1, 3), x[-r:].reshape(-1, 3),
                           x[r:-r, :r].reshape(-1, 3), x[r:-r, -r:].reshape(-1, 3)])
    votes = _nearest(_BG, ring)
    k = int(np.bincount(votes, minlength=len(_BG)).argmax())
    return k, np.median(ring[votes == k], axis=0)


def _fit_shape(alpha: np.ndarray, blob: np.ndarray, shapes: Sequence[str] = SHAPES):
    """Best shape for the alpha map around `blob` (bool mask): (name, (cx, cy, side), IoU).

    Blur moves the alpha > 0.5 outline but keeps the alpha mass and its centroid, so each shape
    is placed as the square box with that mass and centroid, then compared (least squares, over
    the blob's box plus MARGIN) with that box's coverage, sharp and blurred by each of BLURS.
    """
    ys, xs = np.nonzero(blob)
    n = int(max(np.ptp(ys), np.ptp(xs))) + 1 + 2 * MARGIN
    oy, ox = (ys.min() + ys.max() + 1 - n) // 2, (xs.min() + xs.max() + 1 - n) // 2
    ys, xs = np.mgrid[oy:oy + n, ox:ox + n]
    inside = (ys >= 0) & (ys < IMAGE_SIZE) & (xs >= 0) & (xs < IMAGE_SIZE)
    window = np.where(inside, alpha[ys.clip(0, IMAGE_SIZE - 1), xs.clip(0, IMAGE_SIZE - 1)], 0)
    mass = max(float(window.sum()), 1.0)
    my, mx = float((window * ys).sum()) / mass + 0.5, float((window * xs).sum()) / mass + 0.5
    best = None
    for shape in shapes:
        fill, drop = _moments(shape)
        side = np.sqrt(mass / fill)
        sharp = coverage(shape, mx - ox, my - drop * side - oy, side, side, supersample=4,
                         image_size=n)
        for blur in (0.0, *BLURS):
            t = ndimage.gaussian_filter(sharp, blur, mode='constant') if blur else sharp
            err = float(((window - t) ** 2)[inside].sum())
            if best is None or err < best[0]:
                best = (err, shape, (mx, my - drop * side, side), t)
    _, shape, box, template = best
    mask, tmask = (window > 0.5) & inside, (template > 0.5) & inside
    return shape, box, float((mask & tmask).sum() / max((mask | tmask).sum(), 1))


def _colour(rgb: np.ndarray, bg: np.ndarray) -> str:
    """The palette colour c nearest to `rgb` allowing some dilution by the background: distance
    to the segment bg + t (c - bg), t in [MIN_PURITY, 1] (blur mixes a thin shape's core with
    its background; the palette stays >= 57 apart from every other colour's segment)."""
    d = _FG - bg
    t = np.clip(((rgb - bg) * d).sum(-1) / (d * d).sum(-1), MIN_PURITY, 1)
    return list(COLOURS)[int(np.argmin(np.linalg.norm(bg + t[:, None] * d - rgb, axis=-1)))]


# Alpha is measured in JPEG's (luma, chroma, chroma) space (ITU-R BT.601) with chroma weighted
# down: codecs and decoders blur chroma more than luma, and a shape that differs from its
# background mostly in chroma (green on gray) still gets the chroma contrast it needs.
_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
CHROMA_WEIGHT = 0.25
_METRIC = (_YCC.T @ np.diag([1.0, CHROMA_WEIGHT, CHROMA_WEIGHT]) @ _YCC).astype(np.float32)


def _alpha(x: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Per pixel t minimising |x - (bg + t (fg - bg))| in the _METRIC norm (not clipped, so
    noise stays zero-mean)."""
    d = _METRIC @ (fg - bg)
    return ((x - bg) @ d) / max(float((fg - bg) @ d), 1e-6)


def read_images(images, shapes: Sequence[str] = SHAPES) -> list:
    """`read_image` of each of (B, 64, 64, 3) images (uint8 or float in [0, 1])."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f'expected a batch (B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {images.shape}')
    return [read_image(im, shapes=shapes) for im in images]

# ------------------------------------------------------------------------------------------
# captions
# ------------------------------------------------------------------------------------------


_WORDS = {'shape': SHAPES, 'colour': tuple(COLOURS), 'background': tuple(BACKGROUNDS),
          'size': tuple(SIZES)}
_VERTICAL, _HORIZONTAL = ('top', 'bottom'), ('left', 'right')
_VOCAB_WORDS = tuple(w for ws in _WORDS.values() for w in ws) + _VERTICAL + _HORIZONTAL + ('center',)
_ALIASES = {'grey': 'gray', 'centre': 'center', 'middle': 'center', 'big': 'large',
            'upper': 'top', 'lower': 'bottom'}


def _one_edit(a: str, b: str) -> bool:
    """Whether b is a with one letter changed, added, dropped, or two neighbours swapped."""
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and (a[diff[0]], a[diff[1]]) == (b[diff[1]], b[diff[0]]))
    short, long_ = sorted((a, b), key=len)
    return len(long_) - len(short) == 1 and any(long_[:i] + long_[i + 1:] == short
                                                for i in range(len(long_)))


def _normalise(word: str) -> str:
    """Map a word to the vocabulary: aliases, plurals, one-typo misspellings (same first letter,
    4+ letters, a unique candidate); other words unchanged."""
    word = _ALIASES.get(word, word)
    if word in _VOCAB_WORDS or word in TEMPLATE_WORDS or len(word) < 4:
        return word
    for ending in ('s', 'es'):                      # circles, crosses
        if word.endswith(ending) and word[:-len(ending)] in _VOCAB_WORDS:
            return word[:-len(ending)]
    close = [v for v in _VOCAB_WORDS + ('background',) if v[0] == word[0] and _one_edit(word, v)]
    return close[0] if len(close) == 1 else word


def _one(found) -> Optional[str]:
    """The value if exactly one distinct value was named, else None (absent or contradictory)."""
    found = set(found)
    return found.pop() if len(found) == 1 else None


def parse_caption(text: str) -> Attributes:
    """Attributes named in a caption, in any template, word order, case or punctuation.

    Articles and other words are ignored; 'grey', 'centre', plurals and one-letter typos are
    understood. A field is None when the text names none of its values, or contradicting ones
    (two colours: the text does not say which). A background word right before 'background'
    wins over others. Position: 'top'/'bottom' and 'left'/'right' combine ('top left'); 'center'
    alone (or with nothing else) is the middle.
    """
    if not isinstance(text, str):
        raise TypeError(f'caption must be a str, got {type(text).__name__}')
    words = [_normalise(w) for w in re.findall(r'[a-z]+', text.lower())]
    fields = {f: _one(w for w in words if w in vocab) for f, vocab in _WORDS.items()}
    before = [a for a, b in zip(words, words[1:]) if b == 'background' and a in BACKGROUNDS]
    if before:
        fields['background'] = _one(before)
    vertical = {w for w in words if w in _VERTICAL}
    horizontal = {w for w in words if w in _HORIZONTAL}
    position = None
    if len(vertical) <= 1 and len(horizontal) <= 1:
        position = ' '.join([*vertical, *horizontal]) or ('center' if 'center' in words else None)
    return Attributes(position=position, **fields)


def attribute_accuracy(predicted: Sequence[Attributes], true: Sequence[Attributes]
                       ) -> Dict[str, float]:
    """Fraction of correct predictions per field, and 'all' (all five right); None is wrong."""
    if len(predicted) != len(true):
        raise ValueError(f'{len(predicted)} predictions for {len(true)} true attributes')
    if not true:
        raise ValueError('no attributes to compare')
    right = np.array([[p is not None and getattr(p, f) is not None and getattr(p, f) == getattr(t, f)
                       for f in FIELDS] for p, t in zip(predicted, true)])
    return {**{f: float(right[:, i].mean()) for i, f in enumerate(FIELDS)},
            'all': float(right.all(1).mean())}
