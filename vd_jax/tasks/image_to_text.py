"""Image -> text (the i2t flow): CLIP image contexts condition the text data layers; the
Optimus decoder turns the latents into captions."""
from __future__ import annotations

from typing import List

from vd_jax.tasks.common import SamplingOptions, check_n, image_hw, repeat, single
from vd_jax.tasks.contexts import image_contexts, input_images, negative_image_context

PARTS_FLOWS = ('i2t',)


def run(comps, images, n: int = 1, *, options: SamplingOptions, negative_image=None,
        context=None, latents=None, progress=None, callback=None, **decode) -> List[str]:
    """Images -> captions (len(images) * n strings). Like the demo, the image is resized to
    the model's generation size (config `image_size`, 512 for the released model; the
    aspect ratio is not kept) before CLIP's own preprocessing. `decode`: Optimus decoding
    options (see `vd_jax.modalities.TextModality.decode`). `context`: ready CLIP image
    contexts (P, 257, D) instead of images; `negative_image`: one, or one per image;
    `latents`: initial x_T (P * n, latent)."""
    n = check_n(n)
    hw = image_hw(comps)
    if context is not None:
        c = repeat(image_contexts(comps, None, context=context), n)
    else:
        c = repeat(image_contexts(comps, input_images(images, hw)), n)
    b = c.shape[0]
    u = negative_image_context(comps, negative_image, c, b // n, n, 'text', options.uncond, hw)
    z = single(comps, 'text', 'image', c, u, options, shape=comps.latent_shape('text', b),
               latents=latents, progress=progress, callback=callback)
    return comps.decode_latent('text', z, seed=options.seed, **decode)
