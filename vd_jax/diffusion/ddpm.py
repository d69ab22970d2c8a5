"""DDPM ancestral sampling (Ho et al. 2020, arXiv 2006.11239; LDM `p_sample`, diffusers
`DDPMScheduler` with `variance_type='fixed_small'`, `clip_sample=False`).

Each step samples the Gaussian posterior q(x_s | x_t, x0_pred) between alpha_bar_t and the
target alpha_bar_s:
    mean = sqrt(a_s) beta' / (1 - a_t) x0 + sqrt(a_t / a_s) (1 - a_s) / (1 - a_t) x_t,
    var  = (1 - a_s) / (1 - a_t) beta',        beta' = 1 - a_t / a_s.
With s = t - 1 these are the schedule's `posterior_mean_coef1/2` and `posterior_variance`
(used directly on the full 1000-step grid); on a strided grid (e.g. the DDIM grid) they are
the same formulas with the strided alphas. When the target is clean data (a_s = 1) the
variance is 0, so the last step adds no noise without a special case. On a strided grid this
is DDIM with eta = 1 (identical variance and mean).
"""
from __future__ import annotations

from typing import Tuple

import jax.numpy as jnp
import numpy as np

from vd_jax.diffusion.schedule import Schedule


def full_timesteps(num_timesteps: int = 1000) -> np.ndarray:
    """Every training timestep, ascending: 0..T-1 (fed to the model as is, like LDM p_sample)."""
    return np.arange(num_timesteps, dtype=np.int64)


def posterior_coefficients(alpha_t, alpha_prev) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(coef_x0, coef_xt, std) of q(x_prev | x_t, x0) for alpha_bar_t -> alpha_bar_prev."""
    beta = 1. - alpha_t / alpha_prev
    coef_x0 = jnp.sqrt(alpha_prev) * beta / (1. - alpha_t)
    coef_xt = jnp.sqrt(alpha_t / alpha_prev) * (1. - alpha_prev) / (1. - alpha_t)
    var = (1. - alpha_prev) / (1. - alpha_t) * beta
    return coef_x0, coef_xt, jnp.sqrt(jnp.maximum(var, 0.))


def schedule_posterior(schedule: Schedule, t) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(coef_x0, coef_xt, std) for the unstrided step t -> t-1 read from the schedule buffers.

    std = exp(0.5 log_var_clipped), zeroed at t = 0 (LDM's `nonzero_mask`; diffusers adds no
    noise at t = 0 either).
    """
    std = jnp.exp(0.5 * schedule.posterior_log_variance_clipped[t])
    return (schedule.posterior_mean_coef1[t], schedule.posterior_mean_coef2[t],
            jnp.where(t > 0, std, 0.))


def posterior_sample(x_t, pred_x0, coef_x0, coef_xt, std, noise=None):
    """x_prev = coef_x0 x0_pred + coef_xt x_t (+ std * noise)."""
    x_prev = coef_x0 * pred_x0 + coef_xt * x_t
    if noise is not None:
        x_prev = x_prev + std * noise
    return x_prev


def ddpm_step(x_t, eps, alpha_t, coef_x0, coef_xt, std, noise=None):
    """One ancestral step of an eps prediction: x_prev = coef_x0 x0_pred + coef_xt x_t + std * noise.

    Args:
      x_t, eps: (B, ...) float32 latents and (guided) noise prediction.
      alpha_t: alpha_bar at the current timestep (for x0_pred).
      coef_x0, coef_xt, std: from `posterior_coefficients` or `schedule_posterior`.
      noise: N(0, I) like x_t (None: posterior mean only).
    Returns:
      (x_prev, pred_x0).
    """
    pred_x0 = (x_t - jnp.sqrt(1. - alpha_t) * eps) / jnp.sqrt(alpha_t)
    return posterior_sample(x_t, pred_x0, coef_x0, coef_xt, std, noise), pred_x0
