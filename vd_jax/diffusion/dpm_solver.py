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


def dpmpp_2m_update(x_t, pred_x0, x0_prev, alpha_t, alpha_prev, lambda_s1, second_order):
    """One DPM-Solver++(2M) update from alpha_bar_t (current) to alpha_bar_prev (target),
    given the data prediction `pred_x0` at the current step.

    Args:
      x_t, pred_x0: (B, ...) float32 latents and data prediction at the current step.
      x0_prev: (B, ...) the data prediction of the previous step (ignored at first order).
      alpha_t, alpha_prev: alpha_bar now and at the target; alpha_prev = 1 lands on clean data.
      lambda_s1: lambda at the previous step's timestep (for h_0; ignored at first order).
      second_order: bool scalar (may be traced).
    Returns:
      x_prev like x_t.
    """
    sigma_s0, sigma_t = jnp.sqrt(1. - alpha_t), jnp.sqrt(1. - alpha_prev)
    lambda_s0, lambda_t = log_snr(alpha_t), log_snr(alpha_prev)
    h = lambda_t - lambda_s0          # +inf on the step to clean data (always first order)
    h_0 = lambda_s0 - lambda_s1
    # r = h / h_0 = 1 / r0 of diffusers. Guarded so the unselected branch never makes inf/NaN.
    r = jnp.where(second_order, h / jnp.where(second_order, h_0, 1.), 0.)
    d = pred_x0 + jnp.where(second_order, 0.5 * r, 0.) * (pred_x0 - x0_prev)
    return (sigma_t / sigma_s0) * x_t - (jnp.sqrt(alpha_prev) * (jnp.exp(-h) - 1.)) * d


def dpmpp_2m_step(x_t, eps, x0_prev, alpha_t, alpha_prev, lambda_s1, second_order):
    """`dpmpp_2m_update` of an eps prediction -> (x_prev, pred_x0); pred_x0 is the history
    for the next step."""
    pred_x0 = (x_t - jnp.sqrt(1. - alpha_t) * eps) / jnp.sqrt(alpha_t)
    return dpmpp_2m_update(x_t, pred_x0, x0_prev, alpha_t, alpha_prev, lambda_s1,
                           second_order), pred_x0


def karras_alpha_bars(alphas_cumprod, steps: int, rho: float = 7.0):
    """The Karras et al. (2022) sigma grid between the schedule's sigma_max and sigma_min,
    as diffusers builds it (`use_karras_sigmas=True`): sigma_i = (s_max^(1/r) + i/(S-1)
    (s_min^(1/r) - s_max^(1/r)))^r, fed to the model at t = round(interp of log sigma).

    Args:
      alphas_cumprod: (T,) numpy, the (zero-SNR clamped) schedule.
    Returns:
      (timesteps (S,) int64 descending, alpha_bars (S + 1,) float32 = 1 / (sigma^2 + 1) with the
      final sigma 0, i.e. alpha_bar 1).
    """
    ac = np.asarray(alphas_cumprod, np.float64)
    sigmas = np.sqrt((1 - ac) / ac)
    log_sigmas = np.log(sigmas)
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigmas[0] ** (1 / rho), sigmas[-1] ** (1 / rho)
    grid = (hi + ramp * (lo - hi)) ** rho
    log_grid = np.log(np.maximum(grid, 1e-10))
    # piecewise-linear inverse of log sigma(t) (log sigma increases with t)
    t = np.interp(log_grid, log_sigmas, np.arange(len(ac), dtype=np.float64))
    timesteps = np.round(t).astype(np.int64)
    sig32 = np.concatenate([grid, [0.0]]).astype(np.float32).astype(np.float64)
    return timesteps, (1.0 / (sig32 ** 2 + 1.0)).astype(np.float32)
