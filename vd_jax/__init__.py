"""vd_jax: Versatile Diffusion in JAX/Flax."""
__version__ = '0.1.0'
