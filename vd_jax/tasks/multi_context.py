"""Multi-context generation (the demo's MCG): several images, each scaled by its strength and
optionally masked, concatenated into one image context, plus an optional prompt mixed at
attention level."""
from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from vd_jax.errors import InputError
from vd_jax.tasks.common import SamplingOptions, check_n, image_hw, mixed, repeat, single
from vd_jax.tasks.contexts import (image_contexts, input_images, input_masks,
                                   negative_image_context, negative_text_context, prompt_token_ids,
                                   text_contexts)

PARTS_FLOWS = ('t2i', 'i2i')


def run(comps, images: Sequence, strengths: Optional[Sequence[float]] = None,
        prompt: Optional[str] = None, n: int = 1, *, options: SamplingOptions,
        text_strength: float = 0.5, masks: Optional[Sequence] = None, height=None, width=None,
        focus=0.5, negative_prompt='', negative_image=None, context=None, latents=None,
        progress=None, callback=None) -> np.ndarray:
    """masks: optional keep-mask per image ((H, W) in [0, 1], 1 = use this region; None =
    whole image), resized with the image, then applied to CLIP's tokens as the demo.
    focus: one style/semantic focus for all images or one per image.
    prompt: a string or CLIP token ids (L,) / (1, L).
    context: ready per-image CLIP contexts (K, 257, D) instead of images (no masks).
    negative_prompt / negative_image: replace the unconditional contexts (one each: the
    negative image's context is tiled over the K images' tokens).
    latents: initial x_T (n, h, w, 4)."""
    n = check_n(n)
    hw = image_hw(comps, height, width)
    if context is not None:
        if masks is not None:
            raise InputError('masks need the input images, not ready contexts')
        c_each = image_contexts(comps, None, focus, context=context)
    else:
        imgs = input_images(images, hw)
        if masks is not None:
            masks = input_masks(masks, hw)
        c_each = image_contexts(comps, imgs, focus, masks=masks)
    k = len(c_each)
    strengths = [1.0] * k if strengths is None else [float(s) for s in strengths]
    if len(strengths) != k:
        raise InputError(f'{len(strengths)} strengths for {k} images')
    ci = repeat(jnp.concatenate([c_each[i:i + 1] * s for i, s in enumerate(strengths)], axis=1), n)
    ui = negative_image_context(comps, negative_image, ci, 1, n, 'image', options.uncond, hw)
    shape = comps.latent_shape('image', n, hw)
    kw = dict(shape=shape, latents=latents, progress=progress, callback=callback)
    ids = prompt_token_ids(prompt)
    if (ids is None and not prompt) or float(text_strength) == 0:
        return comps.decode_latent('image', single(comps, 'image', 'image', ci, ui, options, **kw))
    if not 0.0 <= float(text_strength) <= 1.0:
        raise InputError(f'text_strength must be in [0, 1], got {text_strength}')
    if ids is not None and len(ids) != 1:
        raise InputError(f'multi_context takes one prompt, got {len(ids)} token-id rows')
    ct = text_contexts(comps, ids if ids is not None else [str(prompt)], n)
    ut = negative_text_context(comps, negative_prompt, ct, 1, n, 'image', options.uncond)
    z = mixed(comps, 'attention', (ct, ci), (ut, ui), ('text', 'image'),
              [text_strength, 1 - float(text_strength)], 'image', options, **kw)
    return comps.decode_latent('image', z)
