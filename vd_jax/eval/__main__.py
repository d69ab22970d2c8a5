"""Evaluation command line: `python -m vd_jax.eval <command> ...`.

  shapes   every flow of a model trained on the shapes world, on held-out prompts and images
           (attribute accuracy read back from pixels / parsed from captions; JSON + PNG grids)
  fid      FID of generated images against a reference folder or statistics file
  clip     CLIP score (prompt-image) or CLIP image similarity (image variation)

Each run writes a new `--out/<command>-NNN/` folder with `metrics.json` (every setting, the
model, the code version) and the grids. Usage errors exit with code 2 before any model loads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _model_args(p):
    p.add_argument('--ckpt', help='vd_jax checkpoint folder (default: the shipped vd-mini model)')
    p.add_argument('--steps', type=int, default=50)
    p.add_argument('--scale', type=float, default=7.5, help='guidance scale')
    p.add_argument('--sampler', default='ddim', choices=['ddim', 'ddpm', 'dpm++'])
    p.add_argument('--seed', type=int, default=0, help='sample i uses seed + i')
    p.add_argument('--batch-size', type=int, default=100)
    p.add_argument('--out', default='evals', help='output root; each run gets a new folder')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])


def build_parser() -> argparse.ArgumentParser:
    from vd_jax.platform import exit_codes_epilog
    p = argparse.ArgumentParser(prog='python -m vd_jax.eval', description=__doc__,
                                epilog=exit_codes_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    s = sub.add_parser('shapes', help='the shapes-world evaluation of every flow')
    _model_args(s)
    s.add_argument('--n', type=int, default=200, help='held-out samples per flow')
    s.add_argument('--flows', default=','.join(('t2i', 'i2t', 'i2i', 't2t', 'dual', 'guidance')),
                   help='comma-separated subset of t2i,i2t,i2i,t2t,dual,guidance')
    s.add_argument('--decode', default='greedy', choices=['greedy', 'sample', 'beam'])
    return p


def _load(args):
    from vd_jax.pipeline import VersatileDiffusion
    if args.ckpt:
        return VersatileDiffusion.from_checkpoint(args.ckpt, dtype=args.dtype)
    return VersatileDiffusion.default(dtype=args.dtype)


def _check(args, parser):
    from vd_jax.sample_cli import UsageError, _check_out
    for flag in ('steps', 'batch_size') + (('n',) if args.command == 'shapes' else ()):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.scale < 0 or args.seed < 0:
        raise UsageError('--scale and --seed must be >= 0')
    if args.ckpt and not os.path.isfile(os.path.join(args.ckpt, 'config.json')):
        raise UsageError(f"--ckpt '{args.ckpt}' is not a vd_jax checkpoint folder (no config.json)")
    if args.command == 'shapes':
        from vd_jax.eval.shapes_eval import FLOWS
        bad = [f for f in args.flows.split(',') if f not in FLOWS]
        if bad:
            raise UsageError(f'--flows: unknown {bad}; choose from {list(FLOWS)}')
        if args.ckpt:  # the reader measures shapes-world images, whose size is fixed
            from vd_jax.checkpoint import CheckpointError, read_config
            from vd_jax.data.shapes import IMAGE_SIZE
            try:
                size = int(read_config(args.ckpt).get('image_size', 0))
            except CheckpointError as e:
                raise UsageError(str(e)) from None
            if size != IMAGE_SIZE:
                raise UsageError(f"--ckpt '{args.ckpt}' generates {size}x{size} images; the shapes "
                                 f'evaluation reads the shapes world at {IMAGE_SIZE}x{IMAGE_SIZE} '
                                 '(train the model on data.kind=shapes)')
    _check_out(args.out)


def main(argv=None) -> int:
    from vd_jax.platform import EXIT_OK, EXIT_USAGE, quiet_libraries
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    from vd_jax.sample_cli import UsageError
    try:
        _check(args, parser)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE
    from vd_jax.platform import configure_xla
    configure_xla()
    from vd_jax.outputs import code_version, new_run_dir
    from vd_jax.checkpoint import CheckpointError
    t0 = time.time()
    try:
        vd = _load(args)
    except CheckpointError as e:  # e.g. the shipped model is not installed
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE
    out = new_run_dir(args.out, args.command)
    if args.command == 'shapes':
        from vd_jax.eval.shapes_eval import EvalSettings, evaluate
        settings = EvalSettings(n=args.n, steps=args.steps, scale=args.scale, sampler=args.sampler,
                                seed=args.seed, batch_size=args.batch_size, decode=args.decode,
                                flows=tuple(args.flows.split(',')))
        record = evaluate(vd, settings, out, log=lambda m: print(m, file=sys.stderr))
    record.update(command=args.command, code_version=code_version(),
                  seconds=round(time.time() - t0, 1))
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
        json.dump(record, f, indent=1)
    print(f'wrote {out}/metrics.json')
    return EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
