"""Print the tables of saved benchmark records again (what BENCHMARKS.md shows).

  python benchmarks/report.py                        # every record in benchmarks/results/
  python benchmarks/report.py path/to/bench_unet.json
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MODULES = {'unet_image_stream': 'bench_unet', 'unet_text_stream': 'bench_text_unet',
           'convert_checkpoint': 'bench_convert', 'levers': 'bench_levers',
           'train_step': 'bench_train', 'attention': 'bench_attention'}


def main(argv=None):
    paths = (argv if argv is not None else sys.argv[1:]) or \
        sorted(glob.glob(os.path.join(common.RESULTS, '*.json')))
    for p in paths:
        with open(p) as f:
            rec = json.load(f)
        m = rec['machine']
        print(f"\n# {os.path.basename(p)}: {m['cpu']}, {m['cores']} cores, {m['date']}, "
              f"load {m['loadavg_at_start'][0]:.2f} -> {m.get('loadavg_at_end', [float('nan')])[0]:.2f}, "
              f"git {m.get('git')}")
        mod = importlib.import_module(MODULES[rec['benchmark']])
        mod.print_tables(rec)


if __name__ == '__main__':
    main()
