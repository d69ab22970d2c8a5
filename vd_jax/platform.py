"""Process-level XLA settings the entry points apply before JAX starts.

On CPU, this jaxlib (0.10.x) sends convolutions and dots through YNNPACK by default; XLA's
own Eigen kernels ran the full-width UNet 1.37-1.46x faster with identical results
(BENCHMARKS.md, item 6). `configure_xla()` adds that flag to XLA_FLAGS unless the user set
it (or set VD_JAX_KEEP_XLA_FLAGS=1). XLA aborts the process on a flag it does not know, and
this one is experimental, so it is only added for the jaxlib versions it was measured on;
another jaxlib runs with its own defaults. Call it before the first JAX computation (sample.py
and train.py do); it only affects the CPU backend.

It also holds the conventions every command line shares: the exit codes, one-line warnings,
and `quiet_libraries()`, which drops library messages that mislead (each with the reason).
"""
import contextlib
import logging
import os
import sys
import warnings

logger = logging.getLogger(__name__)

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',)
# jaxlib versions (major.minor) whose XLA knows CPU_FLAGS and where they were measured
MEASURED_JAXLIB = ('0.10',)


def _jaxlib_version() -> str:
    try:
        # lazy: optional dependency (jaxlib)
        from jaxlib import version  # noqa: PLC0415  # does not start an XLA backend
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


# ------------------------------------------------------------------------------------------------
# Command-line conventions shared by sample.py, train.py and python -m vd_jax.convert / export /
# eval: one set of exit codes, one-line warnings, and no misleading library chatter.
# ------------------------------------------------------------------------------------------------

EXIT_OK = 0
EXIT_FAILED = 1      # an unexpected failure (a bug): Python's own code, with a traceback
EXIT_USAGE = 2       # a flag, input file or output location that cannot be used (argparse's code)
EXIT_DIVERGED = 3    # train.py: the loss became NaN/inf; the last good checkpoint is kept
EXIT_GATE_FAILED = 4  # a stage-0 gate failed (vd_jax.eval.gates): the numbers are printed
EXIT_PREEMPTED = 75  # train.py: stopped by SIGTERM/SIGINT after saving (EX_TEMPFAIL): run it again

_EXIT_MEANINGS = {
    EXIT_OK: 'success',
    EXIT_USAGE: "usage error: a flag, input file or output location that cannot be used, reported "
                "as one 'error: ...' line before any model loads; nothing is written",
    EXIT_FAILED: 'an unexpected failure (please report it with the traceback)',
    EXIT_DIVERGED: 'training diverged (NaN/inf loss); the last good checkpoint is kept',
    EXIT_GATE_FAILED: 'a stage-0 gate failed (its numbers are printed); the stage runner stops '
                      'before the next stage (--ignore-gates goes on)',
    EXIT_PREEMPTED: 'stopped by SIGTERM or Ctrl-C after saving a checkpoint; run the same command '
                    'again to resume',
}


def configure_logging() -> None:
    """INFO lines ('HH:MM:SS I message') on stderr for the training commands, with the noisy
    libraries at WARNING. `force`: importing orbax logs through absl, which has already given
    the root logger a WARNING-level handler by then, and a plain `basicConfig` would then do
    nothing (measured: `python -m vd_jax.train.stages` printed no progress at all)."""
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname).1s %(message)s',
                        datefmt='%H:%M:%S', force=True)
    for noisy in ('absl', 'jax._src.xla_bridge', 'orbax', 'jax._src.distributed'):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def exit_codes_epilog(*codes: int) -> str:
    """The 'exit codes' paragraph of a command's --help: 0, 2 and 1 plus `codes`."""
    lines = [f'  {c:<3} {_EXIT_MEANINGS[c]}' for c in (EXIT_OK, EXIT_USAGE, *codes, EXIT_FAILED)]
    return 'exit codes (the same for every vd_jax command):\n' + '\n'.join(lines)


def one_line_warning(message, category, filename, lineno, file=None, line=None):
    """`warnings.showwarning` for command lines: 'warning: <message>' on a line of its own
    (through tqdm.write, so it never lands inside a progress bar), no source line."""
    del category, filename, lineno, line
    text = f'warning: {message}'
    out = sys.stderr if file is None else file
    try:
        # lazy: optional dependency (tqdm)
        from tqdm import tqdm  # noqa: PLC0415
        tqdm.write(text, file=out)
    except ImportError:  # pragma: no cover -- tqdm is a dependency
        print(text, file=out)


