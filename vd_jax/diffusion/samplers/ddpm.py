"""DDPM ancestral sampling (Ho et al. 2020): the math is `vd_jax.diffusion.ddpm`."""
from __future__ import annotations

import dataclasses

import numpy as np

from vd_jax.diffusion import ddpm, prediction
from vd_jax.diffusion.samplers import Solver


@dataclasses.dataclass(frozen=True)
class DDPM(Solver):
    name: str = 'ddpm'
    order: int = 1
    default_spacing: str = 'uniform'

    def draws_noise(self, eta) -> bool:
        return True   # always; eta is not used

    def tables(self, tab, plan, schedule, eta):
        if np.array_equal(np.asarray(plan.prev), np.asarray(plan.timesteps) - 1):
            # the unstrided chain: LDM's own posterior buffers
            coefs = ddpm.schedule_posterior(schedule, tab['t'])
        else:
            coefs = ddpm.posterior_coefficients(tab['a_t'], tab['a_prev'])
        return dict(tab, coef_x0=coefs[0], coef_xt=coefs[1], std=coefs[2])

    def step(self, x, model_out, history, tp, noise, prediction_type):
        x0, _ = prediction.split(model_out, x, tp['a_t'], prediction_type)
        return ddpm.posterior_sample(x, x0, tp['coef_x0'], tp['coef_xt'], tp['std'], noise), x0


SOLVER = DDPM()
