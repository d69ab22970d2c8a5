"""The DDPM noise schedule of VD and the epsilon-prediction loss
(SHI-Labs `lib/model_zoo/vd.py:127-185, 241-280`, `diffusion_utils.make_beta_schedule`).

Derived arrays are computed in float64 with numpy and stored as float32, exactly as the
original registers its buffers; samplers read them from here so they see the same values.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Schedule:
    """All per-timestep arrays, shape (T,), float32. Paper notation: alpha_bar = alphas_cumprod."""
    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def schedule_arrays(beta_linear_start: float = 0.00085, beta_linear_end: float = 0.012,
                    timesteps: int = 1000) -> dict:
    """The 12 schedule buffers of the original as float64 numpy arrays (before the cast).

    betas = linspace(sqrt(start), sqrt(end), T)^2 ("linear" in LDM = "scaled_linear" in
    diffusers); v_posterior = 0.
    """
    betas = np.linspace(beta_linear_start ** 0.5, beta_linear_end ** 0.5, timesteps,
                        dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return dict(
        betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        log_one_minus_alphas_cumprod=np.log(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        posterior_variance=post_var,
        # clipped because the posterior variance is 0 at the start of the chain
        posterior_log_variance_clipped=np.log(np.maximum(post_var, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))


def make_schedule(config: Optional[Mapping] = None, **kwargs) -> Schedule:
    """Build the schedule from a config section `{beta_linear_start, beta_linear_end,
    timesteps}` (or keyword arguments); float64 -> float32 as the original buffers."""
    args = dict(config or {})
    args.update(kwargs)
    arrays = schedule_arrays(**args)
    return Schedule(**{k: jnp.asarray(v.astype(np.float32)) for k, v in arrays.items()})


def _expand(a, t, x):
    """a[t] shaped (B, 1, ..., 1) to broadcast against x."""
    return a[t].reshape((-1,) + (1,) * (x.ndim - 1))


def q_sample(schedule: Schedule, x0, t, noise):
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t (B,) integer."""
    return (_expand(schedule.sqrt_alphas_cumprod, t, x0) * x0 +
            _expand(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def eps_loss(denoise_fn: Callable, schedule: Schedule, x0, rng, t=None, noise=None):
    """The epsilon-prediction L2 loss of one flow (`VD_v2_0.p_losses`, loss_simple).

    Args:
      denoise_fn: (x_t, t) -> eps prediction, same shape as x_t.
      x0: clean latents (B, ...), already scaled by the latent scale factor.
      rng: key for t ~ U{0..T-1} and eps ~ N(0, I) (ignored for those given explicitly).
    Returns:
      (mean loss, per-sample loss (B,)). The model sees t itself here (training), not
      the t+1 the original DDIM sampler feeds.
    """
    k_t, k_n = jax.random.split(rng)
    b = x0.shape[0]
    if t is None:
        t = jax.random.randint(k_t, (b,), 0, schedule.num_timesteps)
    if noise is None:
        noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    x_t = q_sample(schedule, x0.astype(jnp.float32), t, noise)
    eps = denoise_fn(x_t, t)
    per_sample = jnp.square(eps.astype(jnp.float32) - noise).reshape(b, -1).mean(-1)
    return per_sample.mean(), per_sample
