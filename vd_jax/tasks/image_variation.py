"""Image variation (the i2i flow), with the demo's fidelity start, style/semantic focus and
colour adjustment."""
from __future__ import annotations

import numpy as np

from vd_jax import applications as apps
from vd_jax.errors import InputError
from vd_jax.tasks.common import SamplingOptions, check_n, context_seeds, image_hw, repeat, single
from vd_jax.tasks.contexts import image_contexts, input_images, negative_image_context

PARTS_FLOWS = ('i2i',)


def run(comps, images, n: int = 1, *, options: SamplingOptions, height=None, width=None,
        fidelity: float = 0.0, focus: float = 0.5, color_adjust: bool = False,
        negative_image=None, context=None, start_step=None, latents=None, progress=None,
        callback=None) -> np.ndarray:
    """Images -> variations (len(images) * n, H, W, 3) in [0, 1].

    fidelity in [0, 1): start from the VAE latent of the input noised to step
      int(steps * (1 - fidelity)) (the demo's slider, with its off-by-one start); 1 returns
      the inputs.
    start_step: that start as an explicit ascending DDIM grid index k in [0, grid length)
      (fidelity f is k = int(steps * (1 - f))); exclusive with fidelity.
    focus: the v1.0 style/semantic slider (0 semantic, 0.5 off, 1 style).
    color_adjust: match each output's colour statistics to its input ('Simple').
    negative_image: replaces the unconditional context (one, or one per input image).
    context: ready CLIP image contexts (P, 257, D) instead of images (focus applies; no
      fidelity/start_step/colour, which need the images).
    latents: initial x_T (P * n, h, w, 4) (not with a start from the image).
    """
    n = check_n(n)
    if not 0.0 <= float(fidelity) <= 1.0:
        raise InputError(f'fidelity must be in [0, 1], got {fidelity}')
    if start_step is not None:
        if float(fidelity):
            raise InputError('give fidelity or start_step, not both (fidelity f starts at '
                             'start_step = int(steps * (1 - f)))')
        if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) \
                or start_step < 0:
            raise InputError(f'start_step must be an integer >= 0 (an ascending DDIM grid index), '
                             f'got {start_step!r}')
    hw = image_hw(comps, height, width)
    if context is not None:
        if fidelity or color_adjust or start_step is not None:
            raise InputError('fidelity, start_step and color_adjust need input images, not '
                             'ready contexts')
        c, x_in = repeat(image_contexts(comps, None, focus, context=context), n), None
    else:
        inputs = input_images(images, hw)
        x_in = np.repeat(inputs, n, axis=0)
        if float(fidelity) == 1.0:
            return x_in.copy()
        c = repeat(image_contexts(comps, inputs, focus), n)
    b = c.shape[0]
    u = negative_image_context(comps, negative_image, c, b // n, n, 'image', options.uncond, hw)
    x0 = start = None
    if float(fidelity) > 0:
        start = int(options.steps * (1 - float(fidelity)))
    elif start_step is not None:
        start = int(start_step)
    if start is not None:
        if latents is not None:
            raise InputError('latents (an initial x_T) and a start from the image (fidelity / '
                             'start_step) are exclusive: give one of them')
        x0 = comps.encode_latent('image', x_in, keys=context_seeds(options.seed, b, 2))
    z = single(comps, 'image', 'image', c, u, options, x0=x0, start_step=start,
               shape=comps.latent_shape('image', b, hw), latents=latents,
               progress=progress, callback=callback)
    out = comps.decode_latent('image', z)
    if color_adjust:
        out = np.stack([apps.color_adjust(o[None], r)[0] for o, r in zip(out, x_in)])
    return out
