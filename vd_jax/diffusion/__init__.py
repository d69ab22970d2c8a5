"""Diffusion math as pure functions over a `denoise_fn(x_t, t) -> eps` closure."""
from vd_jax.diffusion.schedule import Schedule, make_schedule, q_sample, eps_loss  # noqa: F401
from vd_jax.diffusion.guidance import cfg_denoise  # noqa: F401
from vd_jax.diffusion.sampling import (Plan, Sampler, SamplerState, make_plan, sample,  # noqa: F401
                                       init_state, run_steps, check_steps, StepGridNotice)
