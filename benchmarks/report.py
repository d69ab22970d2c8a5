"""Print the tables of saved benchmark records again (what BENCHMARKS.md shows).

  python benchmarks/report.py                        # every record in benchmarks/results/
  python benchmarks/report.py path/to/bench_unet.json
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MODULES = {'unet_image_stream': 'bench_unet', 'unet_text_stream': 'bench_text_unet',
           'convert_checkpoint': 'bench_convert', 'levers': 'bench_levers',
           'train_step': 'bench_train', 'attention': 'bench_attention',
           'vd_mini_step': 'bench_vd_mini_step', 'attention_share': 'attention_share',
           'linear_shapes': 'bench_linear', 'step_spells': 'step_spells'}


def host_of(rec: dict) -> str:
    """The host kind a record was measured on (`common.host_kind`; records written before it
    was recorded: their CPU model name). Numbers are compared only within one kind."""
    m = rec['machine']
    return m.get('host_kind') or f"{m['cpu']} (kind not recorded)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('records', nargs='*', metavar='RECORD.json',
                    help='records to print (default: every record in benchmarks/results/)')
    paths = ap.parse_args(argv).records or sorted(glob.glob(os.path.join(common.RESULTS,
                                                                           '*.json')))
    records = []
    for p in paths:   # every path checked before anything is printed
        try:
            with open(p) as f:
                rec = json.load(f)
        except (OSError, ValueError) as e:
            ap.error(f'cannot read benchmark record {p}: {e}')
        if not isinstance(rec, dict) or 'machine' not in rec:
            ap.error(f'{p} is not a benchmark record (no "machine" section)')
        records.append((p, rec))
    # grouped by host kind: a Zen 5 and a Zen 4 run of one benchmark are two results
    for host in sorted({host_of(r) for _, r in records}):
        print(f'\n## host: {host}')
        for p, rec in records:
            if host_of(rec) != host:
                continue
            m = rec['machine']
            print(f"\n# {os.path.basename(p)}: {m['cpu']}, {m['cores']} cores, {m['date']}, "
                  f"load {m['loadavg_at_start'][0]:.2f} -> "
                  f"{m.get('loadavg_at_end', [float('nan')])[0]:.2f}, git {m.get('git')}")
            script = MODULES.get(rec.get('benchmark'))
            if script is None:  # scripts that print their tables only when run
                name = os.path.basename(p).split('-')[0].split('.')[0]
                print(f'  (no saved-record table: run benchmarks/{name}.py)')
                continue
            importlib.import_module(script).print_tables(rec)


if __name__ == '__main__':
    main()
