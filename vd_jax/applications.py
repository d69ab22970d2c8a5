"""VD's applications as pure functions on contexts and latents (`app.py`, legacy `inference.py`).

* `adjust_rank`: the v1.0 demo's style/semantic "focus" (0 = semantic, 0.5 = identity,
  1 = style) on the 256 patch tokens of a CLIP image context (`app.py:48-127`).
* `find_low_rank` / `remove_low_rank` / `legacy_disentangle`: the Nov-2022 CLI's levels
  -2..2 (`inference.py:172-275`).
* `edit_text_latent`: I2T2I's latent edit (remove the negative prompt's direction, add the
  positive prompt's latent; legacy `inference.py:320-387`).
* `color_adjust`: the demo's "Simple" colour matching.
(The demo's cleanup of repeated n-grams in decoded text is `vd_jax.text_io.remove_repeated_ngrams`.)

The originals use `torch.pca_lowrank` (a randomized SVD: q=20, niter=100 in v1.0; niter=10
in the CLI). Here the top-q singular triplets come from an exact SVD; the randomized
estimate converges to it, so results agree up to that estimate's error.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np


def _top_svd(x, q: int):
    """Exact rank-q truncated SVD of a batch (B, N, D): u (B,N,q), s (B,q), v (B,D,q)."""
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)
    return u[..., :q], s[..., :q], jnp.swapaxes(vt[..., :q, :], -1, -2)


def _compose(u, s, v):
    return jnp.einsum('bnq,bq,bdq->bnd', u, s, v)


def _semantic_scales(lvl: float, max_drop: int) -> np.ndarray:
    """Multipliers of s[0..max_drop] for lvl < 0.5: y0 = -max_drop at lvl 0, 1 at lvl 0.5
    (exponential in lvl), then linear in the component index up to 1 at max_drop + 1."""
    t0, t1 = math.exp(-1.0), 1.0
    y0 = (math.exp((lvl - 0.5) * 2) - t0) / (t1 - t0) * (1 + max_drop) - max_drop
    return np.array([max(0.0, xi / (max_drop + 1) * (1 - y0) + y0) for xi in range(max_drop + 1)])


def _style_scales(lvl: float, keep: int, q: int) -> np.ndarray:
    """Multipliers of s[keep..q-1] for lvl > 0.5: y0 = -(q-keep) at lvl 1, 1 at lvl 0.5,
    linear in the index from y0 at q-1 to 1 at keep-1."""
    t0, t1 = math.exp(1.0), 1.0
    y0 = (math.exp((lvl - 0.5) * 2) - t0) / (t1 - t0) * (1 + (q - keep)) - (q - keep)
    x0, x1 = q - 1, keep - 1
    return np.array([max(0.0, (xi - x0) / (x1 - x0) * (1 - y0) + y0) for xi in range(keep, q)])


def adjust_rank(c_loc, level: float, max_drop_rank: Sequence[int] = (1, 5), q: int = 20):
    """The v1.0 demo's disentanglement on patch tokens c_loc (B, N, D), level in [0, 1].

    level < 0.5 shrinks the top singular values (semantic focus: at 0 the first two are
    removed); level > 0.5 shrinks components 5..19 and drops everything beyond rank 20
    (style focus: at 1 only the top 5 remain); 0.5 returns c_loc unchanged. Each token is
    de-meaned over channels first and the result is rescaled to the input's std (unbiased,
    over tokens and channels), as the original.
    """
    level = float(level)
    if not 0.0 <= level <= 1.0:
        raise ValueError(f'disentanglement level must be in [0, 1] (0.5 = unchanged), got {level}')
    if level == 0.5:
        return c_loc
    x = jnp.asarray(c_loc, jnp.float32)
    std_save = jnp.std(x, axis=(-2, -1), ddof=1, keepdims=True)
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    u, s, v = _top_svd(xc, q)
    remain = xc - _compose(u, s, v)
    scale = np.ones(q, np.float32)
    if level < 0.5:
        m = max_drop_rank[0]
        scale[:m + 1] = _semantic_scales(level, m)
    else:
        keep = max_drop_rank[1]
        scale[keep:] = _style_scales(level, keep, q)
        remain = jnp.zeros_like(remain)
    x_new = _compose(u, s * jnp.asarray(scale), v) + mean + remain
    std_new = jnp.std(x_new, axis=(-2, -1), ddof=1, keepdims=True)
    return x_new / std_new * std_save


def find_low_rank(x, q: int, demean: bool = True):
    """Keep the top-q components of each (N, D) matrix (+ the per-token mean back)."""
    x = jnp.asarray(x, jnp.float32)
    mean = x.mean(-1, keepdims=True) if demean else 0.0
    u, s, v = _top_svd(x - mean, q)
    return _compose(u, s, v) + mean


def remove_low_rank(x, q: int, q_remove: int, demean: bool = True):
    """Rank-q reconstruction with the first `q_remove` components zeroed; like the original,
    everything beyond rank q is discarded."""
    x = jnp.asarray(x, jnp.float32)
    mean = x.mean(-1, keepdims=True) if demean else 0.0
    u, s, v = _top_svd(x - mean, q)
    s = s.at[..., :q_remove].set(0.0)
    return _compose(u, s, v) + mean


def legacy_disentangle(c, level: int):
    """The CLI's `--dislevel` on a full image context c (B, 1+N, D): the global token is kept;
    -1/-2: semantic focus (drop the first 1/2 of 50 components), +1/+2: style focus (keep
    the top 10/2), 0: unchanged. The CLI applies it to the conditional *and* the (gray image)
    unconditional context."""
    if level not in (-2, -1, 0, 1, 2):
        raise ValueError(f'legacy disentanglement level must be one of -2..2, got {level!r}')
    if level == 0:
        return c
    glb, loc = c[:, :1], c[:, 1:]
    if level < 0:
        loc = remove_low_rank(loc, q=50, q_remove=-level)
    else:
        loc = find_low_rank(loc, q=10 if level == 1 else 2)
    return jnp.concatenate([glb.astype(loc.dtype), loc], axis=1)


def edit_text_latent(z, z_negative, z_positive):
    """I2T2I: z (B, L) minus its projection on the negative prompt's latent direction, plus
    the positive prompt's latent. z_negative / z_positive: (L,) or (1, L)."""
    zn = jnp.reshape(z_negative, (-1,))
    zn = zn / jnp.linalg.norm(zn)
    return z - (z @ zn)[:, None] * zn[None] + jnp.reshape(z_positive, (1, -1))


def color_adjust(images, reference):
    """The demo's 'Simple' colour adjustment: match each output's per-channel mean and std
    (unbiased) to the reference image's, then clip to [0, 1]. images (B, H, W, 3), reference
    (H, W, 3), both in [0, 1] at the same size."""
    images = np.asarray(images, np.float32)
    ref = np.asarray(reference, np.float32).reshape(-1, 3)
    r_mean, r_std = ref.mean(0), ref.std(0, ddof=1)
    flat = images.reshape(images.shape[0], -1, 3)
    mean, std = flat.mean(1, keepdims=True), flat.std(1, ddof=1, keepdims=True)
    out = (flat - mean) / std * r_std + r_mean
    return np.clip(out, 0, 1).reshape(images.shape)
