"""Evaluation: metrics of generated samples (FID, CLIP score) and the shapes-world checks.

Run as `python -m vd_jax.eval <command> ...`; see the README's "Evaluate" section.
"""
