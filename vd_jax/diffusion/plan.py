"""The static step grid of a sampler (`Plan`): which timesteps the model is fed, in order,
and the alpha_bar each step moves to; pure numpy, built before any model exists (a hashable
`jit` static argument). `check_steps` validates a (sampler, steps, spacing) choice up front.

Position p of a plan feeds `timesteps[p]` to the model and moves alpha_bar[timesteps[p]] ->
alpha_bar[prev[p]] (prev = -1 means clean data, alpha_bar = 1).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Tuple

import jax
import numpy as np

from vd_jax.diffusion import ddim, ddpm, dpm_solver, samplers
from vd_jax.diffusion.schedule import Schedule

SAMPLERS = samplers.names()
SPACINGS = ('auto', 'uniform', 'leading', 'linspace', 'trailing', 'full')
# What 'auto' prefers: the original VD grid (arange(0, T, T//S) + 1) for every sampler but
# DPM++, which takes diffusers' default `timestep_spacing='linspace'`, so it equals
# `DPMSolverMultistepScheduler()` as is.
DEFAULT_SPACING = {name: samplers.get(name).default_spacing for name in SAMPLERS}
DEFAULT_STEPS = 50


class StepGridNotice(UserWarning):
    """'auto' spacing fell back from a sampler's usual grid (see `check_steps`)."""


# ----------------------------------------------------------------------------------------
# The static plan
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    """A sampler's static step grid, in execution order (noisy -> clean)."""
    sampler: str                      # a name of `SAMPLERS`
    spacing: str                      # resolved: 'uniform' | 'leading' | 'linspace' | 'trailing' | 'full'
    timesteps: Tuple[int, ...]        # t fed to the model at position p (descending)
    prev: Tuple[int, ...]             # alpha_bar index of position p's target; -1 = alpha_bar 1
    num_timesteps: int                # T of the schedule
    start: int = 0                    # first executed position (> 0 for a fidelity start)
    x0_noise_t: Optional[int] = None  # q_sample level of a given x0 (fidelity start)
    second_order: Tuple[bool, ...] = ()  # DPM++: positions that use the 2M update
    # Karras grid: alpha_bar of every position and of the final target (S + 1 entries), which
    # are not the schedule's values at `timesteps` (empty: read them from the schedule)
    alpha_bars: Tuple[float, ...] = ()

    @property
    def solver(self) -> samplers.Solver:
        return samplers.get(self.sampler)

    @property
    def num_steps(self) -> int:
        """Length S of the grid (not of the executed part)."""
        return len(self.timesteps)

    def positions(self, first: Optional[int] = None, last: Optional[int] = None) -> np.ndarray:
        """Executed positions [first, last), default the whole run [start, S)."""
        first = self.start if first is None else first
        last = self.num_steps if last is None else last
        return np.arange(first, last, dtype=np.int32)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _grid(sampler: str, steps: Optional[int], spacing: Optional[str], num_timesteps: int):
    """(resolved spacing, ascending grid, notice or None); errors name sampler, steps, spacing."""
    T = num_timesteps
    samplers.get(sampler)   # unknown sampler: an error listing the choices
    spacing = 'auto' if spacing is None else spacing
    if spacing not in SPACINGS:
        raise ValueError(f'{sampler}: unknown spacing {spacing!r}; choose one of {SPACINGS}')
    if steps is None:
        steps = T if spacing == 'full' else DEFAULT_STEPS
    if not _is_int(steps) or not 1 <= steps <= T:
        raise ValueError(f'{sampler}: steps must be an integer from 1 to {T} (the schedule '
                         f'length), got steps={steps!r}')
    steps = int(steps)
    where = f"{sampler}: steps={steps} with spacing={spacing!r}"
    if spacing == 'full':
        if steps != T:
            raise ValueError(f'{where}: the full grid runs all {T} timesteps; pass steps={T} '
                             "(or None), or another spacing ('auto', 'leading', 'linspace')")
        return 'full', ddpm.full_timesteps(T), None
    if spacing == 'trailing':
        return 'trailing', trailing_timesteps(steps, T), None
    usual = DEFAULT_SPACING[sampler] if spacing == 'auto' else spacing
    full_notice = (f"{sampler}: steps={T} runs every timestep (spacing='full', t = {T - 1}..0): "
                   f"the {'original VD' if usual == 'uniform' else usual} grid is not defined "
                   f'for {T} steps')
    if usual == 'uniform':
        last = ddim.original_grid_last(steps, T)
        if last < T:
            return 'uniform', ddim.make_ddim_timesteps(steps, T, 'uniform'), None
        stride = T // steps
        if spacing == 'uniform':
            raise ValueError(
                f'{where}: the original grid arange(0, {T}, {stride}) + 1 would feed t={last}, '
                f'outside the {T}-step schedule (the original fails the same way); use '
                f"spacing='auto' for a grid of exactly {steps} steps")
        if steps == T:  # only 0..T-1 has T distinct timesteps
            return 'full', ddpm.full_timesteps(T), full_notice
        asc = ddim.leading_timesteps(steps, T)
        return 'leading', asc, (
            f'{sampler}: the original VD grid arange(0, {T}, {stride}) + 1 is not defined for '
            f"steps={steps} (it would feed t={last}); using the 'leading' grid "
            f'arange({steps}) * {stride} + 1 instead (t = {asc[-1]}..{asc[0]}, exactly {steps} steps)')
    if steps < T:  # 'leading' and 'linspace' give exactly S distinct timesteps for every S < T
        if usual == 'leading':
            return 'leading', ddim.leading_timesteps(steps, T), None
        return 'linspace', dpm_solver.linspace_timesteps(steps, T), None
    if spacing == 'auto':
        return 'full', ddpm.full_timesteps(T), full_notice
    problem = (f'arange({T}) * 1 + 1 would feed t={T}, outside the {T}-step schedule'
               if usual == 'leading' else
               f'linspace(0, {T - 1}, {T + 1}).round() would repeat timesteps')
    raise ValueError(f"{where}: {problem}; use spacing='full' (or 'auto') to run all {T} "
                     'timesteps')


