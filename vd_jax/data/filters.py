"""The LAION filters of the VD paper (section on data), applied to one raw sample's metadata.

Scores (CLIP similarity, NSFW and watermark probabilities) are read from the metadata where it
has them; the size filters use the *original* image size when the metadata records it (the
stored image is often resized by img2dataset), else the stored image's. Every decision is
counted under its own key (`filtered/<filter>`, `unchecked/<score>`), so a build can report why
each sample was dropped.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

# A float field that is absent (or null/NaN in the metadata) is stored as NaN.
FLOAT_FIELDS = ('similarity', 'punsafe', 'pwatermark')
# Where the *original* image size lives: img2dataset json and LAION parquet columns.
WIDTH_KEYS = ('original_width', 'WIDTH')
HEIGHT_KEYS = ('original_height', 'HEIGHT')


@dataclasses.dataclass(frozen=True)
class Filters:
    """LAION filters (VD paper, section on data). `None` disables one.

    A sample is kept when similarity > min_similarity, punsafe < max_punsafe,
    pwatermark < max_pwatermark, min_aspect_ratio <= width/height <= max_aspect_ratio and
    width*height >= min_area (original size if the metadata has it, else the stored image's).
    The three score filters only apply to samples whose metadata has the score.
    """
    min_similarity: Optional[float] = 0.3   # CLIP image-text cosine similarity
    max_punsafe: Optional[float] = 0.3      # NSFW probability
    max_pwatermark: Optional[float] = 0.3   # watermark probability
    min_aspect_ratio: Optional[float] = 0.6
    max_aspect_ratio: Optional[float] = 1.667
    min_area: Optional[float] = 256 * 256 * 0.75

    @classmethod
    def none(cls) -> 'Filters':
        """No filtering at all."""
        return cls(None, None, None, None, None, None)


def meta_float(meta: Mapping[str, Any], keys: Sequence[str]) -> float:
    """The first present, finite numeric value among `keys` of a metadata dict, else NaN."""
    for k in keys:
        v = meta.get(k)
        if v is None or isinstance(v, bool):
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            return v
    return math.nan


def scores(meta: Mapping[str, Any]) -> Dict[str, float]:
    """{field: value} for every `FLOAT_FIELDS` score, NaN where the metadata lacks it."""
    return {k: meta_float(meta, (k,)) for k in FLOAT_FIELDS}


def passes_scores(values: Mapping[str, float], filters: Filters,
                  counts: collections.Counter) -> bool:
    """Apply the score filters in order (similarity, punsafe, pwatermark).

    A missing score counts `unchecked/<field>` and does not drop the sample; the first failing
    score counts `filtered/<field>` and drops it (later scores are then not looked at).
    """
    for field, limit, keep in (
            ('similarity', filters.min_similarity, lambda v, t: v > t),
            ('punsafe', filters.max_punsafe, lambda v, t: v < t),
            ('pwatermark', filters.max_pwatermark, lambda v, t: v < t)):
        if limit is None:
            continue
        if math.isnan(values[field]):
            counts[f'unchecked/{field}'] += 1
        elif not keep(values[field], limit):
            counts[f'filtered/{field}'] += 1
            return False
    return True


def original_size(meta: Mapping[str, Any], stored_size: Tuple[int, int]) -> Tuple[float, float]:
    """(width, height) recorded in the metadata, or the stored image's when either is missing
    or not positive."""
    ow, oh = meta_float(meta, WIDTH_KEYS), meta_float(meta, HEIGHT_KEYS)
    if math.isnan(ow) or math.isnan(oh) or ow <= 0 or oh <= 0:
        return stored_size
    return ow, oh


def passes_size(width: float, height: float, filters: Filters,
                counts: collections.Counter) -> bool:
    """Apply the aspect-ratio and area filters; count `filtered/aspect_ratio` or
    `filtered/min_area` for a dropped sample."""
    aspect = width / height
    if ((filters.min_aspect_ratio is not None and aspect < filters.min_aspect_ratio)
            or (filters.max_aspect_ratio is not None and aspect > filters.max_aspect_ratio)):
        counts['filtered/aspect_ratio'] += 1
        return False
    if filters.min_area is not None and width * height < filters.min_area:
        counts['filtered/min_area'] += 1
        return False
    return True
