"""Ablation of VD-mini's diffusion objective at an equal budget (issue 19): each row trains one
stage of the recipe with its own objective overrides, then evaluates text -> image and prompt
control on the held-out shapes world with its own sampling settings.

    PYTHONPATH=$PWD nice -n 5 python benchmarks/diffusion_ablation.py --out runs/ablation \\
        [--stage-config configs/train_vd_mini.py:dc] [--rows v2,v_zero_snr] [--eval-n 200] \\
        [--prompt-control-n 16] [--steps 25] [--scale 7.5] \\
        -- data.path=runs/data encoders.ckpt=A,C,O init.sources.previous.path=B total_steps=2000

A row is, one after another and each in its own process (so progress lines with ETA show):
  1. `python train.py --config STAGE --workdir <out>/runs/<row> <shared> <row's overrides>`
     (the overrides after `--` are shared by every row; a row's own come last and win);
  2. `python train.py --export ...` with the same overrides, only if the run left no
     `export/step_N` of its last checkpoint (the run exports at its end by default);
  3. `python -m vd_jax.eval shapes --ckpt <export> --flows t2i --n EVAL_N
     --prompt-control PROMPT_CONTROL_N` with the row's sampling settings (e.g. `--spacing
     trailing` for a zero-terminal-SNR model), into `<out>/runs/<row>/eval/shapes-NNN/`.

`<out>/ablation.json` (per row: its own overrides and all train.py got, sampling settings, wall
time of training, export and evaluation, the host's CPU model and load, the numbers) and
`<out>/ablation.md` (the table for docs/vd-mini.md) are rewritten after every step. Resumable:
re-running the same command skips rows already evaluated, skips training that finished, and
resumes a stopped training from its workdir's checkpoint (train.py resumes exactly). Ctrl-C /
SIGTERM: train.py saves a checkpoint and stops (exit 75), and so does this script. A row
recorded with other overrides or settings than the command's is refused (use another --out, or
delete its entry from ablation.json).

`--smoke`: every row on `configs/train_tiny.py:test` (64 px shapes, random encoders, a few
steps) with a tiny evaluation: proves the script works (tests/test_diffusion_ablation.py); the
numbers mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

REPO = common.REPO
EXIT_PREEMPTED = 75  # vd_jax.platform.EXIT_PREEMPTED (not imported: this process loads no JAX)

# Every row states its whole objective: the recipe's own default (configs/train_vd_mini.py)
# became v3's (v + zero terminal SNR) after this ablation, and a row must train the same thing
# whatever the recipe says today.
EPS_VD = ('model.schedule.prediction_type=epsilon',
          'model.schedule.rescale_zero_terminal_snr=False')
V_ZERO_SNR = ('model.schedule.prediction_type=v_prediction',
              'model.schedule.rescale_zero_terminal_snr=True')
TRAILING = {'spacing': 'trailing'}


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the ablation: training overrides, sampling settings (flags of `python -m
    vd_jax.eval shapes`: steps, scale, sampler, spacing, guidance_rescale; unset ones take the
    command's), and `train_as`: another row whose training this row reuses (sampling-only)."""
    name: str
    overrides: Tuple[str, ...] = ()
    sampling: Dict[str, object] = dataclasses.field(default_factory=dict)
    train_as: Optional[str] = None
    note: str = ''


ROWS = {r.name: r for r in (
    Row('v2', EPS_VD, note="v2's recipe: eps prediction on VD's schedule"),
    Row('v_zero_snr', V_ZERO_SNR, TRAILING,
        note='v-prediction + zero terminal SNR (Lin et al. 2023), trailing spacing'),
    Row('v_zero_snr_min_snr', V_ZERO_SNR + ('loss.snr_gamma=5.0',), TRAILING,
        note='+ min-SNR-5 loss weighting'),
    Row('offset_noise', EPS_VD + ('noise.offset=0.05',),
        note='eps + offset noise 0.05 instead'),
    # not run by default (--rows ...):
    Row('v_prediction', ('model.schedule.prediction_type=v_prediction',
                         'model.schedule.rescale_zero_terminal_snr=False'),
        note="v-prediction on VD's schedule (no zero terminal SNR)"),
    Row('min_snr', EPS_VD + ('loss.snr_gamma=5.0',), note='eps + min-SNR-5'),
    Row('v_zero_snr_rescale', V_ZERO_SNR, dict(TRAILING, guidance_rescale=0.7),
        train_as='v_zero_snr', note='v_zero_snr sampled with guidance rescale 0.7'),
)}
DEFAULT_ROWS = ('v2', 'v_zero_snr', 'v_zero_snr_min_snr', 'offset_noise')
SAMPLING_KEYS = ('steps', 'scale', 'sampler', 'spacing', 'guidance_rescale')

