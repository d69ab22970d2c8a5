"""Where the image-stream CFG DDIM step spends its time on CPU, per XLA op kind.

What: the jitted step of `bench_unet.py` (full-width VD image stream, SD-v1 widths; batch 2 =
uncond + cond, one UNet call, guidance, DDIM update; `bench_unet.JaxSide.step`) at one latent
size (default 64x64 = 512 px images), with random weights (`vd_jax.models.init.random_params`:
the timing does not depend on the values, and no torch model or conversion is needed).

How: compile, run a few warm calls (timed: the step's wall time), then `jax.profiler.trace`
(`create_perfetto_trace=True`, to a temp dir) around `--calls` more calls. The Chrome-trace
JSON it writes (`perfetto_trace.json.gz`) has one event per executed XLA CPU thunk, carrying
`hlo_module`, `hlo_op` (the instruction name) and `run_id` (one per call); a thunk that runs
asynchronously (large dots and convolutions go to the Eigen pool) returns at once and its
completion is a later `end: <op>` event, so its time is taken from start to that end event
(it may then overlap other thunks). Every instruction
is looked up in the optimised HLO of the compiled step (`compiled.as_text()`: opcode, shapes,
op_name metadata, the ops inside a fusion) and put in a kind: 3x3 convolution, dot as 1x1
convolution (ResBlock skip, transformer proj_in/proj_out: XLA lowers them to dots), dot in
the attention core (batched QK^T / PV), other dots (q/k/v/out projections, GEGLU FF, time
embedding), attention softmax, Group/LayerNorm statistics (reductions) and normalise/affine
fusions, other elementwise fusions, copies/transposes (layout), concat/slice (data movement),
other. Per kind: ms per step, share of the summed op time and of the wall time, thunks per
step, and GFLOP/s from the dot/convolution FLOPs of each instruction (2 x MACs, parsed from
the HLO; XLA's API has no per-op cost) against the jax f32 GEMM peak measured in the same
run (`common.gemm_peak`). The summed op time, the union of the op intervals (busy) and the
step's wall time show how much is idle/dispatch overhead (thunks of one call may overlap on
XLA's threads, so the sum can exceed the busy time).

  python benchmarks/profile_unet_ops.py                 # 64x64 latent (~2 min on 2 cores)
  python benchmarks/profile_unet_ops.py --size 32       # 32x32 latent
  python benchmarks/profile_unet_ops.py --smoke         # tiny config, 16x16, seconds (CI)

Record: benchmarks/results/profile_unet_ops[-<tag>][-smoke].json (tag defaults to s<size>; none with --smoke).
"""
from __future__ import annotations

import bisect
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# ----------------------------------------------------------------------------------------
# The optimised HLO: instructions, their kind and their dot/convolution FLOPs
# ----------------------------------------------------------------------------------------

_INST = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$')
_COMP = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_SHAPE = re.compile(r'^\(?(\w+)\[([\d,]*)\]')

LAYOUT_OPS = {'copy', 'transpose'}
MOVE_OPS = {'concatenate', 'slice', 'pad', 'dynamic-slice', 'dynamic-update-slice', 'reshape',
            'bitcast', 'broadcast', 'gather', 'reverse', 'iota'}
PLUMBING = {'parameter', 'constant', 'bitcast', 'reshape', 'broadcast', 'tuple',
            'get-tuple-element'}
CONTAINERS = {'while', 'call', 'conditional'}  # their events enclose their bodies' events
NORM_RE = re.compile(r'/(in_layers_0|out_layers_0|norm|norm\d|norm_out)/')
ATTN_RE = re.compile(r'/attn\d/')
ONE_BY_ONE_RE = re.compile(r'/(skip_connection|proj_in|proj_out)/')

