"""Prompt control at a fixed seed: does changing one word of the prompt change that attribute of
the drawn image, as asked, when the initial noise stays the same?

For each base combination (the first `n` held-out ones) and each attribute in `attributes`,
every value of that attribute is asked for with the SAME seed (sample j of every value uses
seed + j), the images are read back (`vd_jax.eval.shapes_reader`), and

  follows[attr]  share of (base, value) images whose read attribute is the value asked for
  varies[attr]   share of bases whose images show as many distinct values as were asked

A model whose low frequencies come from the initial noise (VD's schedule with epsilon
prediction keeps signal at its last step, Lin et al. 2023) draws the same background for every
background word: `follows` near chance (1/3), `varies` near 0.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from vd_jax.batching import map_batched
from vd_jax.data import shapes as W
from vd_jax.eval.shapes_reader import read_images

ATTRIBUTES = ('background', 'position')


def bases(n: int, seed: int = 0) -> list:
    """The first n held-out combinations (their attributes)."""
    return [s.attrs for s in W.sample('heldout', n, seed)]


def prompt_control(vd, n: int = 32, *, attributes: Sequence[str] = ATTRIBUTES, seed: int = 0,
                   template: int = 0, batch_size: Optional[int] = None, keep: int = 0,
                   **sampling) -> Dict[str, Dict[str, float]]:
    """Measure prompt control of a shapes-world model (see the module docstring).

    Args:
      vd: a `VersatileDiffusion` with text_to_image.
      n: base combinations; attributes: fields of `vd_jax.data.shapes.FIELDS` to vary.
      seed: sample j of every value uses seed + j; sampling: text_to_image keywords
        (steps, scale, sampler, spacing, guidance_rescale, ...).
      batch_size: at most this many images per text_to_image call (None: all n at once;
        the images are the same either way: sample j is seed + j whatever the batching).
      keep: also return the images of the first `keep` bases.
    Returns:
      {'follows': {attr: share}, 'varies': {attr: share}, 'chance': {attr: 1 / values},
       'values': {attr: the values asked, in order}, 'n': n}; with keep > 0 also
      'images': {attr: (keep, values, H, W, 3) float32 in [0, 1]}: row j is base j drawn with
      every value of attr at seed + j.
    """
    base = bases(n, seed)
    out = {'follows': {}, 'varies': {}, 'chance': {}, 'n': n}
    for attr in attributes:
        values = W.VOCAB[attr]
        read, kept = [], []
        for v in values:
            prompts = [W.caption(b._replace(**{attr: v}), template) for b in base]
            if batch_size is None:
                images = vd.text_to_image(prompts, 1, seed=seed, **sampling)
            else:
                images = np.stack(map_batched(lambda p, sd: vd.text_to_image(
                    p, 1, seed=sd, **sampling), prompts, batch_size, seed))
            read.append([getattr(a, attr) for a in read_images(images)])
            kept.append(np.asarray(images[:keep], np.float32))
        read = np.asarray(read, dtype=object)             # (values, n)
        asked = np.asarray(values, dtype=object)[:, None]
        out['follows'][attr] = float(np.mean(read == asked))
        out['varies'][attr] = float(np.mean([len(set(read[:, j])) == len(values)
                                             for j in range(n)]))
        out['chance'][attr] = 1.0 / len(values)
        out.setdefault('values', {})[attr] = list(values)
        if keep > 0:
            out.setdefault('images', {})[attr] = np.stack(kept, axis=1)
    return out
