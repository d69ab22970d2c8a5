"""The diffusion training loss for every prediction type, with min-SNR-gamma weighting and
offset noise: pure functions over a `model_fn(x_t, t) -> prediction`.

With VD's defaults (epsilon, no weighting, no offset) this is exactly `eps_loss`
(`VD_v2_0.p_losses`, loss_simple): the mean squared error of the predicted noise.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from vd_jax.diffusion import prediction
from vd_jax.diffusion.schedule import Schedule, q_sample


def offset_noise(key, shape, strength: float, channel_axis: int = -1):
    """s * N(0, 1) drawn once per (sample, channel) and broadcast over the other axes
    (Guttenberg 2023, diffusers' `noise_offset`): shape (B, 1, ..., 1, C) for channels-last
    latents. Adding it to eps lets an epsilon model change an image's mean brightness."""
    b, c = shape[0], shape[channel_axis]
    per = jax.random.normal(key, (b, c), jnp.float32) * strength
    out = [1] * len(shape)
    out[0], out[channel_axis] = b, c
    return per.reshape(out)


def diffusion_loss(model_fn: Callable, schedule: Schedule, x0, t, noise, *,
                   snr_gamma: Optional[float] = None):
    """Per-example and mean squared error of the schedule's prediction type.

    Args:
      model_fn: (x_t (B, ...), t (B,)) -> prediction like x_t.
      x0: clean latents (B, ...); t: (B,) int timesteps; noise: eps like x0 (offset included).
      snr_gamma: > 0 weights each example by `prediction.min_snr_weight` (Hang et al. 2023);
        None / 0 = unweighted (VD).
    Returns:
      (mean loss, per-example loss (B,)).
    """
    b = x0.shape[0]
    x0 = x0.astype(jnp.float32)
    x_t = q_sample(schedule, x0, t, noise)
    out = model_fn(x_t, t).astype(jnp.float32)
    ptype = schedule.prediction_type
    if ptype == 'epsilon':
        tgt = noise
    else:
        a = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x0.ndim - 1))
        tgt = prediction.target(x0, noise, a, ptype)
    per_example = jnp.square(out - tgt).reshape(b, -1).mean(-1)
    if snr_gamma:
        per_example = per_example * prediction.min_snr_weight(schedule.alphas_cumprod[t],
                                                              float(snr_gamma), ptype)
    return per_example.mean(), per_example
