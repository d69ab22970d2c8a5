"""The sampling loop shared by every sampler (`vd_jax.diffusion.samplers`: DDIM, DDPM,
DPM-Solver++(2M), Euler, Euler ancestral): one `lax.scan` over the steps inside `jit`,
randomness only from explicit per-sample keys. The loop knows no sampler by name: each one is
a `Solver` (its grid default, its tables, its step, whether it draws noise).

Pieces, from the bottom up:
  * `Plan` / `make_plan`: the static step grid (hashable; a `jit` static argument). Position p
    of a plan feeds `timesteps[p]` to the model and moves alpha_bar[timesteps[p]] ->
    alpha_bar[prev[p]] (prev = -1 means clean data, alpha_bar = 1).
  * `init_state` / `run_steps`: pure and traceable; `run_steps` scans any slice of positions,
    so a whole run and a run in chunks execute the same step program.
  * `sample`: the pure one-call API over a `denoise_fn(x_t, t, ctx) -> model output` closure
    (use it inside your own `jit`). The output is what the schedule's `prediction_type` says
    (eps for VD; v or x0 for models trained so), guidance is applied to it as is.
  * `Sampler`: the jitted API over `apply_fn(params, x_t, t, ctx) -> eps`; params are an
    argument of the compiled program (never constant-folded), and calling it again with new
    params/contexts/keys/guidance scale/eta of the same shapes reuses the compiled program.
    `Sampler.iterate` / `Sampler.sample_chunked` run it k steps per call for progress bars.

Seeds are reproducible across batch sizes: every random draw is made per sample from that
sample's key (initial noise from `fold_in(key, 0)`, step noise of position p from
`fold_in(fold_in(key, 1), p)`), never as one `normal(key, (B, ...))`, so sample i of a batch
equals the same key sampled alone (up to the denoiser's own batch-size numerics).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vd_jax.diffusion import samplers
from vd_jax.diffusion.plan import (DEFAULT_SPACING, DEFAULT_STEPS, SAMPLERS, SPACINGS,  # noqa: F401
                                   Plan, StepGridNotice, check_steps, make_plan,
                                   trailing_timesteps)
from vd_jax.diffusion.guidance import (cfg_denoise, is_static_one, is_static_zero,
                                       mark_shares_x, shares_x)
from vd_jax.diffusion.schedule import Schedule, q_sample


def step_alphas(schedule: Schedule, plan: Plan):
    """(a_t, a_prev) (S,) float32: alpha_bar at each position and at its target, from the plan's
    Karras grid or the (traced) schedule; alpha_bar_T = 0 becomes `ZERO_SNR_ALPHA_BAR` for the
    samplers that divide by it, as diffusers does."""
    if plan.alpha_bars:
        bars = jnp.asarray(plan.alpha_bars, jnp.float32)
        return bars[:-1], bars[1:]
    ac = schedule.alphas_cumprod
    if plan.solver.clamps_zero_snr:
        ac = jnp.where(ac == 0, jnp.float32(samplers.ZERO_SNR_ALPHA_BAR), ac)
    t = jnp.asarray(plan.timesteps, jnp.int32)
    prev = jnp.asarray(plan.prev, jnp.int32)
    return ac[t], jnp.where(prev < 0, 1., ac[jnp.maximum(prev, 0)])


def step_tables(schedule: Schedule, plan: Plan, eta=0.0) -> dict:
    """Per-position coefficient arrays (S,) in float32, gathered from the (traced) schedule."""
    if schedule.num_timesteps != plan.num_timesteps:
        raise ValueError(f'schedule has {schedule.num_timesteps} timesteps but the plan was '
                         f'built for {plan.num_timesteps}')
    a_t, a_prev = step_alphas(schedule, plan)
    tab = dict(t=jnp.asarray(plan.timesteps, jnp.int32), a_t=a_t, a_prev=a_prev)
    return plan.solver.tables(tab, plan, schedule, eta)


def check_prediction(schedule: Schedule, plan: Plan) -> None:
    """Refuse a run that asks an eps model for x0 where alpha_bar = 0 (zero terminal SNR at
    t = T - 1, e.g. the 'trailing' grid): x0 is undefined there (diffusers returns NaN).
    Skipped when the schedule is traced (the check needs its values)."""
    if schedule.prediction_type != 'epsilon' or plan.solver.clamps_zero_snr or plan.alpha_bars:
        return
    if isinstance(schedule.alphas_cumprod, jax.core.Tracer):
        return
    executed = plan.timesteps[plan.start:]
    if executed and executed[0] == plan.num_timesteps - 1 and schedule.zero_terminal_snr:
        raise ValueError(
            f'{plan.sampler}: an epsilon-prediction model cannot denoise t={executed[0]}, where this '
            'zero-terminal-SNR schedule has no signal left (x0 = (x - sqrt(1 - a) eps) / sqrt(a) '
            "divides by 0); train with prediction_type='v_prediction', or use a grid that does not "
            "start at t = T - 1 (spacing 'leading'/'uniform'), or the dpm++/euler samplers")


# ----------------------------------------------------------------------------------------
# Keys and per-sample noise
# ----------------------------------------------------------------------------------------

def as_keys(keys):
    """Per-sample typed keys (B,) from typed keys (B,), raw uint32 keys (B, 2) or int seeds (B,).

    Seeds map through `jax.random.key(seed)`, so seed s gives the same sample at any batch size.
    """
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        if keys.ndim != 1:
            raise ValueError(f'keys must be one key per sample, shape (B,), got {keys.shape}')
        return keys
    if keys.dtype == jnp.uint32 and keys.ndim == 2:
        return jax.random.wrap_key_data(keys)
    if jnp.issubdtype(keys.dtype, jnp.integer) and keys.ndim == 1:
        return jax.vmap(jax.random.key)(keys)
    raise ValueError(f'keys must be typed keys (B,), raw uint32 keys (B, 2) or integer seeds (B,); '
                     f'got dtype {keys.dtype} shape {keys.shape}')


def per_sample_normal(keys, sample_shape) -> jnp.ndarray:
    """N(0, I) of shape (B, *sample_shape), float32, sample i drawn from keys[i] alone."""
    return jax.vmap(lambda k: jax.random.normal(k, sample_shape, jnp.float32))(keys)


def fold_keys(keys, data):
    """fold_in(keys[i], data) for every sample (data may be traced)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def step_noise(step_keys, position, sample_shape) -> jnp.ndarray:
    """The noise a stochastic step at grid `position` adds: per sample, independent of
    batch size and of how the run is chunked."""
    return per_sample_normal(fold_keys(step_keys, position), sample_shape)


