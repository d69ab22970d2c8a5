"""Process-level XLA settings the entry points apply before JAX starts.

On CPU, this jaxlib (0.10.x) sends convolutions and dots through YNNPACK by default; XLA's
own Eigen kernels ran the full-width UNet 1.37-1.46x faster with identical results
(BENCHMARKS.md, item 6). `configure_xla()` adds that flag to XLA_FLAGS unless the user set
it (or set VD_JAX_KEEP_XLA_FLAGS=1). It only affects the CPU backend; TPU and GPU runs are
unchanged. Call it before the first JAX computation (sample.py and train.py do).
"""
import os

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',)


def configure_xla() -> str:
    """Append the recommended CPU flags to XLA_FLAGS (once); returns the resulting value."""
    flags = os.environ.get('XLA_FLAGS', '')
    if os.environ.get('VD_JAX_KEEP_XLA_FLAGS'):
        return flags
    for f in CPU_FLAGS:
        name = f.split('=')[0]
        if name not in flags:
            flags = f'{flags} {f}'.strip()
    os.environ['XLA_FLAGS'] = flags
    return flags
