"""Text variation (the t2t flow): CLIP text contexts condition the text data layers; the
Optimus decoder turns the latents into sentences."""
from __future__ import annotations

from typing import List

from vd_jax.tasks.common import SamplingOptions, check_n, single
from vd_jax.tasks.contexts import negative_text_context, text_contexts

PARTS_FLOWS = ('t2t',)


def run(comps, prompts, n: int = 1, *, options: SamplingOptions, negative_prompt='',
        context=None, latents=None, progress=None, callback=None, **decode) -> List[str]:
    """Prompts (strings or CLIP token ids), or ready contexts -> P * n sentences.
    `decode`: Optimus decoding options (method='sample' | 'greedy' | 'beam', temperature,
    top_k, top_p, beam_size, remove_duplicates)."""
    n = check_n(n)
    c = text_contexts(comps, prompts, n, context)
    b = c.shape[0]
    u = negative_text_context(comps, negative_prompt, c, b // n, n, 'text', options.uncond)
    z = single(comps, 'text', 'text', c, u, options, shape=comps.latent_shape('text', b),
               latents=latents, progress=progress, callback=callback)
    return comps.decode_latent('text', z, seed=options.seed, **decode)