KINDS = ('conv 3x3', 'conv other', 'dot: 1x1 conv (skip, proj_in/out)',
         'dot: attention core (QK^T, PV)', 'dot: linear (q/k/v/out, FF, emb)',
         'softmax (attention)', 'norm: statistics (reductions)',
         'norm: normalise/affine/SiLU (elementwise)', 'elementwise (bias, act, residual, guidance)',
         'other reductions', 'copy/transpose (layout)', 'concat/slice/pad (data movement)', 'other')


class Inst:
    __slots__ = ('name', 'type', 'op', 'operands', 'line', 'comp', 'shape', 'calls', 'op_name')

    def __init__(self, name, typ, op, rest, line, comp):
        self.name, self.type, self.op, self.line, self.comp = name, typ, op, line, comp
        self.operands = re.findall(r'%([\w.\-]+)', rest.split(')', 1)[0])
        m = _SHAPE.match(typ)
        self.shape = tuple(int(d) for d in m.group(2).split(',') if d) if m else ()
        c = re.search(r'calls=%([\w.\-]+)', line)
        self.calls = c.group(1) if c else None
        n = re.search(r'op_name="([^"]*)"', line)
        self.op_name = n.group(1) if n else ''


def parse_hlo(text: str):
    """{instruction name: Inst} over all computations, and {computation: [Inst]}."""
    insts, comps = {}, defaultdict(list)
    comp = None
    for line in text.splitlines():
        m = _INST.match(line)
        if m and comp is not None:
            name, typ, op, rest = m.groups()
            inst = Inst(name, typ, op, rest, line, comp)
            insts[name] = inst
            comps[comp].append(inst)
            continue
        c = _COMP.match(line)
        if c and '=' not in line.split('{', 1)[0].split('->')[0].split('(')[0]:
            comp = c.group(1)
    return insts, comps


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def inst_flops(i: Inst, insts) -> int:
    """2 x MACs of a dot or convolution instruction (0 for anything else)."""
    if i.op == 'dot':
        a = insts.get(i.operands[0]) if i.operands else None
        cd = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', i.line)
        if a is None or cd is None:
            return 0
        return 2 * _prod(i.shape) * _prod(a.shape[int(d)] for d in cd.group(1).split(',') if d)
    if i.op == 'convolution':
        b = insts.get(i.operands[1]) if len(i.operands) > 1 else None
        dl = re.search(r'dim_labels=\w+_(\w+)->\w+', i.line)
        if b is None or dl is None:
            return 0
        k = _prod(s for ch, s in zip(dl.group(1), b.shape) if ch != 'o')
        fg = re.search(r'feature_group_count=(\d+)', i.line)
        return 2 * _prod(i.shape) * k // (int(fg.group(1)) if fg else 1)
    return 0


def inner_ops(i: Inst, comps, insts, depth: int = 0):
    """The instructions a thunk executes: itself, or (recursively) its fused computation."""
    if i.calls is None or i.op in CONTAINERS or depth > 4:
        return [i]
    out = []
    for j in comps.get(i.calls, ()):
        out.extend(inner_ops(j, comps, insts, depth + 1) if j.calls else [j])
    return out or [i]


def effective_op_name(i: Inst, insts, depth: int = 0) -> str:
    """The instruction's op_name, or its first operand's (XLA's wrapped reduce-window and
    some fusions carry none)."""
    if i.op_name or depth > 6:
        return i.op_name
    for o in i.operands:
        if o in insts:
            n = effective_op_name(insts[o], insts, depth + 1)
            if n:
                return n
    return ''


