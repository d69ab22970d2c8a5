"""DDIM (Song et al. 2020), exactly as VD samples it: the math is `vd_jax.diffusion.ddim`."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vd_jax.diffusion import ddim, prediction
from vd_jax.diffusion.samplers import Solver


@dataclasses.dataclass(frozen=True)
class DDIM(Solver):
    name: str = 'ddim'
    order: int = 0
    default_spacing: str = 'uniform'
    ends_at_clean_data: bool = False   # the original's last step targets alpha_bar[0]

    def draws_noise(self, eta) -> bool:
        return not (isinstance(eta, (int, float)) and float(eta) == 0.0)

    def tables(self, tab, plan, schedule, eta):
        return dict(tab, sigma=ddim.ddim_sigma(tab['a_t'], tab['a_prev'], jnp.asarray(eta, jnp.float32)))

    def step(self, x, model_out, history, tp, noise, prediction_type):
        x0, eps = prediction.split(model_out, x, tp['a_t'], prediction_type)
        return ddim.ddim_update(x0, eps, tp['a_prev'], tp['sigma'], noise), x0


SOLVER = DDIM()