def trailing_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """diffusers' `timestep_spacing='trailing'` (Lin et al. 2023 §3.3), ascending:
    `round(arange(T, 0, -T/S)) - 1`, so the first step is always t = T - 1 (with zero
    terminal SNR: pure noise, the very point sampling starts from) and exactly S steps."""
    ts = (np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)) - 1).astype(np.int64)[::-1]
    if len(ts) != steps or np.any(np.diff(ts) <= 0):  # not reached for 1 <= S <= T
        raise ValueError(f'trailing spacing with steps={steps} does not give {steps} distinct timesteps')
    return ts.copy()


def check_steps(sampler: str, steps: Optional[int] = None, spacing: Optional[str] = 'auto', *,
                num_timesteps: int = 1000,
                schedule: Optional[Schedule] = None) -> Tuple[str, Optional[str]]:
    """Validate a (sampler, steps, spacing) choice without any model: call it before loading one.

    Spacings (the timesteps fed to the model, T = num_timesteps, S = steps):
      'uniform'  the original VD grid `arange(0, T, T//S) + 1` (parity with the released code;
                 S + 1 entries when T//S does not divide T evenly, e.g. 31 for S = 30). It is
                 undefined when it would feed t = T (T//S divides T - 1: 599 of S = 1..1000).
      'leading'  `arange(S) * (T//S) + 1`: exactly S steps, for every S < T (diffusers'
                 'leading' with steps_offset=1); the original grid's first S entries.
      'linspace' `linspace(0, T-1, S+1).round()[1:]`: exactly S steps for S < T (diffusers'
                 default, DPM-Solver++'s usual grid).
      'trailing' `round(arange(T, 0, -T/S)) - 1`: exactly S steps, the first at t = T - 1
                 (Lin et al. 2023; use it with zero terminal SNR).
      'full'     every t in T-1..0 (S must be T or None).
      'auto'     (default) ddim/ddpm/euler/euler_a: 'uniform' where defined, else 'leading'
                 (with a notice); dpm++: 'linspace'; for S = T every sampler: 'full' (with a
                 notice).
    Args:
      sampler: a name of `SAMPLERS`.
      steps: S in [1, T]; None = 50 (T for 'full').
      spacing: one of `SPACINGS`; None = 'auto'.
      schedule: the model's schedule when known: 'auto' is 'trailing' for a zero-terminal-SNR
        v-prediction schedule (`starts_below_pure_noise`), as in `make_plan`. Without it the
        answer is the one for VD's schedule.
    Returns:
      (resolved spacing, notice): the spacing `make_plan` will use (pass it on to make the
      choice explicit), and a one-line message to print when 'auto' fell back from the
      sampler's usual grid (None otherwise). `make_plan(spacing='auto')` issues the same
      message as a `StepGridNotice` warning.
    Raises:
      ValueError naming the sampler, the steps and the spacing.
    """
    resolved, _, notice = _grid(sampler, steps, _auto(sampler, spacing, schedule), num_timesteps)
    return resolved, notice