def classify(i: Inst, comps, insts):
    """(kind, 2 x MACs, detail) of one thunk instruction."""
    ops = inner_ops(i, comps, insts)
    kinds = {j.op for j in ops}
    flops = sum(inst_flops(j, insts) for j in ops if j.op in ('dot', 'convolution'))
    path = effective_op_name(i, insts)
    for j in ops:
        if j.op == 'convolution':
            w = re.search(r'window=\{size=([\dx]+)', j.line)
            size = w.group(1) if w else '1x1'
            return ('conv 3x3' if size == '3x3' else 'conv other'), flops, f'conv {size}'
    for j in ops:
        if j.op == 'dot':
            if 'lhs_batch_dims' in j.line:
                return 'dot: attention core (QK^T, PV)', flops, 'batched dot'
            if ONE_BY_ONE_RE.search(j.op_name or path):
                return 'dot: 1x1 conv (skip, proj_in/out)', flops, 'dot'
            return 'dot: linear (q/k/v/out, FF, emb)', flops, 'dot'
    real = kinds - PLUMBING
    if i.op in LAYOUT_OPS or (real and real <= LAYOUT_OPS | MOVE_OPS and real & LAYOUT_OPS):
        return 'copy/transpose (layout)', 0, ','.join(sorted(real))
    if i.op in MOVE_OPS or (real and real <= MOVE_OPS):
        return 'concat/slice/pad (data movement)', 0, ','.join(sorted(real))
    reduces = bool(kinds & {'reduce', 'reduce-window'})
    if ATTN_RE.search(path) and (reduces or kinds & {'exponential', 'divide', 'maximum'}):
        return 'softmax (attention)', 0, ','.join(sorted(real))
    if NORM_RE.search(path):
        if reduces:
            return 'norm: statistics (reductions)', 0, ','.join(sorted(real))
        return 'norm: normalise/affine/SiLU (elementwise)', 0, ','.join(sorted(real))
    if reduces:
        return 'other reductions', 0, ','.join(sorted(real))
    if i.op == 'fusion' or real <= {'add', 'multiply', 'subtract', 'divide', 'logistic',
                                    'exponential', 'erf', 'tanh', 'maximum', 'minimum', 'select',
                                    'compare', 'convert', 'negate', 'rsqrt', 'sqrt'}:
        return 'elementwise (bias, act, residual, guidance)', 0, ','.join(sorted(real))
    return 'other', 0, i.op


# ----------------------------------------------------------------------------------------
# The profile: thunk events of the step's module, per call (run_id)
# ----------------------------------------------------------------------------------------

def load_trace(trace_dir: str):
    paths = sorted(glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)) \
        or sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))
    if not paths:
        raise RuntimeError(f'no trace JSON under {trace_dir}: '
                           f'{glob.glob(os.path.join(trace_dir, "**"), recursive=True)}')
    with gzip.open(paths[-1]) as f:
        d = json.load(f)
    return (d['traceEvents'] if isinstance(d, dict) else d), paths[-1]


def step_events(events, module_hint: str = 'step'):
    """The X events of XLA thunks of the step's module, grouped by run_id (one per call), with
    each event's effective duration: an asynchronous thunk (a large dot or convolution run on
    the Eigen pool) returns at once and its completion is a later 'end: <op>' event (no
    hlo_module / run_id), so the duration is from the start to the first 'end: <op>' after
    it within the same call (else the event's own duration)."""
    ops = [e for e in events if e.get('ph') == 'X' and (e.get('args') or {}).get('hlo_op')
           and not e['name'].startswith('end:')]
    ends = defaultdict(list)
    for e in events:
        if e.get('ph') == 'X' and e['name'].startswith('end: '):
            ends[e['name'][5:]].append(e['ts'])
    for v in ends.values():
        v.sort()
    mods = defaultdict(float)
    for e in ops:
        mods[e['args'].get('hlo_module', '')] += e['dur']
    cands = [m for m in mods if module_hint in m] or list(mods)
    module = max(cands, key=lambda m: mods[m])
    runs = defaultdict(list)
    for e in ops:
        if e['args'].get('hlo_module') == module:
            runs[e['args'].get('run_id')].append(e)
    n_async = 0
    for evs in runs.values():
        run_end = max(e['ts'] + e['dur'] for e in evs)
        for e in evs:
            ts = ends.get(e['args']['hlo_op'], ())
            i = bisect.bisect_left(ts, e['ts'])
            e['launch_dur'] = e['dur']
            if i < len(ts) and ts[i] <= run_end + 1.0 and ts[i] - e['ts'] > e['dur']:
                e['dur'] = ts[i] - e['ts']
                n_async += 1
    return module, dict(runs), n_async


