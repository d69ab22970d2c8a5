"""Sample with Versatile Diffusion: every flow and application, batched and jitted.

  python sample.py                  # the shipped VD-mini model (trained on the shapes world), demo prompt
  python sample.py --model tiny     # random (untrained) tiny weights: a smoke test of the install
  python sample.py --ckpt converted/vd4 --task t2i --prompt "a red bicycle" --n 4
  python sample.py --ckpt converted/vd4 --task i2t --image cat.jpg
See `python sample.py --help` and the README for every task.
"""
import sys

from vd_jax.platform import configure_xla

configure_xla()  # before JAX starts: XLA's own CPU kernels (BENCHMARKS.md)
from vd_jax.sample_cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