STAGE_CONFIG = 'configs/train_vd_mini.py:dc'
SMOKE_CONFIG = 'configs/train_tiny.py:test'


def smoke_overrides(out: str) -> List[str]:
    """The tiny one-level diffuser on 64 px shapes (the size the reader reads), random
    encoders, t2i only, 3 steps."""
    return [f'data.path={os.path.join(out, "data")}', 'data.kind=shapes', 'data.num_records=64',
            'data.image_size=64', 'model.image_size=64', 'encoders.ckpt=random', "flows=['t2i']",
            'total_steps=3', 'optimizer.warmup_steps=1', 'log_every=1', 'checkpoint.every=1000',
            'validation.every=0', 'tensorboard=False']


# ------------------------------------------------------------------------------------------
# The record
# ------------------------------------------------------------------------------------------

def load_record(path: str) -> dict:
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {'rows': {}, 'trainings': {}}


def save(out: str, record: dict) -> None:
    """ablation.json and ablation.md, each written whole then renamed (a kill never leaves
    half a file)."""
    for name, text in (('ablation.json', json.dumps(record, indent=1)),
                       ('ablation.md', markdown(record))):
        path = os.path.join(out, name)
        with open(path + '.tmp', 'w') as f:
            f.write(text + '\n')
        os.replace(path + '.tmp', path)


def _f(x, digits=3):
    return '–' if x is None else f'{x:.{digits}f}'


def _minutes(s):
    return '–' if s is None else f'{s / 60:.1f} min'


def markdown(record: dict) -> str:
    """The table of the evaluated rows (docs/vd-mini.md) with what they share."""
    head = ['row', 'training overrides', 'sampling', 'background follows (chance 0.33)',
            'background varies', 'position follows (chance 0.11)', 'position varies',
            't2i shape', 'colour', 'background', 'size', 'position', 'all five',
            'training', 'evaluation']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name, r in record['rows'].items():
        ev = r.get('eval') or {}
        pc = ev.get('prompt_control') or {}
        fol, var = pc.get('follows', {}), pc.get('varies', {})
        acc = ev.get('t2i') or {}
        s = r['sampling']
        sampling = f"{s['sampler']} {s['steps']} steps, scale {s['scale']}, {s['spacing']}" + (
            f", rescale {s['guidance_rescale']}" if s['guidance_rescale'] else '')
        cells = [name, ' '.join(f'`{o}`' for o in r['overrides']) or "(v2's recipe)", sampling,
                 _f(fol.get('background')), _f(var.get('background'), 2),
                 _f(fol.get('position')), _f(var.get('position'), 2)]
        cells += [_f(acc.get(k)) for k in ('shape', 'colour', 'background', 'size', 'position',
                                            'all')]
        cells += [_minutes(r.get('train_seconds')) + (f" ({r['train_as']}'s)" if r.get('train_as')
                                                        else ''), _minutes(r.get('eval_seconds'))]
        lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
    a = record.get('settings', {})
    cpus = sorted({r.get('cpu') for r in record['rows'].values() if r.get('cpu')})
    lines += ['', f"Stage `{a.get('stage_config')}`, shared overrides: "
              + (' '.join(f'`{o}`' for o in a.get('shared_overrides', [])) or 'none')
              + f"; held-out t2i n = {a.get('eval_n')}, prompt control n = "
              f"{a.get('prompt_control_n')} bases; host {', '.join(cpus) or '?'}"
              + ('; SMOKE RUN: the numbers mean nothing' if a.get('smoke') else '') + '.']
    return '\n'.join(lines)


