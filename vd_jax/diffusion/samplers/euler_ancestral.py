"""Euler ancestral, as diffusers' `EulerAncestralDiscreteScheduler`: an Euler step down to
sigma_down, then fresh noise of scale sigma_up, where sigma_up^2 + sigma_down^2 = sigma'^2 and
sigma_up = sigma' sqrt(1 - sigma'^2 / sigma^2). The state and the input scaling are Euler's."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vd_jax.diffusion.samplers.euler import Euler, ve_pred_x0


@dataclasses.dataclass(frozen=True)
class EulerAncestral(Euler):
    name: str = 'euler_a'
    order: int = 4

    def draws_noise(self, eta) -> bool:
        # the noise scale is the sampler's own: a Python eta must be 0 (a traced one comes from
        # the jitted Sampler, which checked the Python value already)
        if isinstance(eta, (int, float)):
            super().draws_noise(eta)
        return True

    def tables(self, tab, plan, schedule, eta):
        tab = super().tables(tab, plan, schedule, eta)
        s, s_next = tab['sigma'], tab['sigma_next']
        up = jnp.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
        return dict(tab, sigma_up=up, sigma_down=jnp.sqrt(s_next ** 2 - up ** 2))

    def step(self, x, model_out, history, tp, noise, prediction_type):
        x0 = ve_pred_x0(x, model_out, tp['sigma'], prediction_type)
        d = (x - x0) / tp['sigma']
        return x + d * (tp['sigma_down'] - tp['sigma']) + noise * tp['sigma_up'], x0


SOLVER = EulerAncestral()
