"""Run every benchmark one after another (never two heavy measurements at once), each after
the machine's 1-minute load average has dropped below `--max-load`; records go to
benchmarks/results/. Pass-through `--smoke` runs them all on the tiny configs.

  python benchmarks/run_all.py                     # the full set behind BENCHMARKS.md (~1 h)
  python benchmarks/run_all.py --only bench_unet bench_convert
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ORDER = (('bench_unet', ['--tag', 'shipped']),
         ('bench_unet', ['--xla-default', '--attention', 'dense', '--tag', 'jaxlib-defaults']),
         ('bench_text_unet', ['--tag', 'shipped']), ('bench_attention', []), ('bench_convert', []),
         ('bench_levers', ['--profile']), ('bench_train', []))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--only', nargs='+', help='subset of ' + ', '.join(n for n, _ in ORDER))
    ap.add_argument('--max-load', type=float, default=1.3, help='wait until load1 is below this')
    ap.add_argument('--wait-timeout', type=float, default=3600)
    ap.add_argument('--smoke', action='store_true')
    ap.add_argument('--out', default=common.RESULTS)
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    for name, extra in ORDER:
        if args.only and name not in args.only:
            continue
        if not args.smoke:
            common.wait_for_quiet(args.max_load, args.wait_timeout)
        cmd = [sys.executable, os.path.join(here, f'{name}.py'), '--out', args.out] + extra + \
            (['--smoke'] if args.smoke else [])
        print(f"== {' '.join(cmd)}  (load {os.getloadavg()[0]:.2f})", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd)
        print(f'== {name}: exit {rc}, {time.time() - t0:.0f}s', flush=True)
        if rc:
            return rc
    return 0


if __name__ == '__main__':
    sys.exit(main())