def check_same(what: str, recorded, now) -> None:
    if recorded != now:
        sys.exit(f'error: {what} was recorded with {recorded}, the command gives {now}: use '
                 'another --out, or delete its entry from ablation.json to redo it')


# ------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------

def run(cmd: Sequence[str]) -> int:
    """Run a child process with this terminal (progress lines show); on Ctrl-C wait for it to
    save and stop."""
    print('$ ' + shlex.join(cmd), flush=True)
    p = subprocess.Popen(list(cmd), env=dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [x for x in [os.environ.get('PYTHONPATH')] if x])))
    try:
        return p.wait()
    except KeyboardInterrupt:  # the child got the same SIGINT: let it save its checkpoint
        return p.wait()


def stop(code: int, what: str) -> None:
    if code == EXIT_PREEMPTED or code < 0:
        sys.exit(f'{what} stopped (exit {code}); run the same command again to resume')
    if code != 0:
        sys.exit(f'error: {what} failed (exit {code})')


def latest_step(workdir: str) -> Optional[int]:
    d = os.path.join(workdir, 'checkpoints')
    steps = [int(s) for s in os.listdir(d) if s.isdigit()] if os.path.isdir(d) else []
    return max(steps, default=None)


def train_row(a, out: str, record: dict, row: Row, shared: List[str]) -> dict:
    """Train (or resume) the row's run and export its last checkpoint; returns its record."""
    name = row.train_as or row.name
    overrides = shared + list(ROWS[name].overrides)
    tr = record['trainings'].get(name)
    if tr is not None:
        check_same(f'training {name!r}', tr['overrides'], overrides)
        if tr.get('export') and os.path.isdir(tr['export']):
            return tr
    workdir = os.path.join(out, 'runs', name)
    base = [sys.executable, os.path.join(REPO, 'train.py'), '--config', a.stage_config,
            '--workdir', workdir]
    tr = dict(overrides=overrides, workdir=workdir, resumed_from=latest_step(workdir))
    t0 = time.time()
    stop(run(base + overrides), f'training {name!r}')
    tr['train_seconds'] = round(time.time() - t0, 1)
    step = latest_step(workdir)
    export = os.path.join(workdir, 'export', f'step_{step}')
    tr['export_seconds'] = 0.0
    if not os.path.isdir(export):
        t0 = time.time()
        stop(run(base + ['--export'] + overrides), f'export of {name!r}')
        tr['export_seconds'] = round(time.time() - t0, 1)
    tr.update(step=step, export=export)
    record['trainings'][name] = tr
    save(out, record)
    return tr


def eval_row(a, out: str, row: Row, sampling: dict, export: str) -> Tuple[dict, float]:
    """The shapes evaluation (t2i + prompt control) of `export`; returns its numbers."""
    root = os.path.join(out, 'runs', row.name, 'eval')
    before = set(os.listdir(root)) if os.path.isdir(root) else set()
    cmd = [sys.executable, '-m', 'vd_jax.eval', 'shapes', '--ckpt', export, '--out', root,
           '--flows', a.eval_flows, '--n', str(a.eval_n), '--prompt-control',
           str(a.prompt_control_n), '--batch-size', str(a.eval_batch_size)]
    for k in SAMPLING_KEYS:
        cmd += [f"--{k.replace('_', '-')}", str(sampling[k])]
    t0 = time.time()
    stop(run(cmd), f'evaluation of {row.name!r}')
    seconds = round(time.time() - t0, 1)
    (new,) = sorted(set(os.listdir(root)) - before)
    path = os.path.join(root, new, 'metrics.json')
    with open(path) as f:
        m = json.load(f)
    flows = m['flows']
    return dict(t2i=flows.get('t2i', {}).get('accuracy'), prompt_control=m.get('prompt_control'),
                flows={k: {kk: v for kk, v in f.items() if kk != 'examples'}
                       for k, f in flows.items()},
                metrics=path), seconds


