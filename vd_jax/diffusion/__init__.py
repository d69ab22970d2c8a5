"""Diffusion math as pure functions over a `denoise_fn(x_t, t) -> eps` closure."""
from vd_jax.diffusion.schedule import Schedule, make_schedule, q_sample, eps_loss  # noqa: F401
