"""The DDPM noise schedule (VD's by default) and what a model predicts on it.

VD's schedule (SHI-Labs `lib/model_zoo/vd.py:127-185`, `diffusion_utils.make_beta_schedule`):
betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, which diffusers calls 'scaled_linear'.
Derived arrays are computed in float64 with numpy and stored as float32, exactly as the
original registers its buffers; samplers read them from here so they see the same values.

The config section `model.schedule` (every checkpoint's config.json records it) also chooses,
for models trained here, the options diffusers users know:
  beta_schedule              'scaled_linear' (VD's, default) | 'linear' | 'squaredcos_cap_v2'
  rescale_zero_terminal_snr  False (default) | True: Lin et al. 2023 (arXiv 2305.08891)
                             Algorithm 1, sqrt(alpha_bar) shifted and scaled so that
                             sqrt(alpha_bar_T) = 0 (no signal left at the last step) and
                             sqrt(alpha_bar_0) is kept
  prediction_type            'epsilon' (VD's, default) | 'v_prediction' | 'sample'
Missing keys take these defaults, so older configs (and the released weights) mean VD's
schedule with epsilon prediction.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vd_jax.errors import ConfigError

BETA_SCHEDULES = ('scaled_linear', 'linear', 'squaredcos_cap_v2')
PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The `model.schedule` section, validated and hashable (a static `jit` argument)."""
    beta_linear_start: float = 0.00085
    beta_linear_end: float = 0.012
    timesteps: int = 1000
    beta_schedule: str = 'scaled_linear'
    rescale_zero_terminal_snr: bool = False
    prediction_type: str = 'epsilon'

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f'schedule.beta_schedule must be one of {BETA_SCHEDULES}, '
                              f'got {self.beta_schedule!r}')
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f'schedule.prediction_type must be one of {PREDICTION_TYPES}, '
                              f'got {self.prediction_type!r}')
        if isinstance(self.timesteps, bool) or int(self.timesteps) != self.timesteps \
                or int(self.timesteps) < 2:
            raise ConfigError(f'schedule.timesteps must be an integer >= 2, got {self.timesteps!r}')
        if not 0.0 < float(self.beta_linear_start) <= float(self.beta_linear_end) < 1.0:
            raise ConfigError('schedule needs 0 < beta_linear_start <= beta_linear_end < 1, got '
                              f'{self.beta_linear_start}, {self.beta_linear_end}')

    @classmethod
    def coerce(cls, config: Any = None, **kwargs) -> 'ScheduleConfig':
        """From a ScheduleConfig, a mapping / ConfigDict section, a legacy
        (beta_linear_start, beta_linear_end, timesteps) tuple, or None (VD's defaults);
        keyword arguments override. Unknown keys are an error naming them."""
        if isinstance(config, cls) and not kwargs:
            return config
        if isinstance(config, cls):
            args = dataclasses.asdict(config)
        elif isinstance(config, (tuple, list)):
            args = dict(zip(('beta_linear_start', 'beta_linear_end', 'timesteps'), config))
        elif config is None:
            args = {}
        else:
            args = dict(config.items()) if hasattr(config, 'items') else dict(config)
        args.update(kwargs)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(f'unknown schedule option(s) {unknown}; known: {sorted(known)}')
        if 'timesteps' in args:
            args['timesteps'] = int(args['timesteps'])
        for k in ('beta_linear_start', 'beta_linear_end'):
            if k in args:
                args[k] = float(args[k])
        if 'rescale_zero_terminal_snr' in args:
            args['rescale_zero_terminal_snr'] = bool(args['rescale_zero_terminal_snr'])
        return cls(**args)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@struct.dataclass
class Schedule:
    """All per-timestep arrays, shape (T,), float32. Paper notation: alpha_bar = alphas_cumprod.

    `prediction_type` (static: part of the jit cache key, not traced) says what the model
    trained on this schedule outputs; samplers and losses read it from here."""
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
    prediction_type: str = struct.field(pytree_node=False, default='epsilon')

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the last step holds no signal (alpha_bar_T = 0). Reads the concrete values
        with numpy first: indexing a jax array inside a `jit` trace is staged (a tracer) even
        when the array itself is a closed-over constant."""
        return float(np.asarray(self.alphas_cumprod)[-1]) == 0.0


def cosine_betas(timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """'squaredcos_cap_v2' (Nichol & Dhariwal 2021): betas from alpha_bar(t) =
    cos((t + 0.008) / 1.008 * pi / 2)^2, each capped at `max_beta`; float64."""
    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta)
                     for i in range(timesteps)], dtype=np.float64)


def zero_terminal_snr_betas(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: betas whose sqrt(alpha_bar) is shifted so the last one is
    0 and scaled so the first one is unchanged; float64."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab ** 2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def make_betas(beta_linear_start: float = 0.00085, beta_linear_end: float = 0.012,
               timesteps: int = 1000, beta_schedule: str = 'scaled_linear',
               rescale_zero_terminal_snr: bool = False) -> np.ndarray:
    """The betas (T,) float64 of a schedule (see the module docstring)."""
    if beta_schedule == 'scaled_linear':
        betas = np.linspace(beta_linear_start ** 0.5, beta_linear_end ** 0.5, timesteps,
                            dtype=np.float64) ** 2
    elif beta_schedule == 'linear':
        betas = np.linspace(beta_linear_start, beta_linear_end, timesteps, dtype=np.float64)
    elif beta_schedule == 'squaredcos_cap_v2':
        betas = cosine_betas(timesteps)
    else:
        raise ConfigError(f'beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}')
    if rescale_zero_terminal_snr:
        betas = zero_terminal_snr_betas(betas)
    return betas


def schedule_arrays(beta_linear_start: float = 0.00085, beta_linear_end: float = 0.012,
                    timesteps: int = 1000, beta_schedule: str = 'scaled_linear',
                    rescale_zero_terminal_snr: bool = False,
                    prediction_type: str = 'epsilon') -> dict:
    """The 12 schedule buffers of the original as float64 numpy arrays (before the cast).

    For VD's schedule: betas = linspace(sqrt(start), sqrt(end), T)^2 ("linear" in LDM =
    "scaled_linear" in diffusers); v_posterior = 0. `prediction_type` is accepted (so a
    whole config section can be passed) and does not change the arrays. With zero terminal
    SNR the entries that divide by alpha_bar_T = 0 are inf at T - 1 (no sampler reads them
    there).
    """
    del prediction_type
    betas = make_betas(beta_linear_start, beta_linear_end, timesteps, beta_schedule,
                       rescale_zero_terminal_snr)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    with np.errstate(divide='ignore'):
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


def make_schedule(config: Optional[Any] = None, **kwargs) -> Schedule:
    """Build the schedule from a config section (`model.schedule`: a mapping, ConfigDict or
    `ScheduleConfig`; None = VD's) or keyword arguments; float64 -> float32 as the original
    buffers. Raises ConfigError naming an unknown key or value."""
    sc = ScheduleConfig.coerce(config, **kwargs)
    arrays = schedule_arrays(**sc.to_dict())
    return Schedule(**{k: jnp.asarray(v.astype(np.float32)) for k, v in arrays.items()},
                    prediction_type=sc.prediction_type)


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
      the t+1 the original DDIM sampler feeds. `vd_jax.diffusion.losses.diffusion_loss` is
      the general form (prediction types, min-SNR weighting).
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
