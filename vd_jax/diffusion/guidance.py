"""Classifier-free guidance as a wrapper around a `denoise_fn` (Ho & Salimans 2022; VD
`DDIMSampler.p_sample_ddim`, `ddim.py:130-150`).

A denoiser here is `denoise_fn(x_t, t, ctx) -> eps` with x_t (B, ...), t (B,) int and `ctx` a
pytree whose every leaf has a leading batch axis B (one context array, a tuple of two contexts
for dual-guided mixing, a dict, ...). Guidance batches the unconditional and conditional
passes into ONE call of batch 2B, like the original.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]


def is_static_one(scale) -> bool:
    """True when `scale` is a Python number equal to 1 (then only the conditional pass runs)."""
    return isinstance(scale, (int, float)) and not isinstance(scale, bool) and float(scale) == 1.0


def is_static_zero(x) -> bool:
    """True when `x` is a Python number equal to 0 (then the option is compiled out)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and float(x) == 0.0


def concat_contexts(uncond_context, context):
    """Leaf-wise `concatenate([uncond, cond], axis=0)` of two context pytrees of equal structure."""
    u_def, c_def = jax.tree.structure(uncond_context), jax.tree.structure(context)
    if u_def != c_def:
        raise ValueError(f'uncond_context and context differ in structure: {u_def} vs {c_def}')

    def cat(u, c):
        if u.shape != c.shape:
            raise ValueError(f'uncond_context leaf shape {u.shape} != context leaf shape {c.shape}')
        return jnp.concatenate([u, c.astype(u.dtype)], axis=0)
    return jax.tree.map(cat, uncond_context, context)


def rescale_guided(guided, cond, phi):
    """Guidance rescale (Lin et al. 2023 §3.4, diffusers' `guidance_rescale`): scale the guided
    output to the per-sample standard deviation of the conditional one, then mix
    phi * rescaled + (1 - phi) * guided. Fights the over-exposure that large scales give with
    zero terminal SNR. Per sample: std over every axis but the batch."""
    axes = tuple(range(1, guided.ndim))
    std_c = jnp.std(cond, axis=axes, keepdims=True)
    std_g = jnp.std(guided, axis=axes, keepdims=True)
    phi = jnp.asarray(phi, jnp.float32)
    return phi * (guided * (std_c / std_g)) + (1. - phi) * guided


# A denoise_fn with this attribute set to True takes (x (B, ...), t (B,), contexts (2B, ...))
# for classifier-free guidance and returns 2B rows (see cfg_denoise).
SHARES_X = 'shares_x_across_contexts'


def shares_x(fn) -> bool:
    """Whether `fn` takes x once for several context groups (its `SHARES_X` attribute)."""
    return bool(getattr(fn, SHARES_X, False))


def mark_shares_x(fn, value: bool = True):
    """Set `fn`'s `SHARES_X` attribute (cfg_denoise then passes x once); returns `fn`."""
    setattr(fn, SHARES_X, bool(value))
    return fn


def cfg_denoise(denoise_fn: DenoiseFn, scale, rescale=0.0) -> Callable[..., jnp.ndarray]:
    """Wrap `denoise_fn` with classifier-free guidance.

    Args:
      denoise_fn: (x_t, t, ctx) -> eps.
      scale: guidance scale s (Python float or traced scalar). A Python 1 / 1.0 skips the
        unconditional pass entirely (the original's `if scale == 1.` branch); any other value,
        including a traced 1.0, runs the batched two-pass formula.
      rescale: guidance rescale phi (`rescale_guided`); a Python 0 skips it (VD's default).
        The guidance acts on whatever the denoiser outputs (eps, v or x0), as in diffusers.
    Returns:
      guided(x_t, t, context, uncond_context=None) -> eps, with
      eps = e_u + s (e_c - e_u) computed in float32 from ONE call
      `denoise_fn(concat[x_t, x_t], concat[t, t], concat_leaves[uncond, cond])`; or, when
      `denoise_fn` has a true attribute `SHARES_X` ('shares_x_across_contexts'),
      `denoise_fn(x_t, t, concat_leaves[uncond, cond])` returning 2B rows: the model
      repeats x where the halves start to differ (`vd_jax.models.unet.Diffuser`: after the
      first self-attention), so the shared prefix runs once.
    """
    if is_static_one(scale):
        def conditional(x_t, t, context, uncond_context=None):
            del uncond_context  # unused at scale 1, as in the original
            return denoise_fn(x_t, t, context).astype(jnp.float32)
        return conditional

    def guided(x_t, t, context, uncond_context=None):
        if uncond_context is None:
            raise ValueError(f'guidance scale {scale} needs an uncond_context '
                             '(pass guidance_scale=1.0 for conditional-only sampling)')
        b = x_t.shape[0]
        if shares_x(denoise_fn):   # the model repeats x itself, late
            eps = denoise_fn(x_t, t, concat_contexts(uncond_context, context))
        else:
            eps = denoise_fn(jnp.concatenate([x_t, x_t], axis=0),
                             jnp.concatenate([t, t], axis=0),
                             concat_contexts(uncond_context, context))
        if eps.shape[0] != 2 * b:
            raise ValueError(f'denoise_fn returned batch {eps.shape[0]} for a guided batch of {2 * b}')
        eps = eps.astype(jnp.float32)
        e_u, e_c = eps[:b], eps[b:]
        out = e_u + jnp.asarray(scale, jnp.float32) * (e_c - e_u)
        if is_static_zero(rescale):
            return out
        return rescale_guided(out, e_c, rescale)
    return guided
