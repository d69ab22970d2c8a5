"""Multi-context generation (the demo's MCG): several images, each scaled by its strength and
optionally masked, concatenated into one image context, plus an optional prompt mixed at
attention level."""
from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from vd_jax.image_io import as_list
from vd_jax.tasks.common import (SamplingOptions, TaskError, check_n, image_contexts, image_hw,
                                 load_images, load_mask, mixed, negative_image_context,
                                 negative_text_context, repeat, single, text_contexts)

PARTS_FLOWS = ('t2i', 'i2i')


def run(comps, images: Sequence, strengths: Optional[Sequence[float]] = None,
        prompt: Optional[str] = None, n: int = 1, *, options: SamplingOptions,
        text_strength: float = 0.5, masks: Optional[Sequence] = None, height=None, width=None,
        focus=0.5, negative_prompt='', negative_image=None, latents=None, progress=None,
        callback=None) -> np.ndarray:
    """masks: optional keep-mask per image ((H, W) in [0, 1], 1 = use this region; None =
    whole image), resized with the image, then applied to CLIP's tokens as the demo.
    focus: one style/semantic focus for all images or one per image."""
    n = check_n(n)
    hw = image_hw(comps, height, width)
    imgs = load_images(images, hw)
    strengths = [1.0] * len(imgs) if strengths is None else [float(s) for s in strengths]
    if len(strengths) != len(imgs):
        raise TaskError(f'{len(strengths)} strengths for {len(imgs)} images')
    if masks is not None:
        masks = [None if m is None else load_mask(m, hw) for m in as_list(masks)]
    c_each = image_contexts(comps, imgs, focus, masks=masks)
    ci = repeat(jnp.concatenate([c_each[i:i + 1] * s for i, s in enumerate(strengths)], axis=1), n)
    ui = negative_image_context(comps, negative_image, ci, 1, n, 'image', options.uncond, hw)
    shape = comps.latent_shape('image', n, hw)
    kw = dict(shape=shape, latents=latents, progress=progress, callback=callback)
    if not prompt or float(text_strength) == 0:
        return comps.decode_latent('image', single(comps, 'image', 'image', ci, ui, options, **kw))
    if not 0.0 <= float(text_strength) <= 1.0:
        raise TaskError(f'text_strength must be in [0, 1], got {text_strength}')
    ct = text_contexts(comps, [str(prompt)], n)
    ut = negative_text_context(comps, negative_prompt, ct, 1, n, 'image', options.uncond)
    z = mixed(comps, 'attention', (ct, ci), (ut, ui), ('text', 'image'),
              [text_strength, 1 - float(text_strength)], 'image', options, **kw)
    return comps.decode_latent('image', z)