def union_us(evs) -> float:
    """Length of the union of the events' intervals (us)."""
    iv = sorted((e['ts'], e['ts'] + e['dur']) for e in evs)
    total, cur_s, cur_e = 0.0, None, None
    for s, t in iv:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, t
        else:
            cur_e = max(cur_e, t)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def aggregate(runs, insts, comps):
    """Per kind and per instruction: us and counts per call (mean over calls), FLOPs."""
    n = len(runs)
    kinds = defaultdict(lambda: dict(us=0.0, count=0, flops=0))
    per_inst = defaultdict(lambda: dict(us=0.0, count=0, flops=0, kind='', detail='', shape=''))
    cache = {}
    unknown = 0
    per_run = []
    for rid, evs in runs.items():
        evs = [e for e in evs if (insts.get(e['args']['hlo_op']) is None
                                  or insts[e['args']['hlo_op']].op not in CONTAINERS)]
        per_run.append(dict(run_id=rid, op_sum_ms=sum(e['dur'] for e in evs) / 1e3,
                            busy_ms=union_us(evs) / 1e3,
                            span_ms=(max(e['ts'] + e['dur'] for e in evs)
                                     - min(e['ts'] for e in evs)) / 1e3,
                            launch_sum_ms=sum(e['launch_dur'] for e in evs) / 1e3,
                            thunks=len(evs), threads=len({e['tid'] for e in evs})))
        for e in evs:
            name = e['args']['hlo_op']
            if name not in cache:
                i = insts.get(name)
                if i is None:
                    unknown += 1
                    cache[name] = ('other', 0, 'not in HLO', '')
                else:
                    cache[name] = (*classify(i, comps, insts), i.type.split('{')[0])
            kind, fl, detail, shape = cache[name]
            k = kinds[kind]
            k['us'] += e['dur'] / n
            k['count'] += 1
            k['flops'] += fl
            p = per_inst[name]
            p['us'] += e['dur'] / n
            p['count'] += 1
            p['flops'] += fl
            p.update(kind=kind, detail=detail, shape=shape)
    for d in list(kinds.values()) + list(per_inst.values()):
        d['count'] /= n
        d['flops'] /= n
    return dict(kinds), dict(per_inst), per_run, unknown


# ----------------------------------------------------------------------------------------