def _auto(sampler: str, spacing: Optional[str], schedule: Optional[Schedule]) -> Optional[str]:
    """'trailing' where 'auto' means it for this schedule (`starts_below_pure_noise`), else
    `spacing` unchanged."""
    if spacing in (None, 'auto') and starts_below_pure_noise(sampler, schedule):
        # A zero-terminal-SNR model that predicts v was trained to denoise pure noise at
        # t = T - 1 (Lin et al. 2023); the original VD grid starts at t = 981 for 50 steps and
        # would hand it pure noise labelled as a noisy image. Its grid is 'trailing' (diffusers
        # stores `timestep_spacing='trailing'` with such models). VD's own schedule has signal
        # at T - 1, so converted VD weights keep the original grid.
        return 'trailing'
    return spacing


def auto_depends_on_schedule(sampler: str, spacing: Optional[str]) -> bool:
    """Whether what `spacing` resolves to for `sampler` depends on the model's schedule: 'auto'
    with a sampler whose usual grid ('uniform' / 'leading') does not start at t = T - 1 becomes
    'trailing' for a zero-terminal-SNR v model. Command lines check the flags before a model
    loads and say where 'auto' lands only once they know (`check_steps(schedule=...)`)."""
    return spacing in (None, 'auto') and DEFAULT_SPACING[sampler] in ('uniform', 'leading')


def starts_below_pure_noise(sampler: str, schedule: Optional[Schedule]) -> bool:
    """Whether 'auto' spacing resolves to 'trailing' for this sampler and schedule: the
    schedule has zero terminal SNR, predicts v (an eps model cannot denoise t = T - 1 there:
    `sampling.check_prediction`), and the sampler's usual grid ('uniform'/'leading') does not
    start at t = T - 1. False without a schedule or with a traced one."""
    if schedule is None or schedule.prediction_type == 'epsilon':
        return False
    if not auto_depends_on_schedule(sampler, 'auto'):
        return False
    if isinstance(schedule.alphas_cumprod, jax.core.Tracer):   # as `sampling.check_prediction`
        return False
    return schedule.zero_terminal_snr


