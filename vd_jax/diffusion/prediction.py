"""What a denoiser predicts, and the conversions between its output and (x0, eps).

With alpha_bar = a at the step, x_t = sqrt(a) x0 + sqrt(1 - a) eps, and the three targets
  'epsilon'       eps                                  (VD, DDPM)
  'v_prediction'  v = sqrt(a) eps - sqrt(1 - a) x0     (Salimans & Ho 2022)
  'sample'        x0
Only 'v_prediction' and 'sample' are defined at a zero-SNR step (a = 0): an eps model cannot
say anything about x0 there, which is why Lin et al. 2023 pair zero terminal SNR with v.
"""
from __future__ import annotations

from typing import Tuple

import jax.numpy as jnp

from vd_jax.diffusion.schedule import PREDICTION_TYPES


def _check(prediction_type: str):
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f'prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}')


def split(model_out, x_t, alpha_t, prediction_type: str = 'epsilon') -> Tuple[jnp.ndarray, jnp.ndarray]:
    """(pred_x0, pred_eps) from a model output at alpha_bar = alpha_t (scalar or broadcastable).

    The epsilon branch computes x0 exactly as VD's DDIM does, so the default is bit-for-bit
    the original's arithmetic."""
    _check(prediction_type)
    sa, s1a = jnp.sqrt(alpha_t), jnp.sqrt(1. - alpha_t)
    if prediction_type == 'epsilon':
        return (x_t - jnp.sqrt(1. - alpha_t) * model_out) / jnp.sqrt(alpha_t), model_out
    if prediction_type == 'v_prediction':
        return sa * x_t - s1a * model_out, sa * model_out + s1a * x_t
    return model_out, (x_t - sa * model_out) / s1a


def target(x0, noise, alpha_t, prediction_type: str = 'epsilon'):
    """The regression target of a training example (alpha_t broadcastable to x0)."""
    _check(prediction_type)
    if prediction_type == 'epsilon':
        return noise
    if prediction_type == 'v_prediction':
        return jnp.sqrt(alpha_t) * noise - jnp.sqrt(1. - alpha_t) * x0
    return x0


def snr(alpha_t):
    """Signal-to-noise ratio a / (1 - a); 0 at a zero-terminal step, inf at a = 1."""
    return alpha_t / (1. - alpha_t)


def min_snr_weight(alpha_t, gamma: float, prediction_type: str = 'epsilon'):
    """Min-SNR-gamma loss weight (Hang et al. 2023, arXiv 2303.09556) of each example.

    The weight makes every prediction type's loss the x0-loss clipped at SNR gamma:
    min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) for
    x0. At SNR = 0 (a zero-terminal step) the eps formula is 0 / 0: as diffusers' training
    scripts do, the weight there is 1 (for every type), never NaN.
    """
    _check(prediction_type)
    s = snr(alpha_t)
    clipped = jnp.minimum(s, gamma)
    safe = jnp.where(s > 0, s, 1.)
    if prediction_type == 'epsilon':
        w = clipped / safe
    elif prediction_type == 'v_prediction':
        w = clipped / (s + 1.)
    else:
        w = clipped
    return jnp.where(s > 0, w, 1.)
