"""Model families: the grouped diffuser (`unet`), and the VAEs and context encoders."""
from vd_jax.models.unet import Diffuser, DiffuserConfig, StreamConfig, plan_stream  # noqa: F401
