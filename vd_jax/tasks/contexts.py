"""The contexts a task conditions on: prompts, images, ready contexts and negatives.

Inputs come in as users give them (strings or CLIP token ids, image files / arrays, keep-masks,
ready contexts (P, L, D)); out come contexts (B, L, D) float32 of the model, each input's
repeated n times input-major. Problems with the arguments (and a file that is not an image)
are `vd_jax.errors.InputError`s.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vd_jax import applications as apps
from vd_jax import modalities as M
from vd_jax.errors import InputError
from vd_jax.image_io import as_list, load_images, load_mask
from vd_jax.tasks.common import check_n, per_prompt, prompts_list, repeat, task_errors
from vd_jax.tokenizers import token_ids


# ------------------------------------------------------------------------------------------------
# Inputs, as a task takes them
# ------------------------------------------------------------------------------------------------

def input_images(images, hw) -> np.ndarray:
    """`vd_jax.image_io.load_images` for a task: (B, h, w, 3) float32 in [0, 1]."""
    with task_errors():
        return load_images(images, hw)


def input_masks(masks, hw) -> list:
    """Keep-masks (one, or a list; None entries: whole image) -> a list of (h, w) float32 in
    [0, 1] or None (`vd_jax.image_io.load_mask`)."""
    with task_errors():
        return [None if m is None else load_mask(m, hw) for m in as_list(masks)]


def prompt_token_ids(prompts):
    """`vd_jax.tokenizers.token_ids` for a task: (P, L) int CLIP ids, or None for strings."""
    with task_errors():
        return token_ids(prompts)


# ------------------------------------------------------------------------------------------------
# Contexts
# ------------------------------------------------------------------------------------------------

def ready_context(comps, context, modality: str, what: str = 'context') -> jnp.ndarray:
    """Ready contexts (P, L, D) of `modality` (e.g. from `comps.encode_context`; one (L, D)
    is P = 1), checked against the model: L the modality's context length, D its context
    width (`vd_jax.modalities.Modality.context_dim`)."""
    c = jnp.asarray(context, jnp.float32)
    if c.ndim == 2:
        c = c[None]
    m = M.get(modality)
    length, dim = m.context_length(comps.config), m.context_dim(comps.config)
    if c.ndim != 3 or c.shape[0] < 1 or c.shape[1] != length or (dim and c.shape[2] != dim):
        raise InputError(f'{what}: ready {modality} contexts must be (P, {length}, {dim}) float '
                         f'arrays (as comps.encode_context({modality!r}, ...) gives), got shape '
                         f'{tuple(c.shape)}')
    return c


def text_contexts(comps, prompts, n: int, context=None):
    """CLIP text contexts of prompts (strings, or token ids: see `vd_jax.tokenizers.token_ids`),
    each repeated n times prompt-major; or ready contexts (P, L, D) given as `context`."""
    if context is not None:
        return repeat(ready_context(comps, context, 'text'), check_n(n))
    ids = prompt_token_ids(prompts)
    if ids is not None:
        with task_errors():
            return repeat(comps.encode_context('text', ids), check_n(n))
    n = check_n(n)
    # each prompt encoded once, then repeated: a truncation warning names the user's index
    return repeat(comps.encode_context('text', prompts_list(prompts, 1)), n)


def negative_text_context(comps, negative, like, prompts: int, n: int, output: str, convention: str):
    """The unconditional text context: the convention's, or negative prompts (one, or one
    per prompt; strings or token ids) each repeated n times."""
    if negative is None or (isinstance(negative, str) and negative == ''):
        return comps.uncond_context('text', output, convention, like)
    ids = prompt_token_ids(negative)
    if ids is not None:
        rows = per_prompt(list(ids), prompts, 'negative prompts')
        return repeat(comps.encode_context('text', np.stack(rows)), n)
    neg = [str(x) for x in per_prompt(negative, prompts, 'negative prompts')]
    return repeat(comps.encode_context('text', neg), n)


def negative_image_context(comps, negative, like, images: int, n: int, output: str, convention: str,
                           hw):
    """The unconditional image context: the convention's, or negative images (one, or one
    per input) each repeated n times."""
    if negative is None:
        return comps.uncond_context('image', output, convention, like)
    neg = per_prompt(negative, images, 'negative images')
    u = repeat(comps.encode_context('image', list(input_images(neg, hw))), n)
    if u.shape[1] != like.shape[1]:
        u = jnp.tile(u, (1, like.shape[1] // u.shape[1], 1))
    return u


def image_contexts(comps, images01: np.ndarray, focus=None, masks=None, context=None):
    """CLIP contexts (B, 257, D) of images, or the ready contexts `context` (B, 257, D);
    `focus` (one value, or one per image) applies the v1.0 style/semantic disentanglement to
    the patch tokens (the global CLS token is kept); `masks`: keep-masks per image (None
    entries: whole image)."""
    if context is not None:
        c = ready_context(comps, context, 'image')
    else:
        c = comps.encode_context('image', list(images01), masks=masks)
    focus = list(focus) if isinstance(focus, (list, tuple, np.ndarray)) else [focus] * len(c)
    if len(focus) != len(c):
        raise InputError(f'{len(focus)} focus values for {len(c)} images')
    if any(f is not None and float(f) != 0.5 for f in focus):
        with task_errors():
            rows = [c[i:i + 1] if f is None or float(f) == 0.5 else jnp.concatenate(
                [c[i:i + 1, :1], apps.adjust_rank(c[i:i + 1, 1:], f)], axis=1)
                for i, f in enumerate(focus)]
        c = jnp.concatenate(rows, axis=0)
    return c
