"""Usage errors and the checks every command line makes before any model loads.

A usage error is a `vd_jax.errors.InputError`: a flag, input file or output folder that cannot
be used; the command line prints `error: <message>` on stderr and exits with
`vd_jax.platform.EXIT_USAGE` (2, as argparse's own errors), having written nothing.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from vd_jax.errors import InputError
from vd_jax.platform import EXIT_USAGE


def report(error) -> int:
    """Print `error: <error>` (an exception or a message) on stderr; returns the usage exit
    code (2)."""
    print(f'error: {error}', file=sys.stderr)
    return EXIT_USAGE


def read_list(path: str, flag: str) -> List[str]:
    """The non-blank lines (stripped) of a UTF-8 text file given by `flag`; a missing,
    unreadable or empty file is an InputError naming the flag and the file."""
    if not os.path.isfile(path):
        raise InputError(f"{flag} '{path}' " + ('is a folder, not a text file' if os.path.isdir(path)
                                                 else 'does not exist'))
    try:
        with open(path, encoding='utf-8') as f:
            items = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise InputError(f"{flag} '{path}' is not a UTF-8 text file (one entry per line)") from None
    except OSError as e:
        raise InputError(f"{flag} '{path}' cannot be read: {e.strerror}") from None
    if not items:
        raise InputError(f"{flag} '{path}' is empty (give one entry per line)")
    return items


def check_out(root: str, flag: str = '--out') -> None:
    """The output root must be (or become) a writable folder; checked before sampling so
    results are never lost at the end."""
    # lazy: vd_jax.outputs pulls in numpy (+0.1 s)
    from vd_jax.outputs import check_output_folder  # noqa: PLC0415
    check_output_folder(root, flag)


def check_at_least_one(args, flags) -> None:
    """Each of `flags` (argparse dests) that is given (not None) must be >= 1."""
    for flag in flags:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1")


def compile_cache(enabled: bool = True) -> Optional[str]:
    """Turn on JAX's persistent compilation cache in `$XDG_CACHE_HOME/vd_jax/xla` (default
    ~/.cache/vd_jax/xla), caching every program however fast it compiled; returns the folder,
    or None when `enabled` is false (`--no-compile-cache`). benchmarks/bench_compile_cache.py
    measures what it saves."""
    if not enabled:
        return None
    # lazy: jax (+1.3 s)
    import jax  # noqa: PLC0415
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    path = os.path.join(root, 'vd_jax', 'xla')
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    return path
