"""Training curves as a PNG from `metrics.jsonl` files, with Pillow only (no plotting library
is a dependency): one panel per metric, one line per run, steps on x.

    python -m vd_jax.eval.curves OUT.png RUN_DIR[:LABEL] ... [--metrics loss,val/t2i/colour]

Steps of later runs continue those of earlier ones when `--chain` is given (the progressive
VD stages: basic, then dc, then four_flow, each counted from 0 in its own folder).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]
Series = List[Tuple[float, float]]



def _to_panel(x, y, *, box, ranges):
    """Data (x, y) -> pixel position in a panel box (left, right, upper, lower)."""
    left, right, upper, lower = box
    xmin, xmax, ymin, ymax = ranges
    return (left + (x - xmin) / (xmax - xmin) * (right - left),
            lower - (y - ymin) / (ymax - ymin) * (lower - upper))

def read_metrics(run_dir: str) -> List[dict]:
    """The rows of `run_dir/metrics.jsonl` (one dict per logged step)."""
    path = os.path.join(run_dir, 'metrics.jsonl')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{path}' does not exist (not a training workdir?)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(panels: Dict[str, Dict[str, Series]], out: str, title: str = '',
         panel_size: Tuple[int, int] = (360, 220)) -> str:
    """panels: metric -> {run label -> [(step, value)]}; writes a grid of line charts."""
    # lazy: PIL (+23 ms)
    from PIL import Image, ImageDraw  # noqa: PLC0415
    cols = min(3, max(1, len(panels)))
    rows = (len(panels) + cols - 1) // cols
    pw, ph = panel_size
    top = 24 if title else 0
    img = Image.new('RGB', (cols * pw, rows * ph + top), 'white')
    d = ImageDraw.Draw(img)
    if title:
        d.text((8, 6), title, fill='black')
    labels = sorted({lab for p in panels.values() for lab in p})
    colour = {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(labels)}
    for k, (name, runs) in enumerate(panels.items()):
        x0, y0 = (k % cols) * pw, top + (k // cols) * ph
        left, right, upper, lower = x0 + 52, x0 + pw - 10, y0 + 20, y0 + ph - 34
        pts = [p for s in runs.values() for p in s]
        d.text((x0 + 52, y0 + 4), name, fill='black')
        d.rectangle([left, upper, right, lower], outline=(160, 160, 160))
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        ymin, ymax = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
        at = functools.partial(_to_panel, box=(left, right, upper, lower),
                               ranges=(xmin, xmax, ymin, ymax))
        for y, anchor in ((ymax, upper), (ymin, lower - 10)):
            d.text((x0 + 2, anchor), f'{y:.3g}', fill=(90, 90, 90))
        d.text((left, lower + 4), f'{xmin:.0f}', fill=(90, 90, 90))
        d.text((right - 40, lower + 4), f'{xmax:.0f}', fill=(90, 90, 90))
        for lab, s in runs.items():
            line = [at(x, y) for x, y in s]
            if len(line) > 1:
                d.line(line, fill=colour[lab], width=2)
            for p in line if len(line) < 30 else ():
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour[lab])
    # legend along the bottom of the first panel row
    x = 8
    for lab in labels:
        d.rectangle([x, top + ph - 14, x + 10, top + ph - 4], fill=colour[lab])
        d.text((x + 14, top + ph - 16), lab, fill='black')
        x += 20 + 7 * len(lab)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    img.save(out)
    return out


def collect(runs: Sequence[Tuple[str, str]], metrics: Sequence[str], chain: bool = False,
            smooth: int = 1, per_run: bool = False) -> Dict[str, Dict[str, Series]]:
    """panels for `plot` from (run_dir, label) pairs; `smooth`: running mean over that many
    logged points (losses are noisy per step); `per_run`: one panel per (run, metric) (runs
    whose metrics share a name but not a scale)."""
    panels: Dict[str, Dict[str, Series]] = {}
    offset = 0
    for run_dir, label in runs:
        rows = read_metrics(run_dir)
        for m in metrics:
            s = [(r['step'] + offset, float(r[m])) for r in rows if m in r]
            if smooth > 1 and not m.startswith('val/'):
                s = [(x, sum(v for _, v in s[max(0, i - smooth + 1):i + 1])
                      / len(s[max(0, i - smooth + 1):i + 1])) for i, (x, _) in enumerate(s)]
            if s:
                panels.setdefault(f'{label}: {m}' if per_run else m, {})[label] = s
        if chain and rows:
            offset += max(r['step'] for r in rows)
    return panels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('out')
    p.add_argument('runs', nargs='+', help='training workdirs, optionally DIR:LABEL')
    p.add_argument('--metrics', default='loss')
    p.add_argument('--chain', action='store_true', help='continue the steps run after run')
    p.add_argument('--smooth', type=int, default=1)
    p.add_argument('--per-run', action='store_true', help='one panel per run and metric')
    p.add_argument('--title', default='')
    a = p.parse_args(argv)
    runs = [(r.split(':')[0], r.split(':')[1] if ':' in r else os.path.basename(r.rstrip('/')))
            for r in a.runs]
    try:
        panels = collect(runs, a.metrics.split(','), a.chain, a.smooth, a.per_run)
    except FileNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if not panels:
        print(f'error: none of the runs logged {a.metrics}', file=sys.stderr)
        return 2
    print(plot(panels, a.out, a.title))
    return 0


if __name__ == '__main__':
    sys.exit(main())
