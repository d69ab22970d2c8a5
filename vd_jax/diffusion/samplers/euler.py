"""Euler (Karras et al. 2022, Alg. 1 without churn), as diffusers' `EulerDiscreteScheduler`.

The state is the VE latent x = x_t / sqrt(a) at sigma = sqrt((1 - a) / a); the denoiser is
fed x / sqrt(sigma^2 + 1) (= x_t). One step: d = (x - x0) / sigma, x' = x + d (sigma' - sigma).
The initial noise is scaled by diffusers' `init_noise_sigma`: sigma_max for the 'linspace',
'trailing' and 'full' grids, sqrt(sigma_max^2 + 1) (the VP latent) for 'uniform' / 'leading'.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vd_jax.diffusion import prediction
from vd_jax.diffusion.samplers import Solver


def sigma_of(alpha_bar):
    """sigma = sqrt((1 - a) / a); 0 at a = 1 (clean data)."""
    return jnp.sqrt((1. - alpha_bar) / alpha_bar)


def ve_pred_x0(x, model_out, sigma, prediction_type: str):
    """x0 from a model output at VE state x and noise level sigma (diffusers' Euler formulas)."""
    if prediction_type == 'epsilon':
        return x - sigma * model_out
    if prediction_type == 'v_prediction':
        return model_out * (-sigma / jnp.sqrt(sigma ** 2 + 1.)) + x / (sigma ** 2 + 1.)
    if prediction_type == 'sample':
        return model_out
    prediction.split(model_out, x, 1., prediction_type)   # raises the unknown-type error
    return None


@dataclasses.dataclass(frozen=True)
class Euler(Solver):
    name: str = 'euler'
    order: int = 3
    default_spacing: str = 'uniform'
    clamps_zero_snr: bool = True

    def tables(self, tab, plan, schedule, eta):
        return dict(tab, sigma=sigma_of(tab['a_t']), sigma_next=sigma_of(tab['a_prev']))

    def init_noise(self, noise, tab, plan):
        s_max = jnp.max(tab['sigma'])
        if plan.spacing in ('linspace', 'trailing', 'full'):
            return noise * s_max
        return noise * jnp.sqrt(s_max ** 2 + 1.)

    def from_vp(self, x_vp, a_t):
        return x_vp / jnp.sqrt(a_t)

    def model_input(self, x, tp):
        return x / jnp.sqrt(tp['sigma'] ** 2 + 1.)

    def step(self, x, model_out, history, tp, noise, prediction_type):
        x0 = ve_pred_x0(x, model_out, tp['sigma'], prediction_type)
        d = (x - x0) / tp['sigma']
        return x + d * (tp['sigma_next'] - tp['sigma']), x0


SOLVER = Euler()
