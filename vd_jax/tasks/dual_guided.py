"""Dual-guided generation: prompts and images mixed at attention, layer or model level, for
image outputs (t2i + i2i flows) or text outputs (t2t + i2t)."""
from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np

from vd_jax.errors import InputError
from vd_jax.tasks.common import SamplingOptions, check_n, image_hw, mixed, repeat
from vd_jax.tasks.contexts import (image_contexts, input_images, negative_image_context,
                                   negative_text_context, ready_context, text_contexts)

PARTS_FLOWS = ('t2i', 'i2i')
TEXT_FLOWS = ('t2t', 'i2t')


def run(comps, prompt, image, n: int = 1, *, options: SamplingOptions, mix: float = 0.5,
        mix_level: str = 'attention', height=None, width=None, focus: float = 0.5,
        output: str = 'image', negative_prompt='', negative_image=None, context=None,
        latents=None, progress=None, callback=None, level=None, **decode):
    """Prompt(s) + image(s) -> n outputs per pair: images, or sentences with output='text'.

    prompt / image: one each, or equal-length lists (pairs; a single one is broadcast).
      Prompts are strings or CLIP token ids (`vd_jax.tokenizers.token_ids`).
    context: ready contexts (text (P, 77, D), image (P, 257, D)) instead of prompt and image
      (pass None for those); either entry may be None to encode that side as usual.
    mix: the text strength in [0, 1] (1 = text only, 0 = image only).
    mix_level: 'attention' (every context layer mixes both: h = mix * text(h) + (1-mix) *
      image(h)), 'layer' (each context layer runs one context, drawn with probability mix
      per layer), or 'model' (the paper's baseline: whole single-context steps alternate,
      text on a fraction `mix` of the steps).
    negative_prompt / negative_image: replace the unconditional contexts (one, or one per
      pair). latents: initial x_T (P * n, ...).
    level: the former name of mix_level (deprecated).
    """
    if level is not None:
        warnings.warn("dual_guided(level=...) is now mix_level=...", DeprecationWarning,
                      stacklevel=3)
        mix_level = level
    n = check_n(n)
    if not 0.0 <= float(mix) <= 1.0:
        raise InputError(f'mix (text strength) must be in [0, 1], got {mix}')
    if output not in ('image', 'text'):
        raise InputError(f"output must be 'image' or 'text', got {output!r}")
    ctx_text, ctx_image = (None, None) if context is None else tuple(context)
    hw = image_hw(comps, height, width) if output == 'image' else image_hw(comps)
    if (prompt is None and ctx_text is None) or (image is None and ctx_image is None):
        raise InputError('dual_guided needs a prompt and an image (or their ready contexts)')
    if ctx_text is not None:
        ct1 = ready_context(comps, ctx_text, 'text', 'context[0]')
    else:
        ct1 = text_contexts(comps, prompt, 1)
    if ctx_image is not None:
        ci_raw = ready_context(comps, ctx_image, 'image', 'context[1]')
    else:
        ci_raw = input_images(image, hw)
    pairs = max(len(ct1), len(ci_raw))
    if {len(ct1), len(ci_raw)} - {1, pairs}:
        raise InputError(f'{len(ct1)} prompts and {len(ci_raw)} images: give equal numbers '
                         '(pairs), or one of either')
    xp = np if ctx_image is None else jnp
    ci_raw = xp.repeat(ci_raw, pairs // len(ci_raw), axis=0)
    ci1 = image_contexts(comps, None if ctx_image is not None else ci_raw, focus,
                         context=ci_raw if ctx_image is not None else None)
    ct = repeat(jnp.repeat(ct1, pairs // len(ct1), axis=0), n)
    ci = repeat(ci1, n)
    us = (negative_text_context(comps, negative_prompt, ct, pairs, n, output, options.uncond),
          negative_image_context(comps, negative_image, ci, pairs, n, output, options.uncond, hw))
    z = mixed(comps, mix_level, (ct, ci), us, ('text', 'image'), [mix, 1 - float(mix)], output,
              options, shape=comps.latent_shape(output, pairs * n, hw), latents=latents,
              progress=progress, callback=callback)
    if output == 'image':
        return comps.decode_latent('image', z)
    return comps.decode_latent('text', z, seed=options.seed, **decode)
