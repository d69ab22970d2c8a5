"""Dual-guided generation: prompts and images mixed at attention, layer or model level, for
image outputs (t2i + i2i flows) or text outputs (t2t + i2t)."""
from __future__ import annotations

import warnings

from vd_jax.image_io import as_list
from vd_jax.tasks.common import (SamplingOptions, TaskError, check_n, image_contexts, image_hw,
                                 load_images, mixed, negative_image_context, negative_text_context,
                                 repeat, text_contexts)

PARTS_FLOWS = ('t2i', 'i2i')
TEXT_FLOWS = ('t2t', 'i2t')


def run(comps, prompt, image, n: int = 1, *, options: SamplingOptions, mix: float = 0.5,
        mix_level: str = 'attention', height=None, width=None, focus: float = 0.5,
        output: str = 'image', negative_prompt='', negative_image=None, latents=None,
        progress=None, callback=None, level=None, **decode):
    """Prompt(s) + image(s) -> n outputs per pair: images, or sentences with output='text'.

    prompt / image: one each, or equal-length lists (pairs; a single one is broadcast).
    mix: the text strength in [0, 1] (1 = text only, 0 = image only).
    mix_level: 'attention' (every context layer mixes both: h = mix * text(h) + (1-mix) *
      image(h)), 'layer' (each context layer runs one context, drawn with probability mix
      per layer), or 'model' (the paper's baseline: whole single-context steps alternate,
      text on a fraction `mix` of the steps).
    level: the former name of mix_level (deprecated).
    """
    if level is not None:
        warnings.warn("dual_guided(level=...) is now mix_level=...", DeprecationWarning,
                      stacklevel=3)
        mix_level = level
    n = check_n(n)
    if not 0.0 <= float(mix) <= 1.0:
        raise TaskError(f'mix (text strength) must be in [0, 1], got {mix}')
    if output not in ('image', 'text'):
        raise TaskError(f"output must be 'image' or 'text', got {output!r}")
    prompts, images = as_list(prompt), as_list(image)
    pairs = max(len(prompts), len(images))
    if {len(prompts), len(images)} - {1, pairs}:
        raise TaskError(f'{len(prompts)} prompts and {len(images)} images: give equal numbers '
                        '(pairs), or one of either')
    prompts, images = prompts * (pairs // len(prompts)), images * (pairs // len(images))
    hw = image_hw(comps, height, width) if output == 'image' else image_hw(comps)
    ct = text_contexts(comps, [str(p) for p in prompts], n)
    ci = repeat(image_contexts(comps, load_images(images, hw), focus), n)
    us = (negative_text_context(comps, negative_prompt, ct, pairs, n, output, options.uncond),
          negative_image_context(comps, negative_image, ci, pairs, n, output, options.uncond, hw))
    z = mixed(comps, mix_level, (ct, ci), us, ('text', 'image'), [mix, 1 - float(mix)], output,
              options, shape=comps.latent_shape(output, pairs * n, hw), latents=latents,
              progress=progress, callback=callback)
    if output == 'image':
        return comps.decode_latent('image', z)
    return comps.decode_latent('text', z, seed=options.seed, **decode)
