"""The samplers, one module each behind one small protocol (`Solver`).

A sampler says what its step grid defaults to, which per-position coefficient tables it needs,
how one step moves the state, and whether it draws noise; `vd_jax.diffusion.sampling` runs any
of them in the same `lax.scan` loop. A new sampler is one new module in this package that
defines `SOLVER = YourSolver()`; it is found by name (`get`) without editing anything else.

The loop's state `x` is the sampler's own: the VP latent x_t = sqrt(a) x0 + sqrt(1 - a) eps for
DDIM / DDPM / DPM-Solver++, the VE latent x_t / sqrt(a) for the Euler samplers (k-diffusion's
sigma space). `model_input` maps it to what the denoiser is fed; after the last step (to clean
data) both are x0.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Dict, Optional, Tuple

import jax.numpy as jnp

# diffusers' stand-in for alpha_bar_T = 0 in the samplers that divide by sqrt(alpha_bar)
# (DPM-Solver, Euler): "close to 0 without being 0 so the first sigma is not inf".
ZERO_SNR_ALPHA_BAR = 2.0 ** -24


@dataclasses.dataclass(frozen=True)
class Solver:
    """One sampler. Subclasses override the pieces that differ (all pure functions).

    Attributes:
      name: the user-facing name (`--sampler`).
      order: position in listings.
      default_spacing: the grid 'auto' prefers ('uniform' = VD's original grid).
      ends_at_clean_data: default of `set_alpha_to_one` (the last step lands on alpha_bar 1).
      clamps_zero_snr: replace alpha_bar = 0 by `ZERO_SNR_ALPHA_BAR` (diffusers' DPM / Euler).
      supports_karras: accepts the Karras sigma grid.
    """
    name: str = ''
    order: int = 100
    default_spacing: str = 'uniform'
    ends_at_clean_data: bool = True
    clamps_zero_snr: bool = False
    supports_karras: bool = False

    # --- the plan ------------------------------------------------------------------------
    def plan_fields(self, num_steps: int, start: int, set_alpha_to_one: bool,
                    lower_order_final: bool) -> dict:
        """Extra static `Plan` fields (e.g. DPM++'s second-order positions)."""
        del num_steps, start, set_alpha_to_one, lower_order_final
        return {}

    def draws_noise(self, eta) -> bool:
        """Whether the steps draw noise for this eta (Python or traced); errors name the sampler."""
        if not (isinstance(eta, (int, float)) and float(eta) == 0.0):
            raise ValueError(f'eta={eta} is not used by the deterministic {self.name} solver; leave it 0')
        return False

    # --- the tables ------------------------------------------------------------------------
    def tables(self, tab: Dict[str, jnp.ndarray], plan, schedule, eta) -> Dict[str, jnp.ndarray]:
        """Per-position arrays (S,) added to `tab` = {t, a_t, a_prev} (float32, traced)."""
        del plan, schedule, eta
        return tab

    # --- the state -------------------------------------------------------------------------
    def init_noise(self, noise, tab: Dict[str, jnp.ndarray], plan):
        """The state at the first position from unit Gaussian noise."""
        del tab, plan
        return noise

    def from_vp(self, x_vp, a_t):
        """The state from a VP latent at alpha_bar a_t (a start from a noised x0)."""
        del a_t
        return x_vp

    def model_input(self, x, tp: Dict[str, jnp.ndarray]):
        """What the denoiser is fed at a position (tp: that position's table entries)."""
        del tp
        return x

    def step(self, x, model_out, history, tp: Dict[str, jnp.ndarray], noise,
             prediction_type: str) -> Tuple[jnp.ndarray, jnp.ndarray]:
        """One update: -> (next state, pred_x0 (the history of the next step))."""
        raise NotImplementedError


_REGISTRY: Optional[Dict[str, Solver]] = None


def registry() -> Dict[str, Solver]:
    """{name: Solver} of every module of this package that defines `SOLVER`, in `order`."""
    global _REGISTRY
    if _REGISTRY is None:
        found = []
        for info in pkgutil.iter_modules(__path__):
            module = importlib.import_module(f'{__name__}.{info.name}')
            solver = getattr(module, 'SOLVER', None)
            if isinstance(solver, Solver):
                found.append(solver)
        _REGISTRY = {s.name: s for s in sorted(found, key=lambda s: (s.order, s.name))}
    return _REGISTRY


def names() -> Tuple[str, ...]:
    return tuple(registry())


def get(name: str) -> Solver:
    """The solver called `name`; ValueError listing the choices otherwise."""
    solvers = registry()
    if name not in solvers:
        raise ValueError(f'unknown sampler {name!r}; choose one of {tuple(solvers)}')
    return solvers[name]