def run_row(a, out: str, record: dict, row: Row, shared: List[str]) -> None:
    sampling = {k: getattr(a, k) for k in SAMPLING_KEYS}
    sampling.update(row.sampling)
    r = record['rows'].get(row.name)
    mine = dict(overrides=list(row.overrides), sampling=sampling, train_as=row.train_as,
                note=row.note)
    if r is not None:
        check_same(f'row {row.name!r}', {k: r.get(k) for k in mine}, mine)
        if r.get('eval'):
            print(f'row {row.name}: evaluated already ({r["eval"]["metrics"]}), skipped')
            return
    r = record['rows'][row.name] = dict(mine, cpu=common.machine_info()['cpu'],
                                        loadavg_at_start=os.getloadavg())
    tr = train_row(a, out, record, row, shared)
    r.update(train_overrides=tr['overrides'], export=tr['export'],
             train_seconds=tr['train_seconds'], export_seconds=tr['export_seconds'],
             resumed_from=tr['resumed_from'])
    r['eval'], r['eval_seconds'] = eval_row(a, out, row, sampling, tr['export'])
    r['loadavg_at_end'] = os.getloadavg()
    save(out, record)
    print(f'row {row.name}: ' + json.dumps({'t2i': r['eval']['t2i'], 'prompt_control': {
        k: r['eval']['prompt_control'][k] for k in ('follows', 'varies')}
        if r['eval']['prompt_control'] else None}), flush=True)


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    shared = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='rows: ' + '; '.join(
                                    f'{r.name}{" (default)" if r.name in DEFAULT_ROWS else ""}: '
                                    f'{r.note}' for r in ROWS.values()))
    p.add_argument('--out', required=True, help='ablation.json, ablation.md, runs/<row>/')
    p.add_argument('--stage-config', default=None,
                   help=f'train.py --config of every row (default {STAGE_CONFIG}; '
                        f'--smoke: {SMOKE_CONFIG})')
    p.add_argument('--rows', default=','.join(DEFAULT_ROWS), help='comma-separated, in order')
    p.add_argument('--eval-n', type=int, default=200, help='held-out t2i prompts')
    p.add_argument('--eval-flows', default='t2i', help='python -m vd_jax.eval shapes --flows')
    p.add_argument('--prompt-control-n', type=int, default=16, help='prompt-control bases')
    p.add_argument('--eval-batch-size', type=int, default=100)
    p.add_argument('--steps', type=int, default=25, help='sampling steps')
    p.add_argument('--scale', type=float, default=7.5, help='guidance scale')
    p.add_argument('--sampler', default='ddim')
    p.add_argument('--spacing', default='auto', help="unless the row sets it (zero-SNR rows: "
                                                      "'trailing')")
    p.add_argument('--guidance-rescale', type=float, default=0.0)
    p.add_argument('--smoke', action='store_true',
                   help='the tiny config, 3 steps, random encoders, a tiny evaluation (CI)')
    a = p.parse_args(argv)
    unknown = [r for r in a.rows.split(',') if r not in ROWS]
    if unknown:
        p.error(f'--rows: unknown {unknown}; rows are {list(ROWS)}')
    if a.eval_n < 1 or a.prompt_control_n < 0 or a.steps < 1:
        p.error('--eval-n and --steps must be >= 1, --prompt-control-n >= 0')
    a.out = os.path.abspath(a.out)
    if a.smoke:
        a.stage_config = a.stage_config or SMOKE_CONFIG
        shared = smoke_overrides(a.out) + shared
        a.eval_n, a.prompt_control_n, a.steps, a.eval_batch_size = (
            min(a.eval_n, 4), min(a.prompt_control_n, 1), min(a.steps, 2), 4)
    a.stage_config = a.stage_config or STAGE_CONFIG
    return a, shared


def main(argv=None) -> int:
    a, shared = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, 'ablation.json')
    record = load_record(path)
    settings = dict(stage_config=a.stage_config, shared_overrides=shared, eval_n=a.eval_n,
                    eval_flows=a.eval_flows, prompt_control_n=a.prompt_control_n,
                    smoke=a.smoke)
    if record.get('settings'):
        check_same('this ablation', record['settings'], settings)
    record['settings'] = settings
    record.setdefault('machine', common.machine_info())
    t0 = time.time()
    for name in a.rows.split(','):
        print(f'=== row {name}: {ROWS[name].note}', flush=True)
        run_row(a, a.out, record, ROWS[name], shared)
    save(a.out, record)
    print(markdown(record))
    print(f'wrote {path} and ablation.md ({time.time() - t0:.0f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