# ----------------------------------------------------------------------------------------
# State, init and the scanned steps
# ----------------------------------------------------------------------------------------

@struct.dataclass
class SamplerState:
    """The loop carry; always float32 whatever the denoiser computes in."""
    x: jnp.ndarray        # (B, ...) the sampler's state (x_t; x_t / sqrt(a) for Euler); x0 at the end
    pred_x0: jnp.ndarray  # (B, ...) last data prediction (DPM++ history; zeros before step 1)
    keys: Any             # (B,) typed keys for step noise, or None for a deterministic run


def init_state(schedule: Schedule, plan: Plan, *, x_T=None, keys=None, shape=None,
               x0=None) -> SamplerState:
    """The state before the first executed position.

    Exactly one start: `x0` (clean latents, noised with q_sample to `plan.x0_noise_t` using the
    per-sample initial noise; needs a plan with `start_step`), `x_T` (the initial N(0, I) noise
    given, e.g. from a torch golden run), or `shape` (B, ...) with `keys` (per-sample initial
    noise). Samplers that work in sigma space (Euler) scale the noise to their state.
    `keys` (B,) is also needed for stochastic steps (DDPM, DDIM with eta != 0, Euler ancestral).
    """
    if keys is not None:
        keys = as_keys(keys)
    given = [n for n, v in (('x0', x0), ('x_T', x_T)) if v is not None]
    if len(given) > 1:
        raise ValueError('pass at most one of x0 and x_T')
    solver = plan.solver
    if x0 is not None:
        if plan.x0_noise_t is None:
            raise ValueError('x0 given but the plan has no start_step (the DDIM index to noise x0 to)')
        if keys is None:
            raise ValueError('starting from x0 needs keys (per-sample q_sample noise)')
        x0 = jnp.asarray(x0, jnp.float32)
        b = x0.shape[0]
        noise = per_sample_normal(fold_keys(keys, 0), x0.shape[1:])
        x = q_sample(schedule, x0, jnp.full((b,), plan.x0_noise_t, jnp.int32), noise)
        x = solver.from_vp(x, schedule.alphas_cumprod[plan.x0_noise_t])
    else:
        if x_T is not None:
            x = jnp.asarray(x_T, jnp.float32)
        else:
            if shape is None or keys is None:
                raise ValueError('pass x_T, or x0, or shape=(B, ...) together with keys/seeds')
            x = per_sample_normal(fold_keys(keys, 0), tuple(shape[1:]))
            if x.shape[0] != shape[0]:
                raise ValueError(f'shape {tuple(shape)} has batch {shape[0]} but {x.shape[0]} keys '
                                 'were given')
        x = solver.init_noise(x, step_tables(schedule, plan), plan)
    if keys is not None and keys.shape[0] != x.shape[0]:
        raise ValueError(f'{keys.shape[0]} keys for a batch of {x.shape[0]}')
    return SamplerState(x=x, pred_x0=jnp.zeros_like(x),
                        keys=None if keys is None else fold_keys(keys, 1))