def make_plan(sampler: str = 'ddim', steps: Optional[int] = None, *, num_timesteps: int = 1000,
              spacing: Optional[str] = None, set_alpha_to_one: Optional[bool] = None,
              start_step: Optional[int] = None, fidelity_off_by_one: bool = True,
              lower_order_final: bool = True, karras: bool = False,
              schedule: Optional[Schedule] = None) -> Plan:
    """Build the step grid of a sampler (pure numpy, no model).

    Args:
      sampler: a name of `SAMPLERS` ('ddim', 'ddpm', 'dpm++', 'euler', 'euler_a').
      steps: number of grid steps (default 50; must be None or T for spacing 'full').
      spacing: 'auto' (None) | 'uniform' | 'leading' | 'linspace' | 'trailing' | 'full', see
        `check_steps`. 'auto' keeps the original VD grid (linspace for dpm++) wherever it is
        defined and otherwise warns (`StepGridNotice`) and uses a grid of exactly `steps`
        steps; for a zero-terminal-SNR v-prediction `schedule` it is 'trailing'
        (`starts_below_pure_noise`); `plan.spacing` is the resolved one.
      set_alpha_to_one: target of the last step. False = alpha_bar[0] (the original DDIM;
        diffusers `set_alpha_to_one=False`); True = clean data, alpha_bar 1 (diffusers'
        DDPMScheduler, DPM-Solver and Euler `final_sigmas_type='zero'`). Default: False for
        ddim unless the grid is 'full', True otherwise ('full' requires True: it ends at t=0).
      start_step: start from a clean x0 at ascending grid index k (image-variation fidelity,
        `ddim.fidelity_start`); None starts from pure noise at the top of the grid.
      fidelity_off_by_one: reproduce the original's start one step below the noise level.
      lower_order_final: DPM++ only: first-order last step when S < 15 (diffusers default).
      karras: the Karras et al. sigma grid between the schedule's sigma_max and sigma_min
        (diffusers' `use_karras_sigmas=True`; dpm++ only); needs `schedule`.
      schedule: the schedule (read for the Karras grid and by 'auto' spacing).
    """
    solver = samplers.get(sampler)
    spacing, asc, notice = _grid(sampler, steps, _auto(sampler, spacing, schedule), num_timesteps)
    if notice is not None:
        warnings.warn(notice, StepGridNotice, stacklevel=2)
    if set_alpha_to_one is None:
        set_alpha_to_one = solver.ends_at_clean_data or spacing == 'full'
    if spacing == 'full' and not set_alpha_to_one:
        raise ValueError(f"{sampler}: spacing='full' (steps={len(asc)}) ends at t=0, whose target "
                         'must be clean data (set_alpha_to_one=True)')
    alpha_bars = ()
    if karras:
        if not solver.supports_karras:
            with_karras = tuple(n for n in SAMPLERS if samplers.get(n).supports_karras)
            raise ValueError(f'{sampler}: the Karras sigma grid is for {with_karras} only')
        if schedule is None:
            raise ValueError(f'{sampler}: the Karras grid needs the schedule (make_plan(schedule=...))')
        if not set_alpha_to_one:
            raise ValueError(f'{sampler}: the Karras grid ends at sigma 0 (set_alpha_to_one=True)')
        ac = np.asarray(schedule.alphas_cumprod, np.float64)
        desc, bars = dpm_solver.karras_alpha_bars(np.where(ac == 0, samplers.ZERO_SNR_ALPHA_BAR, ac),
                                                  len(asc))
        asc = desc[::-1]
        alpha_bars = tuple(float(a) for a in bars)
    # Each step targets the next lower grid entry; the lowest one targets alpha_bar[0] (the
    # original's `alphas_prev = [alpha_bar[0]] + ...`) or clean data (-1).
    prev_asc = np.concatenate([[-1 if set_alpha_to_one else 0], asc[:-1]])
    n = len(asc)
    start, x0_noise_t = 0, None
    if start_step is not None:
        k, start = ddim.fidelity_start(n, start_step, fidelity_off_by_one)
        x0_noise_t = int(asc[k])
    return Plan(sampler=sampler, spacing=spacing, timesteps=tuple(int(t) for t in asc[::-1]),
                prev=tuple(int(t) for t in prev_asc[::-1]), num_timesteps=num_timesteps,
                start=start, x0_noise_t=x0_noise_t, alpha_bars=alpha_bars,
                **solver.plan_fields(n, start, set_alpha_to_one, lower_order_final))
