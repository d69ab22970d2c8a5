"""Editable image -> text -> image (the legacy CLI's I2T2I): caption latents of the image are
edited (the negative prompt's direction removed, the positive prompt's latent added), decoded
to sentences, and an image is generated from those sentences plus the positive prompt mixed
with the image's low-rank (style) context."""
from __future__ import annotations

import warnings
from typing import List, Tuple

import jax.numpy as jnp
import numpy as np

from vd_jax import applications as apps
from vd_jax.tasks.common import SamplingOptions, check_n, image_hw, mixed, repeat, single
from vd_jax.tasks.contexts import (image_contexts, input_images, negative_image_context,
                                   negative_text_context)
from vd_jax.tokenizers import PromptTruncatedWarning

PARTS_FLOWS = ('i2t', 't2i', 'i2i')


def run(comps, image, positive: str = '', negative: str = '', n: int = 1, *,
        options: SamplingOptions, image_weight: float = 0.33, height=None, width=None,
        negative_prompt='', negative_image=None, context=None, latents=None,
        text_latents=None, progress=None, callback=None) -> Tuple[List[str], np.ndarray]:
    """Returns (edited sentences (n), images (n, H, W, 3)). The image context weight is
    `image_weight` at attention level; the text part is the decoded sentences' tokens
    concatenated with the positive prompt's. `positive` / `negative` are the edit (sentences
    Optimus encodes), not guidance.

    negative_prompt: replaces the unconditional text context of the image generation.
    negative_image: replaces the unconditional image context of both runs.
    context: a ready CLIP image context (1, 257, D) instead of the image.
    text_latents: initial x_T (n, latent) of the caption run; latents: of the image run.
    callback(step, latents) runs for both runs (text latents first, then image latents)."""
    n = check_n(n)
    hw = image_hw(comps, height, width)
    if context is not None:
        cim1 = image_contexts(comps, None, context=context)[:1]
    else:
        cim1 = comps.encode_context('image', list(input_images(image, image_hw(comps))[:1]))
    cim = repeat(cim1, n)
    uim = negative_image_context(comps, negative_image, cim, 1, n, 'text', options.uncond,
                                 image_hw(comps))
    zt = single(comps, 'text', 'image', cim, uim, options, shape=comps.latent_shape('text', n),
                latents=text_latents, progress=progress, callback=callback)
    z_neg, z_pos = comps.encode_latent('text', [negative, positive])
    texts = comps.decode_latent('text', apps.edit_text_latent(zt, z_neg, z_pos),
                                seed=options.seed)
    with warnings.catch_warnings():
        # the decoded sentences are the model's, not prompts the user wrote: CLIP reads their
        # first 75 tokens, as the original does, and a "prompt i is truncated" would mislead
        warnings.simplefilter('ignore', PromptTruncatedWarning)
        ctx_sentences = comps.encode_context('text', texts)
    ctx_text = jnp.concatenate([ctx_sentences,
                                repeat(comps.encode_context('text', [positive]), n)], axis=1)
    half = ctx_text[:, :ctx_text.shape[1] // 2]
    u_text = jnp.concatenate([negative_text_context(comps, negative_prompt, half, 1, n, 'image',
                                                    options.uncond)] * 2, axis=1)
    c_img = apps.find_low_rank(cim[:, 1:], q=10)
    if negative_image is None:
        u_img = comps.uncond_context('image', 'image', options.uncond, cim)[:, 1:]
    else:
        u_img = uim[:, 1:]
    z = mixed(comps, 'attention', (c_img, ctx_text), (u_img, u_text), ('image', 'text'),
              [image_weight, 1 - float(image_weight)], 'image', options,
              shape=comps.latent_shape('image', n, hw), latents=latents, progress=progress,
              callback=callback, seed_offset=1000)
    return texts, comps.decode_latent('image', z)
