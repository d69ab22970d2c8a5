"""The sampling flags the command lines share (`sample.py`, `python -m vd_jax.eval`): the
guidance scale, the sampler, its step grid, the Karras grid and guidance rescale, with their
checks (run before any model loads: the scale's default, the model's recommendation, is read
from its config; the messages are the Python API's own, `vd_jax.tasks.SamplingOptions` and
`vd_jax.diffusion.sampling.check_steps`).

What the model predicts (eps, v, x0) and its noise schedule are not flags: they are read from
the checkpoint's config (`model.schedule`).
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional, Tuple

from vd_jax.errors import InputError


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """--scale, --sampler, --spacing, --karras, --guidance-rescale."""
    # lazy: vd_jax.diffusion.sampling pulls in jax, flax (+1.3 s)
    from vd_jax.diffusion.sampling import SAMPLERS, SPACINGS  # noqa: PLC0415
    p.add_argument('--scale', type=float, default=None,
                   help="classifier-free guidance scale (>= 0; 1 = off); default: the model's "
                        "recommendation (its config's sampling.scale: 3 for VD-mini v3), else "
                        "7.5 (VD's)")
    p.add_argument('--sampler', default='ddim', choices=list(SAMPLERS),
                   help='ddim (the original), ddpm, dpm++ (DPM-Solver++ 2M), euler, euler_a '
                        '(Euler ancestral); default ddim')
    p.add_argument('--spacing', default='auto', choices=list(SPACINGS),
                   help="timestep grid (default auto: the original DDIM grid where it is "
                        "defined, else 'leading' with a note; dpm++: linspace; 'trailing' for a "
                        'model trained with zero terminal SNR and v-prediction). '
                        "'trailing' starts at t = T-1")
    p.add_argument('--karras', action='store_true',
                   help='the Karras et al. sigma grid (dpm++ only)')
    p.add_argument('--guidance-rescale', type=float, default=0.0, metavar='PHI',
                   help='guidance rescale phi in [0, 1] (Lin et al. 2023; 0 = off, the '
                        'default; ~0.7 with zero-terminal-SNR models at high --scale)')


def check_sampler_flags(args, error: Callable[[str], Exception],
                        spacing: Optional[str] = None,
                        schedule=None) -> Tuple[str, Optional[str]]:
    """Check the flags of `add_sampler_flags` with `args.steps` (`spacing` overrides
    args.spacing); raises error(message) naming the flag. Returns `check_steps`'s
    (resolved spacing, notice or None); `schedule` (the loaded model's) resolves 'auto' as
    sampling will (before a model loads, the answer is the one for VD's schedule)."""
    from vd_jax.diffusion.sampling import check_steps  # noqa: PLC0415
    # lazy: vd_jax.tasks.common pulls in jax, flax (+1.3 s)
    from vd_jax.tasks.common import SamplingOptions  # noqa: PLC0415
    for flag, check in (
            ('guidance-rescale', lambda: SamplingOptions(guidance_rescale=args.guidance_rescale)),
            ('karras', lambda: SamplingOptions(sampler=args.sampler, karras=args.karras))):
        try:
            check()
        except InputError as e:
            raise error(f'--{flag}: {e}') from None
    try:
        return check_steps(args.sampler, args.steps, spacing or args.spacing or 'auto',
                           schedule=schedule)
    except ValueError as e:
        raise error(f'--sampler {args.sampler} --steps {args.steps}: {e}') from None


def model_grid_notice(args, schedule, before_load: bool) -> Tuple[str, Optional[str]]:
    """(the spacing sampling uses, the note to print now or None). Before the model loads
    (`before_load`), a note is only given when it cannot depend on the model's schedule
    ('auto' with ddim/ddpm/euler/euler_a resolves to 'trailing' for a zero-terminal-SNR v
    model); after loading, with its `schedule`, the note that before-load withheld."""
    # lazy: vd_jax.diffusion pulls in jax, flax (+1.3 s)
    from vd_jax.diffusion.plan import auto_depends_on_schedule  # noqa: PLC0415
    spacing, notice = check_sampler_flags(args, InputError, schedule=schedule)
    depends = auto_depends_on_schedule(args.sampler, args.spacing)
    return spacing, (notice if depends != before_load else None)


def resolve_scale(args, config) -> Optional[str]:
    """Fill `args.scale` when the command line did not give it: the guidance scale the
    model's `config` recommends (`SamplingOptions.model_defaults`), else VD's 7.5. Returns a
    note to print when the model's recommendation was taken, else None. Raises InputError
    for a --scale < 0 and CheckpointError for a config that recommends what it cannot."""
    # lazy: vd_jax.tasks.common pulls in jax, flax (+1.3 s)
    from vd_jax.tasks.common import SamplingOptions  # noqa: PLC0415
    if args.scale is not None:
        try:
            SamplingOptions(scale=args.scale)
        except InputError as e:
            raise InputError(f'--scale: {e}') from None
        return None
    recommended = SamplingOptions.model_defaults(config).get('scale')
    args.scale = float(SamplingOptions.scale if recommended is None else recommended)
    return None if recommended is None else (
        f"guidance scale {args.scale:g}: the model's recommendation (its config's "
        'sampling.scale; give --scale to choose another)')