def main(argv=None):
    ap = common.base_parser(__doc__.split('\n\n')[0])
    ap.add_argument('--size', type=int, default=None, help='latent size (default 64; smoke 16)')
    ap.add_argument('--calls', type=int, default=None, help='profiled calls (default 2)')
    ap.add_argument('--attention', choices=('auto', 'dense', 'blockwise'), default='auto',
                    help="our Diffuser's attention implementation")
    ap.add_argument('--no-gemm', action='store_true', help='skip the jax GEMM peak')
    ap.add_argument('--top', type=int, default=15, help='slowest instructions listed')
    ap.add_argument('--keep-trace', default=None, help='write the trace here (kept) instead of a temp dir')
    args = ap.parse_args(argv)
    common.setup(args.threads, jaxlib_defaults=args.xla_default)
    smoke = args.smoke
    size = args.size or (16 if smoke else 64)
    calls = args.calls or 2
    warmup = args.warmup if args.warmup is not None else 1
    reps = args.reps if args.reps is not None else (1 if smoke else 2)
    if not args.tag and not smoke:  # (the smoke record keeps the plain name the CI reads)
        args.tag = f's{size}' + ('' if args.attention == 'auto' else f'-{args.attention}')

    import numpy as np
    import jax
    import jax.numpy as jnp
    import bench_unet
    from vd_jax.models.init import abstract_params, random_params
    from vd_jax.models.unet import Diffuser

    rec = dict(benchmark='profile_unet_ops', args=vars(args), machine=common.machine_info(),
               size=size)
    if not args.no_gemm:
        # every record carries the run's f32 GEMM peaks of numpy, torch and jax (common);
        # the jax one is this profile's reference
        print('== f32 GEMM peaks (numpy, torch, jax)')
        libs = tuple(lib for lib in ('numpy', 'torch', 'jax') if common._importable(lib))
        rec['gemm'] = common.gemm_peak((256,) if smoke else (2048, 4096), libs=libs,
                                       reps=1 if smoke else 3, warmup=1)
    peak = common.peak_of(rec['gemm'], 'jax') if rec.get('gemm') else None

    print(f'== build the image stream ({"tiny" if smoke else "full width"}), random weights')
    cfg = bench_unet.model_config(smoke)
    model = Diffuser(cfg.diffuser, attention=args.attention)
    t0 = time.perf_counter()
    params = jax.tree.map(jnp.asarray, random_params(abstract_params(model)))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    print(f'  {n_params:,} params in {time.perf_counter() - t0:.1f}s')
    js = bench_unet.JaxSide(model, params, 50, cfg.schedule)
    cd = cfg.diffuser['streams']['image']['context_dim']
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, size, size, 4), dtype=np.float32))
    ctx = jnp.asarray(rng.standard_normal((1, bench_unet.CTX_LEN, cd), dtype=np.float32))
    uctx = jnp.asarray(rng.standard_normal((1, bench_unet.CTX_LEN, cd), dtype=np.float32))
    pos = jnp.asarray(0, jnp.int32)

    print(f'== compile the CFG DDIM step, batch 2, latent {size}x{size}')
    t0 = time.perf_counter()
    compiled = js.step.lower(params, x, pos, ctx, uctx, js.schedule).compile()
    t_compile = time.perf_counter() - t0
    hlo = compiled.as_text()
    insts, comps = parse_hlo(hlo)
    xla = common.xla_cost(compiled)
    print(f'  compile {t_compile:.1f}s; {len(insts):,} HLO instructions; '
          f"XLA cost {xla.get('flops', 0) / 1e9:.1f} GFLOP")

    def call():
        return compiled(params, x, pos, ctx, uctx, js.schedule).block_until_ready()

    for _ in range(warmup):
        call()
    wall = [common.timed(call) for _ in range(reps)]
    print(f'  warm step wall: {", ".join(f"{w:.3f}" for w in wall)} s')

    print(f'== profile {calls} calls')
    tmp = None
    trace_dir = args.keep_trace
    if not trace_dir:
        tmp = tempfile.TemporaryDirectory(prefix='profile_unet_ops-')
        trace_dir = tmp.name
    prof_wall = []
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            prof_wall.append(common.timed(call))
    t0 = time.perf_counter()
    events, trace_path = load_trace(trace_dir)
    module, runs, n_async = step_events(events)
    t_parse = time.perf_counter() - t0
    if len(runs) != calls:
        print(f'  warning: {len(runs)} run_ids in the trace for {calls} calls')
    kinds, per_inst, per_run, unknown = aggregate(runs, insts, comps)
    if tmp is not None:
        tmp.cleanup()
    print(f'  profiled wall: {", ".join(f"{w:.3f}" for w in prof_wall)} s; trace {len(events):,} '
          f'events, module {module}, parsed in {t_parse:.1f}s; {unknown} events not in the HLO; '
          f'{n_async} async thunks timed to their end event')

    wall_ms = 1e3 * float(np.median(wall + prof_wall))
    op_ms = sum(k['us'] for k in kinds.values()) / 1e3
    busy_ms = float(np.mean([r['busy_ms'] for r in per_run]))
    span_ms = float(np.mean([r['span_ms'] for r in per_run]))
    flops_total = sum(k['flops'] for k in kinds.values())
    rows, rec_kinds = [], {}
    for kind in sorted(kinds, key=lambda k: -kinds[k]['us']):
        k = kinds[kind]
        ms = k['us'] / 1e3
        gfs = k['flops'] / (ms / 1e3) / 1e9 if k['flops'] and ms else None
        rec_kinds[kind] = dict(ms_per_step=ms, share_of_ops=ms / op_ms, share_of_wall=ms / wall_ms,
                               count_per_step=k['count'], gflop_per_step=k['flops'] / 1e9,
                               gflops=gfs, pct_of_jax_gemm_peak=100 * gfs / peak if gfs and peak else None)
        rows.append((kind, f'{ms:.1f}', f'{100 * ms / op_ms:.1f}%', f'{100 * ms / wall_ms:.1f}%',
                     f"{k['count']:.0f}", f"{k['flops'] / 1e9:.1f}" if k['flops'] else '',
                     f'{gfs:.1f}' if gfs else '', f'{100 * gfs / peak:.0f}%' if gfs and peak else ''))
    rows.append(('**all ops**', f'{op_ms:.1f}', '100%', f'{100 * op_ms / wall_ms:.1f}%',
                 f"{sum(k['count'] for k in kinds.values()):.0f}", f'{flops_total / 1e9:.1f}',
                 f'{flops_total / (op_ms / 1e3) / 1e9:.1f}',
                 f'{100 * flops_total / (op_ms / 1e3) / 1e9 / peak:.0f}%' if peak else ''))
    top = sorted(per_inst.items(), key=lambda kv: -kv[1]['us'])[:args.top]
    top_rows = [(name, v['kind'], v['detail'], v['shape'], f"{v['us'] / 1e3:.1f}",
                 f"{100 * v['us'] / 1e3 / op_ms:.1f}%", f"{v['count']:.0f}",
                 f"{v['flops'] / (v['us'] / 1e6) / 1e9:.1f}" if v['flops'] else '')
                for name, v in top]
    rec.update(
        compile_s=t_compile, n_params=n_params, hlo_instructions=len(insts), module=module,
        xla_cost=xla, wall_s=wall, profiled_wall_s=prof_wall, wall_ms_median=wall_ms,
        op_sum_ms=op_ms, busy_ms=busy_ms, span_ms=span_ms, per_run=per_run,
        dot_conv_gflop_per_step=flops_total / 1e9, jax_gemm_peak_gflops=peak, kinds=rec_kinds,
        top_instructions={name: v for name, v in top}, trace_file=os.path.basename(trace_path),
        trace_events=len(events), events_not_in_hlo=unknown,
        async_thunk_events=n_async)
    path = common.write_record('profile_unet_ops', rec, args.out, smoke)

    print(f'\n## CFG DDIM step, batch 2, latent {size}x{size}: XLA CPU time per op kind '
          f'(mean of {len(runs)} profiled calls)\n')
    print(common.table(['op kind', 'ms/step', 'share of ops', 'share of wall', 'count/step',
                        'GFLOP/step', 'GFLOP/s', '% jax GEMM peak'], rows))
    print(f"\nstep wall {wall_ms:.1f} ms (median of {len(wall) + len(prof_wall)} calls); summed op "
          f'time {op_ms:.1f} ms ({100 * op_ms / wall_ms:.1f}% of wall); busy (union of op '
          f'intervals) {busy_ms:.1f} ms ({100 * busy_ms / wall_ms:.1f}%); first-to-last op span '
          f'{span_ms:.1f} ms; idle/overhead in the span {span_ms - busy_ms:.1f} ms, outside it '
          f'{wall_ms - span_ms:.1f} ms')
    print(f"jax f32 GEMM peak {peak:.1f} GFLOP/s (median, largest n measured); XLA cost analysis "
          f"{xla.get('flops', 0) / 1e9:.1f} GFLOP, HLO dot+conv {flops_total / 1e9:.1f} GFLOP/step"
          if peak else '')
    print(f'\n### {args.top} slowest instructions\n')
    print(common.table(['instruction', 'kind', 'detail', 'shape', 'ms/step', 'share of ops',
                        'count/step', 'GFLOP/s'], top_rows))
    print(f'\nrecord: {path}')
    return rec


if __name__ == '__main__':
    main()
