"""DDIM exactly as Versatile Diffusion samples it (SHI-Labs `lib/model_zoo/ddim.py`,
`lib/model_zoo/diffusion_utils.py:32-59`; Song et al. 2020, arXiv 2010.02502).

The original's quirks, all reproduced (`diffusion_utils.py:32-59`, `ddim.py:97-103`,
`app.py:350-360`):
  * `make_ddim_timesteps('uniform')` = `arange(0, T, T // steps) + 1`, and the **model is fed
    these +1 values** (1, 21, ..., 981 for 50 steps); alpha_bar is indexed with them too.
    This is diffusers' `DDIMScheduler(steps_offset=1, timestep_spacing='leading')`.
  * The last step targets alpha_bar[0] = 0.99915, not 1 (`alphas_prev = [alpha_bar[0]] +
    alpha_bar[ts[:-1]]`; diffusers' `set_alpha_to_one=False`).
  * No clipping or thresholding of the predicted x0.
  * The image-variation "fidelity" start noises x0 to `ts[k]` but starts denoising at
    `ts[k-1]` (one DDIM step late); see `fidelity_start`.

Everything here is a pure function of arrays; the loop lives in `sampling.py`.
"""
from __future__ import annotations

from typing import Tuple

import jax.numpy as jnp
import numpy as np


def make_ddim_timesteps(steps: int, num_timesteps: int = 1000,
                        method: str = 'uniform') -> np.ndarray:
    """DDIM timesteps in ascending order, as fed to the model (`make_ddim_timesteps`).

    'uniform': `arange(0, T, T // steps) + 1`. When `steps` does not divide T this has more
    than `steps` entries (e.g. 30 steps -> 31 timesteps), as in the original, whose length
    assertion is commented out. 'quad': `(linspace(0, sqrt(0.8 T), steps)^2).astype(int) + 1`.

    Returns:
      int64 array (S,), ascending.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f'DDIM steps={steps} must be in [1, {num_timesteps}]')
    if method == 'uniform':
        ts = np.arange(0, num_timesteps, num_timesteps // steps)
    elif method == 'quad':
        ts = (np.linspace(0, np.sqrt(num_timesteps * .8), steps) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM discretization method {method!r}; use 'uniform' or 'quad'")
    # +1 "to get the final alpha values right" (the original's comment): the model and the
    # alpha lookup both use t+1.
    ts = ts + 1
    if ts[-1] >= num_timesteps:
        raise ValueError(
            f'DDIM {method!r} with steps={steps} feeds t={ts[-1]}, outside the {num_timesteps}-step '
            "schedule (the original fails the same way); use spacing='full' for every step")
    return ts.astype(np.int64)


def original_grid_last(steps: int, num_timesteps: int = 1000) -> int:
    """The largest timestep of the original 'uniform' grid, `max(arange(0, T, T // steps)) + 1`.

    The original grid is defined (every t inside the schedule) iff this is < T, i.e. iff the
    stride `T // steps` does not divide T - 1. For T = 1000 it is undefined for 599 of the step
    counts 1..1000: 3, 9, 27, 36-37, 101-111, 251-333 and 501-1000.
    """
    stride = num_timesteps // steps
    return (num_timesteps - 1) // stride * stride + 1


def leading_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """The 'leading' grid `arange(steps) * (T // steps) + 1`, ascending, exactly `steps` entries.

    The first `steps` entries of the original grid (equal to it whenever that one has exactly
    `steps` entries and is defined); diffusers' `timestep_spacing='leading'` with
    `steps_offset=1`. Its largest entry (steps - 1)(T // steps) + 1 <= T - (T // steps) + 1 is
    inside the schedule for every steps < T (at steps = T it would be T: use every timestep).
    """
    if not 1 <= steps < num_timesteps:
        raise ValueError(f'the leading grid needs 1 <= steps < {num_timesteps}, got {steps}')
    return (np.arange(steps, dtype=np.int64) * (num_timesteps // steps) + 1)


def ddim_sigma(alpha_t, alpha_prev, eta):
    """sigma_t = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)) (DDIM eq. 16)."""
    return eta * jnp.sqrt((1. - alpha_prev) / (1. - alpha_t) * (1. - alpha_t / alpha_prev))


def ddim_update(pred_x0, eps, alpha_prev, sigma, noise=None) -> jnp.ndarray:
    """The DDIM move to alpha_bar_prev from a (pred_x0, eps) pair (DDIM eq. 12):
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise."""
    # 1 - a_prev - sigma^2 >= 0 in exact arithmetic for eta <= 1; the clamp only replaces the NaN
    # the original would produce from a rounding-negative value.
    dir_xt = jnp.sqrt(jnp.maximum(1. - alpha_prev - sigma ** 2, 0.)) * eps
    x_prev = jnp.sqrt(alpha_prev) * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_step(x_t, eps, alpha_t, alpha_prev, sigma, noise=None) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """One DDIM update of an eps prediction (`DDIMSampler.p_sample_ddim`, after guidance).

    Args:
      x_t: (B, ...) float32 current latents.
      eps: (B, ...) noise prediction (already guided).
      alpha_t, alpha_prev, sigma: scalars (or broadcastable arrays): alpha_bar at the current and
        the target timestep, and the DDIM noise scale.
      noise: N(0, I) of x_t's shape, or None for a deterministic (eta = 0) step.
    Returns:
      (x_prev, pred_x0), both like x_t.
    """
    pred_x0 = (x_t - jnp.sqrt(1. - alpha_t) * eps) / jnp.sqrt(alpha_t)
    return ddim_update(pred_x0, eps, alpha_prev, sigma, noise), pred_x0


def fidelity_start(num_steps: int, k: int, off_by_one: bool = True) -> Tuple[int, int]:
    """Where an image-variation run that starts from a clean x0 enters the DDIM grid.

    The v1.0 demo (`app.py:350-360`, `ddim.py:97-103`) takes `k = int(steps * (1 - fidelity))`,
    noises x0 with `q_sample` to `ts[k]` (ascending grid) and then denoises over `ts[:k]`, i.e.
    the first model call is at `ts[k-1]`, one step *below* the noise level of its input, and only
    k steps run (k = 0 returns the noised x0 unchanged). `off_by_one=False` starts at `ts[k]`
    itself and runs k + 1 steps, the consistent img2img start.

    Args:
      num_steps: S, the length of the grid.
      k: the original's `x0_forward_timesteps`, 0 <= k < S.
    Returns:
      (k_noise, first_position): the ascending grid index whose timestep x0 is noised to, and
      the first executed position in execution order (position p runs ts[S - 1 - p]).
    """
    if not 0 <= k < num_steps:
        raise ValueError(f'fidelity start step k={k} must be in [0, {num_steps}) for {num_steps} steps')
    first = num_steps - k if off_by_one else num_steps - 1 - k
    return k, first