def is_stochastic(plan: Plan, eta) -> bool:
    """Whether the steps draw noise: always for DDPM and Euler ancestral, for DDIM unless eta is
    a static 0; the deterministic solvers refuse an eta != 0."""
    return plan.solver.draws_noise(eta)


def run_steps(model_fn: Callable, schedule: Schedule, plan: Plan, state: SamplerState, positions,
              *, eta=0.0) -> SamplerState:
    """Run the plan's steps at `positions` (int array, ascending, consecutive) with `lax.scan`.

    Args:
      model_fn: (x_t float32 (B, ...), t int32 (B,)) -> the model output (B, ...) float32,
        guidance included: eps, v or x0 as `schedule.prediction_type` says.
      eta: DDIM noise scale; a Python 0 makes DDIM deterministic (no noise drawn), anything
        else (Python or traced) draws per-sample noise.
    """
    stochastic = is_stochastic(plan, eta)
    if stochastic and state.keys is None:
        raise ValueError(f'{plan.sampler} with eta={eta} draws noise: pass keys (or seeds)')
    tab = step_tables(schedule, plan, eta if stochastic else 0.0)
    b, sample_shape = state.x.shape[0], state.x.shape[1:]
    solver = plan.solver

    def body(st: SamplerState, pos):
        tp = {k: v[pos] for k, v in tab.items()}
        t = jnp.full((b,), tp['t'], jnp.int32)
        out = model_fn(solver.model_input(st.x, tp), t).astype(jnp.float32)
        if out.shape != st.x.shape:
            raise ValueError(f'denoise_fn returned {out.shape} for x_t {st.x.shape}')
        noise = step_noise(st.keys, pos, sample_shape) if stochastic else None
        x, x0 = solver.step(st.x, out, st.pred_x0, tp, noise, schedule.prediction_type)
        return SamplerState(x=x, pred_x0=x0, keys=st.keys), None

    state, _ = jax.lax.scan(body, state, jnp.asarray(positions, jnp.int32))
    return state


