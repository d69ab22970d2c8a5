"""Text -> image (the t2i flow): CLIP text contexts condition the image data layers."""
from __future__ import annotations

import numpy as np

from vd_jax.tasks.common import SamplingOptions, check_n, image_hw, single
from vd_jax.tasks.contexts import negative_text_context, text_contexts

PARTS_FLOWS = ('t2i',)


def run(comps, prompts, n: int = 1, *, options: SamplingOptions, height=None, width=None,
        negative_prompt='', context=None, latents=None, progress=None,
        callback=None) -> np.ndarray:
    """Prompts (strings or CLIP token ids (P, 77)), or ready contexts (P, 77, D) -> images
    (P * n, H, W, 3) float32 in [0, 1], prompt-major. `negative_prompt`: one, or one per
    prompt (replaces the unconditional context); `latents`: initial x_T (P * n, h, w, 4)."""
    n = check_n(n)
    hw = image_hw(comps, height, width)
    c = text_contexts(comps, prompts, n, context)
    b = c.shape[0]
    u = negative_text_context(comps, negative_prompt, c, b // n, n, 'image', options.uncond)
    z = single(comps, 'image', 'text', c, u, options, shape=comps.latent_shape('image', b, hw),
               latents=latents, progress=progress, callback=callback)
    return comps.decode_latent('image', z)
