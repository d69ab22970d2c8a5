"""DPM-Solver++(2M): the multistep second-order data-prediction ODE solver (Lu et al. 2022,
arXiv 2211.01095, Alg. 2), as diffusers' `DPMSolverMultistepScheduler(algorithm_type=
'dpmsolver++', solver_order=2, solver_type='midpoint')` computes it.

In VP terms alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma).
With h = lambda_t - lambda_s0 and the data predictions m0 (now) and m1 (previous step):
    first order (= DDIM, eta 0): x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) m0
    second order:                x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) (m0 + D1 / 2),
                                 D1 = (h / h_0) (m0 - m1),  h_0 = lambda_s0 - lambda_s1.
The first step is first order (no history); the last step is first order when it lands on
clean data (diffusers' `final_sigmas_type='zero'`) or, with `lower_order_final`, when the
grid has fewer than 15 steps.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def linspace_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """diffusers' default `timestep_spacing='linspace'`, ascending (999, 979, ..., 20 for 50
    steps when reversed): `linspace(0, T - 1, steps + 1).round()` without its first entry 0.
    These are fed to the model as is (no +1)."""
    if not 1 <= steps < num_timesteps:
        raise ValueError(f'linspace spacing needs 1 <= steps < {num_timesteps}, got {steps}')
    ts = np.linspace(0, num_timesteps - 1, steps + 1).round()[1:].astype(np.int64)
    if np.any(np.diff(ts) <= 0):
        raise ValueError(f'linspace spacing with steps={steps} repeats timesteps')
    return ts


def log_snr(alpha_bar):
    """lambda = log(alpha) - log(sigma) = log sqrt(a) - log sqrt(1 - a); +inf at a = 1."""
    return jnp.log(jnp.sqrt(alpha_bar)) - jnp.log(jnp.sqrt(1. - alpha_bar))


def dpmpp_2m_step(x_t, eps, x0_prev, alpha_t, alpha_prev, lambda_s1, second_order):
    """One DPM-Solver++(2M) update from alpha_bar_t (current) to alpha_bar_prev (target).

    Args:
      x_t, eps: (B, ...) float32 latents and (guided) noise prediction at the current step.
      x0_prev: (B, ...) the data prediction of the previous step (ignored at first order).
      alpha_t, alpha_prev: alpha_bar now and at the target; alpha_prev = 1 lands on clean data.
      lambda_s1: lambda at the previous step's timestep (for h_0; ignored at first order).
      second_order: bool scalar (may be traced).
    Returns:
      (x_prev, pred_x0); pred_x0 is the history for the next step.
    """
    sigma_s0, sigma_t = jnp.sqrt(1. - alpha_t), jnp.sqrt(1. - alpha_prev)
    alpha_s = jnp.sqrt(alpha_t)
    pred_x0 = (x_t - sigma_s0 * eps) / alpha_s
    lambda_s0, lambda_t = log_snr(alpha_t), log_snr(alpha_prev)
    h = lambda_t - lambda_s0          # +inf on the step to clean data (always first order)
    h_0 = lambda_s0 - lambda_s1
    # r = h / h_0 = 1 / r0 of diffusers. Guarded so the unselected branch never makes inf/NaN.
    r = jnp.where(second_order, h / jnp.where(second_order, h_0, 1.), 0.)
    d = pred_x0 + jnp.where(second_order, 0.5 * r, 0.) * (pred_x0 - x0_prev)
    x_prev = (sigma_t / sigma_s0) * x_t - (jnp.sqrt(alpha_prev) * (jnp.exp(-h) - 1.)) * d
    return x_prev, pred_x0