def _cast_floating(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


def make_eps_fn(denoise_fn: Callable, context, *, uncond_context=None, guidance_scale=7.5,
                compute_dtype=None, guidance_rescale=0.0) -> Callable:
    """Close a `denoise_fn(x_t, t, ctx)` over its contexts, guidance and compute dtype:
    -> model_fn(x_t, t) -> float32 model output (eps for VD). The denoiser sees x_t and the
    floating context leaves in `compute_dtype` (e.g. bfloat16) while the sampler state stays
    float32. `guidance_rescale` phi: see `vd_jax.diffusion.guidance.rescale_guided`."""
    guided = cfg_denoise(denoise_fn, guidance_scale, guidance_rescale)
    ctx = _cast_floating(context, compute_dtype)
    uctx = _cast_floating(uncond_context, compute_dtype)

    def eps_fn(x_t, t):
        x_in = x_t if compute_dtype is None else x_t.astype(compute_dtype)
        return guided(x_in, t, ctx, uctx)
    return eps_fn


def sample(denoise_fn: Callable, schedule: Schedule, context=None, *, uncond_context=None,
           guidance_scale=7.5, sampler: str = 'ddim', steps: Optional[int] = None, eta=0.0,
           x_T=None, keys=None, shape=None, x0=None, start_step: Optional[int] = None,
           fidelity_off_by_one: bool = True, spacing: Optional[str] = None,
           set_alpha_to_one: Optional[bool] = None, lower_order_final: bool = True,
           compute_dtype=None, plan: Optional[Plan] = None, karras: bool = False,
           guidance_rescale=0.0) -> jnp.ndarray:
    """Sample latents with classifier-free guidance; pure and traceable (wrap it in `jit`, or
    use `Sampler` for a ready jitted version taking params).

    Args:
      denoise_fn: (x_t (B, ...), t int32 (B,), ctx pytree with batch-leading leaves) -> model
        output (eps, v or x0: `schedule.prediction_type`).
      schedule: `make_schedule(cfg.model.schedule)`.
      context / uncond_context: pytrees of equal structure, leaves (B, ...).
      guidance_scale: s; a Python 1.0 runs only the conditional pass (uncond may be None).
      sampler, steps, spacing, set_alpha_to_one, start_step, fidelity_off_by_one,
        lower_order_final, karras: the grid, see `make_plan` (or pass `plan`).
      guidance_rescale: phi of `vd_jax.diffusion.guidance.rescale_guided` (0: off).
      eta: DDIM noise scale (Python or traced); ignored by ddpm, must be 0 for dpm++.
      x_T / shape+keys / x0: the start, see `init_state`. keys: typed keys (B,), raw (B, 2)
        or int seeds (B,).
      compute_dtype: dtype the denoiser is fed (None: float32 as given).
    Returns:
      x_0 latents (B, ...) float32.
    """
    plan = plan or make_plan(sampler, steps, num_timesteps=schedule.num_timesteps,
                             spacing=spacing, set_alpha_to_one=set_alpha_to_one,
                             start_step=start_step, fidelity_off_by_one=fidelity_off_by_one,
                             lower_order_final=lower_order_final, karras=karras,
                             schedule=schedule)
    check_prediction(schedule, plan)
    eps_fn = make_eps_fn(denoise_fn, context, uncond_context=uncond_context,
                         guidance_scale=guidance_scale, compute_dtype=compute_dtype,
                         guidance_rescale=guidance_rescale)
    state = init_state(schedule, plan, x_T=x_T, keys=keys, shape=shape, x0=x0)
    return run_steps(eps_fn, schedule, plan, state, plan.positions(), eta=eta).x


# ----------------------------------------------------------------------------------------
# The jitted driver over apply_fn(params, ...)
# ----------------------------------------------------------------------------------------

# Static arguments are the Python-level choices that change the program: the model function,
# the plan, whether CFG runs (a Python 1.0 skips it), whether steps draw noise (a Python eta 0
# skips it), whether guidance is rescaled (a Python 0 skips it), the compute dtype and the
# output shape. Everything else is traced (a new scale, eta or rescale reuses the program).
_STATIC = ('apply_fn', 'plan', 'guided', 'stochastic', 'compute_dtype', 'rescaled')


def _eps_fn(apply_fn, params, context, uncond_context, scale, guided, compute_dtype,
            rescale=0.0):
    def denoise_fn(x_t, t, ctx):
        return apply_fn(params, x_t, t, ctx)
    # the pipeline's flows (conditioning.Single) take x once for both CFG halves
    return make_eps_fn(mark_shares_x(denoise_fn, shares_x(apply_fn)), context,
                       uncond_context=uncond_context, guidance_scale=scale if guided else 1.0,
                       compute_dtype=compute_dtype, guidance_rescale=rescale)


def _sample_impl(params, schedule, context, uncond_context, scale, eta, x_T, keys, x0, rescale, *,
                 apply_fn, plan, guided, stochastic, compute_dtype, shape, rescaled):
    eps_fn = _eps_fn(apply_fn, params, context, uncond_context, scale, guided, compute_dtype,
                     rescale if rescaled else 0.0)
    state = init_state(schedule, plan, x_T=x_T, keys=keys, shape=shape, x0=x0)
    return run_steps(eps_fn, schedule, plan, state, plan.positions(),
                     eta=eta if stochastic else 0.0).x


def _init_impl(schedule, x_T, keys, x0, *, plan, shape):
    return init_state(schedule, plan, x_T=x_T, keys=keys, shape=shape, x0=x0)


def _steps_impl(params, schedule, state, positions, context, uncond_context, scale, eta, rescale, *,
                apply_fn, plan, guided, stochastic, compute_dtype, rescaled):
    eps_fn = _eps_fn(apply_fn, params, context, uncond_context, scale, guided, compute_dtype,
                     rescale if rescaled else 0.0)
    return run_steps(eps_fn, schedule, plan, state, positions, eta=eta if stochastic else 0.0)


_sample_jit = jax.jit(_sample_impl, static_argnames=_STATIC + ('shape',))
_init_jit = jax.jit(_init_impl, static_argnames=('plan', 'shape'))
_steps_jit = jax.jit(_steps_impl, static_argnames=_STATIC)


class Sampler:
    """A jitted sampler for one flow: `apply_fn(params, x_t, t, ctx) -> model output` (eps for
    VD; what the schedule's `prediction_type` says).

    Build it once per (flow, sampler, steps) and call it many times: one compiled program per
    (flow, shapes, steps, guided?, stochastic?, rescaled?), reused for new params, contexts,
    keys, guidance scales, guidance rescales and etas. `apply_fn` must be a stable function object
    (e.g. defined once at module or pipeline level), since it is a static `jit` argument. The grid
    arguments are those of `make_plan` (spacing 'auto' | 'uniform' | 'leading' | 'linspace' |
    'trailing' | 'full'; `karras=True` needs `schedule=`); the plan is `self.plan`, its length
    `self.plan.num_steps`.

    Example:
      sampler = Sampler(lambda p, x, t, c: unet.apply(p, x, t, c), steps=50)
      z = sampler(params, schedule, ctx, uncond_context=u, seeds=jnp.arange(4),
                  shape=(4, 64, 64, 4), guidance_scale=7.5)
    """

    def __init__(self, apply_fn: Callable, *, sampler: str = 'ddim', steps: Optional[int] = None,
                 num_timesteps: int = 1000, spacing: Optional[str] = None,
                 set_alpha_to_one: Optional[bool] = None, start_step: Optional[int] = None,
                 fidelity_off_by_one: bool = True, lower_order_final: bool = True,
                 compute_dtype=None, karras: bool = False, schedule: Optional[Schedule] = None):
        self.apply_fn = apply_fn
        self.plan = make_plan(sampler, steps, num_timesteps=num_timesteps, spacing=spacing,
                              set_alpha_to_one=set_alpha_to_one, start_step=start_step,
                              fidelity_off_by_one=fidelity_off_by_one,
                              lower_order_final=lower_order_final, karras=karras,
                              schedule=schedule)
        self.compute_dtype = None if compute_dtype is None else np.dtype(compute_dtype)

    def _static(self, guidance_scale, eta, guidance_rescale=0.0, schedule=None):
        if schedule is not None:
            check_prediction(schedule, self.plan)
        guided = not is_static_one(guidance_scale)
        stochastic = is_stochastic(self.plan, eta)
        rescaled = guided and not is_static_zero(guidance_rescale)
        return (dict(apply_fn=self.apply_fn, plan=self.plan, guided=guided,
                     stochastic=stochastic, compute_dtype=self.compute_dtype, rescaled=rescaled),
                jnp.asarray(guidance_scale if guided else 1.0, jnp.float32),
                jnp.asarray(eta, jnp.float32),
                jnp.asarray(guidance_rescale if rescaled else 0.0, jnp.float32))

    @staticmethod
    def _keys(keys, seeds):
        if keys is not None and seeds is not None:
            raise ValueError('pass keys or seeds, not both')
        return seeds if keys is None else keys

    def __call__(self, params, schedule: Schedule, context, *, uncond_context=None,
                 guidance_scale=7.5, eta=0.0, x_T=None, keys=None, seeds=None, shape=None,
                 x0=None, guidance_rescale=0.0) -> jnp.ndarray:
        """Run all steps in one compiled call; arguments as in `sample` (seeds: int (B,)).
        Returns x_0 latents (B, ...) float32."""
        static, scale, eta, rescale = self._static(guidance_scale, eta, guidance_rescale, schedule)
        return _sample_jit(params, schedule, context, uncond_context if static['guided'] else None,
                           scale, eta, x_T, self._keys(keys, seeds), x0, rescale,
                           shape=None if shape is None else tuple(shape), **static)

    def iterate(self, params, schedule: Schedule, context, *, chunk: int = 10,
                uncond_context=None, guidance_scale=7.5, eta=0.0, x_T=None, keys=None,
                seeds=None, shape=None, x0=None,
                guidance_rescale=0.0) -> Iterator[Tuple[int, int, SamplerState]]:
        """Run the steps `chunk` at a time (one compiled chunk program, plus one for a shorter
        last chunk), yielding (steps_done, steps_total, state) after each chunk; the final
        state's x equals `__call__`'s result."""
        if chunk < 1:
            raise ValueError(f'chunk must be >= 1, got {chunk}')
        static, scale, eta, rescale = self._static(guidance_scale, eta, guidance_rescale, schedule)
        uncond_context = uncond_context if static['guided'] else None
        state = _init_jit(schedule, x_T, self._keys(keys, seeds), x0, plan=self.plan,
                          shape=None if shape is None else tuple(shape))
        first, total = self.plan.start, self.plan.num_steps
        if first == total:  # fidelity start at k = 0 (original): nothing to denoise
            yield 0, 0, state
        for lo in range(first, total, chunk):
            hi = min(lo + chunk, total)
            state = _steps_jit(params, schedule, state, self.plan.positions(lo, hi), context,
                               uncond_context, scale, eta, rescale, **static)
            yield hi - first, total - first, state

    def sample_chunked(self, params, schedule: Schedule, context, *, chunk: int = 10,
                       callback: Optional[Callable[[int, int], Any]] = None, **kwargs) -> jnp.ndarray:
        """`__call__` run `chunk` steps per compiled call; `callback(done, total)` after each
        chunk (e.g. a tqdm update). Same result as `__call__`."""
        for done, total, state in self.iterate(params, schedule, context, chunk=chunk, **kwargs):
            if callback is not None:
                callback(done, total)
        return state.x
