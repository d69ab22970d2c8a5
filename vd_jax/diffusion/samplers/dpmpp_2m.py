"""DPM-Solver++(2M) (Lu et al. 2022): the math is `vd_jax.diffusion.dpm_solver`."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vd_jax.diffusion import dpm_solver, prediction
from vd_jax.diffusion.samplers import Solver


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2M(Solver):
    name: str = 'dpm++'
    order: int = 2
    default_spacing: str = 'linspace'   # diffusers' default, so it equals the scheduler as is
    clamps_zero_snr: bool = True
    supports_karras: bool = True

    def plan_fields(self, num_steps, start, set_alpha_to_one, lower_order_final):
        # diffusers: the last step is first order when it lands on clean data or (with
        # lower_order_final) when the grid has fewer than 15 steps; the first executed step has
        # no history.
        final_first = set_alpha_to_one or (lower_order_final and num_steps < 15)
        return dict(second_order=tuple(bool(p > start and not (p == num_steps - 1 and final_first))
                                       for p in range(num_steps)))

    def tables(self, tab, plan, schedule, eta):
        lam = dpm_solver.log_snr(tab['a_t'])
        return dict(tab, lambda_s1=jnp.concatenate([lam[:1], lam[:-1]]),  # lambda at p - 1
                    second_order=jnp.asarray(plan.second_order, bool))

    def step(self, x, model_out, history, tp, noise, prediction_type):
        x0, _ = prediction.split(model_out, x, tp['a_t'], prediction_type)
        return dpm_solver.dpmpp_2m_update(x, x0, history, tp['a_t'], tp['a_prev'],
                                          tp['lambda_s1'], tp['second_order']), x0


SOLVER = DPMSolverPP2M()
