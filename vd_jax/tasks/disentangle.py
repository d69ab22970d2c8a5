"""Style/semantic disentanglement of an image variation: the v1.0 demo's continuous focus, or
the paper/CLI levels -2..2 (low-rank edits of the CLIP image context)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from vd_jax import applications as apps
from vd_jax.errors import InputError
from vd_jax.tasks import image_variation
from vd_jax.tasks.common import SamplingOptions, check_n, image_hw, repeat, single
from vd_jax.tasks.contexts import image_contexts, input_images, negative_image_context

PARTS_FLOWS = ('i2i',)


def run(comps, image, n: int = 1, *, options: SamplingOptions, focus: Optional[float] = None,
        level: Optional[int] = None, height=None, width=None, negative_image=None,
        context=None, latents=None, progress=None, callback=None) -> np.ndarray:
    """focus: the v1.0 demo's control in [0, 1] (0 = semantic, 0.5 = plain variation, 1 =
      style), applied to the conditional context only.
    level: the paper/CLI levels -2..2 (negative = semantic, positive = style), applied to
      the conditional and the unconditional context as the CLI does.
    Give exactly one of them. context: a ready CLIP image context (1, 257, D) instead of the
    image; negative_image replaces the unconditional context; latents: initial x_T."""
    n = check_n(n)
    if (focus is None) == (level is None):
        raise InputError('disentangle: give exactly one of focus (0..1) or level (-2..2)')
    kw = dict(height=height, width=width, negative_image=negative_image, context=context,
              latents=latents, progress=progress, callback=callback)
    if focus is not None:
        return image_variation.run(comps, image, n, options=options, focus=focus, **kw)
    if level not in (-2, -1, 0, 1, 2):
        raise InputError(f'disentangle level must be one of -2, -1, 0, 1, 2; got {level!r}')
    hw = image_hw(comps, height, width)
    c = image_contexts(comps, None, context=context)[:1] if context is not None else \
        image_contexts(comps, input_images(image, hw)[:1])
    u = negative_image_context(comps, negative_image, c, 1, 1, 'image', options.uncond, hw)
    c, u = apps.legacy_disentangle(c, level), apps.legacy_disentangle(u, level)
    z = single(comps, 'image', 'image', repeat(c, n), repeat(u, n), options,
               shape=comps.latent_shape('image', n, hw), latents=latents, progress=progress,
               callback=callback)
    return comps.decode_latent('image', z)