# Library messages that mislead users of the command lines, dropped by `quiet_libraries()`:
# (logger, message prefix, why it misleads). tensorflow-datasets logs through absl, which
# forwards to the standard 'absl' logger.
MISLEADING_MESSAGES = (
    ('transformers', 'PyTorch was not found',
     "vd_jax uses transformers only for its tokenizers, which need no PyTorch (the default "
     "install has none); \"Models won't be available\" reads like a broken install"),
    ('absl', 'OpenCV is not installed',
     'tensorflow_datasets/core/features/image_feature.py, on the first image record read: the '
     'records are small PNG/JPEG crops that PIL (a vd_jax dependency) decodes in a fraction of '
     'a training step; installing OpenCV is advice nobody needs to follow'),
    ('absl', 'Using custom data configuration',
     'tfds dumps the whole BuilderConfig (every source path and filter) because it is not one of '
     "the builder's predefined configs: every vd_jax dataset is built that way"),
    ('absl', 'Variant folder',
     'tfds warns that a dataset folder has no dataset_info.json while it checks whether the '
     'dataset was built yet: that is how every first build starts, nothing is wrong'),
)
# tfds' "Downloading and preparing dataset ..." / "Dataset ... downloaded and prepared" (printed
# with termcolor, not logged, and nothing is downloaded for a local build) are replaced by the
# builders themselves (`_log_download_bytes` / `_log_download_done` in vd_jax.data).


class _DropMessages(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record):
        return not str(record.msg).startswith(self.prefixes)


def _filter_for(name: str) -> _DropMessages:
    return _DropMessages(p for n, p, _ in MISLEADING_MESSAGES if n == name)


_QUIETED = set()


def quiet_libraries() -> None:
    """Drop the `MISLEADING_MESSAGES` for the rest of the process and print warnings as one
    'warning: ...' line each. Called by the command lines before they import the libraries
    (the transformers message is logged while `import transformers` runs); idempotent."""
    for name in sorted({n for n, _, _ in MISLEADING_MESSAGES}):
        if name not in _QUIETED:
            logging.getLogger(name).addFilter(_filter_for(name))
            _QUIETED.add(name)
    warnings.showwarning = one_line_warning


@contextlib.contextmanager
def quiet_tfds():
    """While tensorflow-datasets builds or opens a dataset: drop its misleading log lines, and
    its progress bars unless stderr is a terminal (elsewhere they are cursor-movement escape
    codes written into a log file). For library callers as well as the command lines."""
    # lazy: tensorflow_datasets, PIL, tqdm, ... (+0.4 s)
    from tensorflow_datasets.core.utils import tqdm_utils  # noqa: PLC0415
    absl_logger, noise = logging.getLogger('absl'), _filter_for('absl')
    before = tqdm_utils._active  # noqa: SLF001 -- tfds has no getter for its switch
    tqdm_utils.display_progress_bar(before and stderr_is_tty())
    absl_logger.addFilter(noise)
    try:
        yield
    finally:
        absl_logger.removeFilter(noise)
        tqdm_utils.display_progress_bar(before)


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


# ------------------------------------------------------------------------------------------------
# bfloat16 on the CPU backend
# ------------------------------------------------------------------------------------------------

# Seconds per guided step, float32 -> bfloat16, the full-size four-flow model at 512 px, batch
# 1, AMD EPYC (2 cores, avx512_bf16): BENCHMARKS.md §9 (benchmarks/results/bench_fullsize.json)
CPU_BFLOAT16_MEASURED = ('full size, 512 px, per step: text 11-15x the float32 time (i2t 0.29 -> '
                         '3.19 s), image 1.2-1.5x (t2i 5.20 -> 7.91 s)')
CPU_BFLOAT16_NOTICE = (
    'bfloat16 compute on a CPU backend is slower than float32, not faster: XLA:CPU converts '
    f'the bfloat16 weights to float32 at every step (measured, {CPU_BFLOAT16_MEASURED}; '
    'BENCHMARKS.md); it only halves the memory of the weights. '
    'Use float32 on CPU unless that memory is the limit.')


class CpuBfloat16Warning(UserWarning):
    """bfloat16 compute was chosen on a CPU backend (`CPU_BFLOAT16_NOTICE`)."""


def warn_cpu_bfloat16(dtype, mesh=None) -> bool:
    """One `CpuBfloat16Warning` when `dtype` is bfloat16 and the devices (the mesh's, else
    JAX's default backend) are CPUs: said before any weights load, not discovered 10x later.
    Returns whether it warned."""
    # lazy: jax (+1.3 s)
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
        return False
    kind = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if kind != 'cpu':
        return False
    warnings.warn(CPU_BFLOAT16_NOTICE, CpuBfloat16Warning, stacklevel=3)
    return True
