"""Process-level XLA settings the entry points apply before JAX starts.

On CPU, this jaxlib (0.10.x) sends convolutions and dots through YNNPACK by default; XLA's
own Eigen kernels ran the full-width UNet 1.37-1.46x faster with identical results
(BENCHMARKS.md, item 6). `configure_xla()` adds that flag to XLA_FLAGS unless the user set
it (or set VD_JAX_KEEP_XLA_FLAGS=1). XLA aborts the process on a flag it does not know, and
this one is experimental, so it is only added for the jaxlib versions it was measured on;
another jaxlib runs with its own defaults. Call it before the first JAX computation (sample.py
and train.py do); it only affects the CPU backend.
"""
import logging
import os

logger = logging.getLogger(__name__)

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',)
# jaxlib versions (major.minor) whose XLA knows CPU_FLAGS and where they were measured
MEASURED_JAXLIB = ('0.10',)


def _jaxlib_version() -> str:
    try:
        from jaxlib import version  # does not start an XLA backend
        return version.__version__
    except Exception:  # noqa: BLE001 -- no jaxlib: nothing to configure
        return ''


def configure_xla() -> str:
    """Append the recommended CPU flags to XLA_FLAGS (once); returns the resulting value."""
    flags = os.environ.get('XLA_FLAGS', '')
    if os.environ.get('VD_JAX_KEEP_XLA_FLAGS'):
        return flags
    jaxlib = _jaxlib_version()
    if '.'.join(jaxlib.split('.')[:2]) not in MEASURED_JAXLIB:
        logger.info('jaxlib %s: not adding %s (measured on jaxlib %s only)', jaxlib or '(none)',
                    ' '.join(CPU_FLAGS), ', '.join(MEASURED_JAXLIB))
        return flags
    for f in CPU_FLAGS:
        name = f.split('=')[0]
        if name not in flags:
            flags = f'{flags} {f}'.strip()
    os.environ['XLA_FLAGS'] = flags
    return flags
