"""python -m vd_jax.export CKPT OUT [--layout v1.0|legacy|diffusers] [--dtype ...] [--overwrite]

Writes a vd_jax checkpoint folder as PyTorch weights: one `.pth`/`.safetensors` file in the
original VD key names (v1.0 or legacy), or a diffusers VersatileDiffusion folder.
"""
import argparse
import sys

from vd_jax.errors import CheckpointError, InputError
from vd_jax.export import export_checkpoint
from vd_jax.platform import EXIT_OK, EXIT_USAGE, exit_codes_epilog, quiet_libraries


def main(argv=None):
    quiet_libraries()
    p = argparse.ArgumentParser(prog='python -m vd_jax.export', description=__doc__,
                                epilog=exit_codes_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('ckpt', help='vd_jax checkpoint folder (config.json + <part>.safetensors)')
    p.add_argument('out', help='output: a .pth/.pt/.ckpt/.bin or .safetensors file (v1.0, legacy) '
                               'or a folder (diffusers); must not exist unless --overwrite')
    # validated by export_checkpoint (not argparse `choices`) so a bad value is one error line
    p.add_argument('--layout', default='v1.0', help='v1.0 (default), legacy or diffusers')
    p.add_argument('--dtype', default='float32', help='float32 (default), float16 or bfloat16')
    p.add_argument('--overwrite', action='store_true', help='replace an existing OUT')
    args = p.parse_args(argv)

    try:
        out = export_checkpoint(args.ckpt, args.out, args.layout, args.dtype, args.overwrite,
                                progress=True)
    except (CheckpointError, InputError, FileExistsError) as e:
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE
    print(f'wrote {out}')
    return EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
