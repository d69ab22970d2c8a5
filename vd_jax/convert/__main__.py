"""python -m vd_jax.convert SRC OUT [--config NAME|FILE[:ARG]] [--skip PART ...] ...

Converts a released Versatile Diffusion checkpoint (original v1.0 or legacy `.pth`, a
diffusers folder, or a `.safetensors` file) into a vd_jax checkpoint folder. The FID
InceptionV3 weights (`pt_inception-2015-12-05-6726825d.pth`) are detected and converted too
(part `inception`; `--config` is not used for them).
"""
import argparse
import os
import sys

import numpy as np

import ml_dtypes

from vd_jax.convert import convert_checkpoint, open_source, plan_conversion
from vd_jax.errors import CheckpointError, InputError
from vd_jax.outputs import check_can_create
from vd_jax.platform import EXIT_OK, EXIT_USAGE, exit_codes_epilog, quiet_libraries

# What marks a folder as a vd_jax checkpoint (written by `convert_checkpoint`), the only kind
# of existing folder --overwrite may replace.
_CHECKPOINT_MARKERS = ('manifest.json', 'config.json')


def check_output(out: str, overwrite: bool) -> None:
    """Reject an OUT that cannot become a new checkpoint folder, before any work.

    Rejected: an existing file; an existing folder without --overwrite; with --overwrite, an
    existing folder that is neither empty nor a vd_jax checkpoint (it would be deleted); a
    location whose nearest existing parent is a file or is not writable. Missing parent
    folders are fine (they are created when the checkpoint is written).
    """
    out_abs = os.path.abspath(out)
    if os.path.lexists(out_abs):
        if not os.path.isdir(out_abs):
            raise InputError(f"output '{out}' is an existing file, not a checkpoint folder; "
                             'choose a folder path that does not exist yet')
        if not overwrite:
            raise InputError(f"output '{out}' already exists; choose another path or pass "
                             '--overwrite to replace it')
        entries = os.listdir(out_abs)
        if entries and not any(m in entries for m in _CHECKPOINT_MARKERS):
            raise InputError(f"output '{out}' is a folder that is not a vd_jax checkpoint (no "
                             "manifest.json); --overwrite would delete it, so it is refused")
    check_can_create(out, 'output')


def main(argv=None):
    quiet_libraries()  # also: warnings as one 'warning: ...' line
    p = argparse.ArgumentParser(prog='python -m vd_jax.convert', description=__doc__,
                                epilog=exit_codes_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', help='checkpoint file or diffusers folder')
    p.add_argument('out', help='output checkpoint folder (must not exist unless --overwrite)')
    p.add_argument('--config', default='vd_four_flow',
                   help="model config: name in configs/ ('vd_four_flow', 'vd_dc', 'vd_basic', "
                        "'tiny'), optionally ':arg', or a .py path (default: vd_four_flow)")
    p.add_argument('--parts', nargs='+', default=None,
                   help='convert only these parts (diffuser, vae_image, vae_text, ctx_image, ctx_text, '
                        'inception)')
    p.add_argument('--skip', nargs='+', default=[], metavar='PART',
                   help='parts present in the source to leave out on purpose')
    p.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    p.add_argument('--overwrite', action='store_true',
                   help='replace an existing OUT (only a previous vd_jax checkpoint folder)')
    p.add_argument('--dry-run', action='store_true',
                   help='check the whole mapping (keys, shapes) and print it; write nothing')
    args = p.parse_args(argv)

    # Usage errors first, before importing jax/torch or reading the (possibly 10 GB) source.
    try:
        if not os.path.exists(args.src):
            raise InputError(f"source '{args.src}' does not exist")
        if not args.dry_run:
            check_output(args.out, args.overwrite)
    except InputError as e:
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE

    try:
        if args.dtype == 'bfloat16':
            dtype = np.dtype(ml_dtypes.bfloat16)
        else:
            dtype = args.dtype
        if args.dry_run:
            source = open_source(args.src)
            layout, plans, _, record = plan_conversion(source, args.config, args.parts, args.skip)
            print(f'layout: {layout.name}')
            for plan in plans.values():
                print(plan.summary())
                for e in plan.entries:
                    print(f'  {e.source_key} -> {e.path}  [{e.transform.name}]')
            for k, r in record['ignored']:
                print(f'  ignored {k}: {r}')
            for part, n in record['skipped'].items():
                print(f'  skipped part {part} ({n} keys)')
            return EXIT_OK
        out = convert_checkpoint(args.src, args.config, args.out, parts=args.parts,
                                 skip_parts=args.skip, dtype=dtype, overwrite=args.overwrite,
                                 progress=True)
        print(f'wrote {out}')
        return EXIT_OK
    except (CheckpointError, OSError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE


if __name__ == '__main__':
    sys.exit(main())
