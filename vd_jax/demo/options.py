"""Command-line options of the demo, shared by the launcher and the app script."""
from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Optional, Sequence

from vd_jax.cli.model_flags import add_model_flags
from vd_jax.demo.inputs import Limits
from vd_jax.errors import CheckpointError, ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m vd_jax.demo',
        description='Versatile Diffusion web demo: one tab per task, served on this machine. '
                    'It never opens a public share link or tunnel: it listens on --host only '
                    '(127.0.0.1 by default) and sends no usage statistics.')
    # --ckpt, --config (random weights), --seed-model, --dtype
    add_model_flags(p, ('ckpt', 'config'), random_seed=True)
    p.add_argument('--lora', action='append', default=[], metavar='PATH[:SCALE]',
                   help='a LoRA adapter to load (repeatable); the sidebar has a scale slider each')
    p.add_argument('--host', default='127.0.0.1',
                   help='address to listen on (default 127.0.0.1: this machine only)')
    p.add_argument('--port', type=int, default=7860)
    p.add_argument('--max-upload-mb', type=float, default=Limits.max_bytes / 2 ** 20,
                   help='largest accepted upload, MB (default 10)')
    p.add_argument('--max-pixels', type=int, default=Limits.max_pixels,
                   help='largest accepted image, width x height (default 4096 x 4096)')
    p.add_argument('--share-none', action='store_true', default=True,
                   help='always on: the demo has no public share link (accepted for scripts)')
    return p


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        p.error(f'--port must be in 1..65535, got {args.port}')
    if args.max_upload_mb <= 0 or args.max_pixels <= 0:
        p.error('--max-upload-mb and --max-pixels must be positive')
    # lazy: vd_jax.lora.stack pulls in jax (+1.2 s)
    from vd_jax.lora.stack import parse_lora_flag  # noqa: PLC0415
    try:
        args.lora = [parse_lora_flag(x) for x in args.lora]
    except (ConfigError, CheckpointError) as e:
        p.error(f'--lora: {e}')
    return args


_CURRENT: Optional[argparse.Namespace] = None


def set_current(args: Optional[argparse.Namespace]) -> None:
    """The launcher's options, for the app script (which Streamlit runs in the same process)."""
    global _CURRENT
    _CURRENT = args


def current() -> argparse.Namespace:
    """The launcher's options, else the script's own command line
    (`streamlit run vd_jax/demo/app.py -- --ckpt DIR`)."""
    return _CURRENT if _CURRENT is not None else parse(sys.argv[1:])


def limits(args: argparse.Namespace) -> Limits:
    """The upload limits the options set."""
    return Limits(max_bytes=int(args.max_upload_mb * 2 ** 20), max_pixels=int(args.max_pixels))


def is_loopback(host: str) -> bool:
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
