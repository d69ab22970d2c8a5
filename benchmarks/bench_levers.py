"""Why is JAX slower or faster than PyTorch on this CPU, and which levers change it.

Each variant runs in its own process (XLA reads its flags once, at backend start-up): our
full-width image stream (random weights) builds, compiles and times one forward at batch 2
(CFG batch), latents `--sizes`, context 77; the same process times the UNet's 3x3 conv shapes
and a GEMM, and the output is compared with the baseline variant's (max abs diff). A PyTorch
process does the same for diffusers' UNet2DConditionModel. `--profile` adds a per-op-class
time breakdown of one forward on both sides (XLA's profiler: events per HLO instruction,
classified from the optimised HLO; torch.profiler: self time per aten op).

Every variant starts from jaxlib's own XLA defaults (vd_jax's CPU flags are not applied
here: they are one of the levers) and the dense attention the model had before the levers
study; `shipped` is what sample.py / train.py run today. Model-level levers that are not
model code are prototyped by patching the module at import, never by editing model files:
  baseline     default flags (this jaxlib runs convs and dots as per-op YNNPACK fusions),
               attention='dense'
  eigen        --xla_cpu_experimental_ynn_fusion_type=  (YNNPACK off: XLA's Eigen conv/dot)
  ynn_graph    --xla_cpu_experimental_ynn_fusion_type=+dot,+eltwise,+reduce (bigger YNN graphs)
  fast_math    --xla_cpu_enable_fast_math=true
  dpa          attention through jax.nn.dot_product_attention (patched into vd_jax.models.attention)
  chunked      exact attention one block of 256 queries at a time (lax.map; patched likewise)
  flash        Diffuser(attention='blockwise'): online softmax over 512-key blocks (model code
               since this study; 'auto' uses it above 1024 keys)
  bf16         Diffuser(dtype=bfloat16): bf16 compute, f32 params (this CPU has AVX512-BF16)
  mm_bf16      JAX_DEFAULT_MATMUL_PRECISION=bfloat16: f32 model, dots/convs at bf16 precision
  baseline2    baseline again, last: the drift of the machine during the run
  shipped      vd_jax as sample.py/train.py run it: eigen + attention='auto' (run with --variants)

  python benchmarks/bench_levers.py --profile          # full width, 32x32 and 64x64, ~20 min
  python benchmarks/bench_levers.py --smoke
  python benchmarks/bench_levers.py --variants baseline bf16 --custom 'mine=--xla_cpu_...'
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

VARIANTS = {
    'baseline': dict(attention='dense'),
    'eigen': dict(xla_flags='--xla_cpu_experimental_ynn_fusion_type=', attention='dense'),
    'ynn_graph': dict(xla_flags='--xla_cpu_experimental_ynn_fusion_type=+dot,+eltwise,+reduce',
                      attention='dense'),
    'fast_math': dict(xla_flags='--xla_cpu_enable_fast_math=true', attention='dense'),
    'dpa': dict(attention='dpa'),
    'chunked': dict(attention='chunked'),
    'flash': dict(attention='blockwise'),
    'bf16': dict(dtype='bfloat16', attention='dense'),
    'mm_bf16': dict(env={'JAX_DEFAULT_MATMUL_PRECISION': 'bfloat16'}, attention='dense'),
    'baseline2': dict(attention='dense'),
    'shipped': dict(xla_flags='--xla_cpu_experimental_ynn_fusion_type=', attention='auto'),
    # combinations of the levers that help (run with --variants)
    'eigen_chunked': dict(xla_flags='--xla_cpu_experimental_ynn_fusion_type=', attention='chunked'),
    'eigen_flash': dict(xla_flags='--xla_cpu_experimental_ynn_fusion_type=', attention='blockwise'),
    'eigen_bf16': dict(xla_flags='--xla_cpu_experimental_ynn_fusion_type=', dtype='bfloat16',
                       attention='dense'),
}
# mm_bf16 is not in the default set: 'bfloat16' lowers to precision=DEFAULT, which XLA:CPU
# computes in full f32 (checked in the lowered StableHLO), so it cannot change anything here.
DEFAULT_ORDER = ('baseline', 'eigen', 'ynn_graph', 'fast_math', 'dpa', 'chunked', 'flash', 'bf16',
                 'baseline2')
CONV_SHAPES = ((32, 320), (16, 640), (8, 1280), (64, 320))  # (spatial, channels), 3x3, batch 2
CTX_LEN = 77


# ----------------------------------------------------------------------------------------
# Model-level levers, prototyped by patching (proposals for vd_jax/models/*.py)
# ----------------------------------------------------------------------------------------

def dpa_attention(q, k, v, num_heads, bias=None, scale=None, dtype=None, **_):
    """`layers.attention` through `jax.nn.dot_product_attention` (same packed-head contract)."""
    import jax
    b, lq, inner = q.shape
    d = inner // num_heads
    q4 = q.reshape(b, lq, num_heads, d)
    k4 = k.reshape(b, k.shape[1], num_heads, d)
    v4 = v.reshape(b, v.shape[1], num_heads, d)
    out = jax.nn.dot_product_attention(q4, k4, v4, bias=bias, scale=scale, implementation='xla')
    return out.reshape(b, lq, inner).astype(dtype or q.dtype)


def _heads(q, k, v, num_heads):
    b, lq, inner = q.shape
    d = inner // num_heads
    return (q.reshape(b, lq, num_heads, d), k.reshape(b, k.shape[1], num_heads, d),
            v.reshape(b, v.shape[1], num_heads, d), d)


def chunked_attention(q, k, v, num_heads, bias=None, scale=None, dtype=None, q_block=256, **_):
    """Exact attention computed one block of `q_block` queries at a time (`lax.map`): the
    (B, H, q_block, Lk) logits of a block stay in cache instead of materialising the whole
    (B, H, Lq, Lk) f32 matrix (1 GiB for 64x64 self-attention at batch 2). Softmax in f32."""
    import jax
    import jax.numpy as jnp
    from vd_jax.models.layers import attention
    b, lq, inner = q.shape
    if bias is not None or lq <= q_block or lq % q_block:
        return attention(q, k, v, num_heads, bias=bias, scale=scale, dtype=dtype or jnp.float32,
                         implementation='dense')
    q4, k4, v4, d = _heads(q, k, v, num_heads)
    scale = d ** -0.5 if scale is None else scale
    qb = jnp.moveaxis(q4.reshape(b, lq // q_block, q_block, num_heads, d), 1, 0)

    def block(qi):
        logits = jnp.einsum('bqhd,bkhd->bhqk', qi, k4).astype(jnp.float32) * scale
        w = jax.nn.softmax(logits, axis=-1).astype(v4.dtype)
        return jnp.einsum('bhqk,bkhd->bqhd', w, v4)
    out = jax.lax.map(block, qb)  # (n, B, q_block, H, D)
    return jnp.moveaxis(out, 0, 1).reshape(b, lq, inner).astype(dtype or q.dtype)


ATTENTION = {'dpa': dpa_attention, 'chunked': chunked_attention}  # patched in; others are
# values of Diffuser(attention=...)


def apply_patches(attention: str | None):
    """Swap the attention function the diffuser's CrossAttention calls (vd_jax.models.attention
    imports `attention` by name; patching the module global changes only this process).
    Values that are model options ('dense', 'blockwise', 'auto') need no patch."""
    if attention in ATTENTION:
        import vd_jax.models.attention as attention_mod
        attention_mod.attention = ATTENTION[attention]


# ----------------------------------------------------------------------------------------
# HLO classification and the XLA profile
# ----------------------------------------------------------------------------------------

_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(')
_COMP = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$')


def classify_hlo(text: str) -> dict:
    """instruction name -> class ('conv', 'dot', 'reduce/norm/softmax', 'elementwise',
    'copy/transpose', ...), prefixed with the library when it is a YNNPACK fusion."""
    comps, cur = defaultdict(set), None
    calls, opcode, custom = {}, {}, set()
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m or cur is None:
            continue
        name, op = m.groups()
        comps[cur].add(op)
        opcode[name] = op
        c = re.search(r'calls=%?([\w.\-]+)', line)
        if c:
            calls[name] = c.group(1)
        if '__ynn_fusion' in line:
            custom.add(name)

    out = {}
    for name, op in opcode.items():
        ops = set(comps.get(calls[name], ())) if op == 'fusion' and name in calls else {op}
        if 'convolution' in ops and 'dot' in ops:
            cls = 'conv+dot graph'
        elif 'convolution' in ops:
            cls = 'conv'
        elif 'dot' in ops:
            cls = 'dot'
        elif ops & {'reduce', 'reduce-window'}:
            cls = 'reduce/norm/softmax'
        elif ops <= {'copy', 'transpose', 'bitcast', 'parameter', 'reshape', 'concatenate', 'slice',
                     'dynamic-slice', 'dynamic-update-slice', 'pad', 'broadcast', 'constant'}:
            cls = 'copy/layout'
        else:
            cls = 'elementwise'
        out[name] = ('ynn ' if name in custom else '') + cls
    return out


def xla_profile(fn, compiled_text: str, n: int = 2) -> dict:
    """Run fn n times under jax.profiler; sum event durations per HLO class (ms per call).

    YNNPACK fusions and XLA's own loop fusions run inside their thunk's event, so their time
    is attributed. XLA's Eigen convolutions and dots are launched asynchronously onto the
    Eigen pool: their events cover only the launch, so with YNNPACK off most conv/dot time
    shows up as 'not attributed' (wall - attributed)."""
    import glob
    import jax
    from jax.profiler import ProfileData
    classes = classify_hlo(compiled_text)
    d = tempfile.mkdtemp(prefix='vd_prof_')
    with jax.profiler.trace(d):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        wall = (time.perf_counter() - t0) / n
    files = glob.glob(os.path.join(d, '**', '*.xplane.pb'), recursive=True)
    pd = ProfileData.from_file(files[0])
    per, per_op = defaultdict(float), defaultdict(float)
    for plane in pd.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in classes:
                    per[classes[ev.name]] += ev.duration_ns / 1e6 / n
                    per_op[ev.name] += ev.duration_ns / 1e6 / n
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
    return dict(wall_ms=wall * 1e3, by_class_ms=dict(per),
                top_ops_ms=[(k, classes[k], v) for k, v in top])


def torch_profile(fn) -> dict:
    """Self CPU time per aten op of one call, grouped like `classify_hlo` (ms)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - t0
    groups = [('conv', ('convolution', 'conv2d', 'mkldnn_convolution')),
              ('dot', ('addmm', 'mm', 'bmm', 'baddbmm', 'linear', 'matmul')),
              ('attention core', ('scaled_dot_product', 'flash_attention')),
              ('reduce/norm/softmax', ('group_norm', 'layer_norm', 'softmax', 'native_')),
              ('copy/layout', ('copy_', 'cat', 'contiguous', 'clone', 'to_copy', 'empty', 'view',
                               'reshape', 'transpose', 'permute', 'chunk', 'split'))]
    per, ops = defaultdict(float), []
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1e3
        if ms <= 0:
            continue
        name = ev.key
        cls = next((g for g, keys in groups if any(k in name for k in keys)), 'elementwise')
        per[cls] += ms
        ops.append((name, cls, ms))
    ops.sort(key=lambda x: -x[2])
    return dict(wall_ms=wall * 1e3, by_class_ms=dict(per), top_ops_ms=ops[:15])


# ----------------------------------------------------------------------------------------
# Children
# ----------------------------------------------------------------------------------------

def conv_micro(side: str, shapes, reps: int) -> dict:
    """GFLOP/s of 3x3 convs (batch 2, C->C, pad 1) and of an f32 GEMM 4096^2 on one side."""
    import numpy as np
    out = {}
    rng = np.random.default_rng(0)
    for hw, c in shapes:
        x = rng.standard_normal((2, hw, hw, c), dtype=np.float32)
        w = (rng.standard_normal((3, 3, c, c), dtype=np.float32) * 0.02)
        fl = 2 * 2 * hw * hw * c * c * 9
        if side == 'torch':
            import torch
            tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
            fn = lambda tx=tx, tw=tw: torch.nn.functional.conv2d(tx, tw, padding=1)  # noqa: E731
        else:
            import jax
            import jax.numpy as jnp
            jx, jw = jnp.asarray(x), jnp.asarray(w)
            f = jax.jit(lambda a, b: jax.lax.conv_general_dilated(
                a, b, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
            fn = lambda f=f, jx=jx, jw=jw: f(jx, jw).block_until_ready()  # noqa: E731
        fn()
        st = common.stats([common.timed(fn) for _ in range(reps)])
        out[f'conv3x3 {hw}x{hw}x{c}'] = fl / st['median'] / 1e9
    g = common.gemm_peak((512,) if shapes[0][0] <= 8 else (4096,),
                         libs=('torch',) if side == 'torch' else ('jax',), reps=reps, warmup=1,
                         log=lambda s: None)
    lib = 'torch' if side == 'torch' else 'jax'
    for n, v in g[lib].items():
        out[f'gemm {n}^2'] = v['gflops_median']
    return out


def child(args) -> dict:
    import numpy as np
    smoke = args.smoke
    var = VARIANTS.get(args.variant, {}) if args.variant != 'torch' else {}
    cd = 32 if smoke else 768
    t = np.array([981, 981])
    res = dict(variant=args.variant, xla_flags=os.environ.get('XLA_FLAGS', ''),
               matmul_precision=os.environ.get('JAX_DEFAULT_MATMUL_PRECISION'),
               forward={}, profile={}, compile_s={})
    shapes = ((8, 32),) if smoke else CONV_SHAPES

    def inputs(size):
        rng = np.random.default_rng(size)
        return (rng.standard_normal((2, size, size, 4), dtype=np.float32),
                rng.standard_normal((2, CTX_LEN, cd), dtype=np.float32))

    if args.variant == 'torch':
        import torch
        from bench_unet import build_torch
        unet = build_torch(smoke)
        for size in args.sizes:
            x, ctx = inputs(size)
            tx, tt, tc = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                          torch.from_numpy(ctx))

            def fwd(tx=tx, tt=tt, tc=tc):  # bound now: the loop rebinds the names
                with torch.inference_mode():
                    return unet(tx, tt, encoder_hidden_states=tc).sample
            fwd()
            res['forward'][str(size)] = common.stats([common.timed(fwd) for _ in range(args.reps)])
            if args.profile:
                res['profile'][str(size)] = torch_profile(fwd)
        res['micro_gflops'] = conv_micro('torch', shapes, 3)
        return res

    import jax
    import jax.numpy as jnp
    from vd_jax.models.init import random_params
    from vd_jax.models.init import abstract_params
    from vd_jax.models.unet import Diffuser
    from bench_unet import model_config
    apply_patches(var.get('attention'))
    cfg = model_config(smoke)
    dtype = jnp.dtype(var.get('dtype', 'float32'))
    model_attention = var.get('attention', 'dense')
    model = Diffuser(cfg.diffuser, dtype=dtype,
                     attention='dense' if model_attention in ATTENTION else model_attention)
    params = random_params(abstract_params(Diffuser(cfg.diffuser)))
    fwd_j = jax.jit(lambda p, a, b, c: model.apply({'params': p}, a, b, c, 'image', 'image'))
    outs = {}
    for size in args.sizes:
        x, ctx = inputs(size)
        jx, jt, jc = jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)
        t0 = time.perf_counter()
        compiled = fwd_j.lower(params, jx, jt, jc).compile()
        res['compile_s'][str(size)] = time.perf_counter() - t0

        def fwd(compiled=compiled, jx=jx, jt=jt, jc=jc):  # bound now: the loop rebinds them
            return compiled(params, jx, jt, jc).block_until_ready()
        outs[str(size)] = np.asarray(fwd())
        res['forward'][str(size)] = common.stats([common.timed(fwd) for _ in range(args.reps)])
        if args.profile:
            res['profile'][str(size)] = xla_profile(fwd, compiled.as_text())
    if args.save:
        np.savez(args.save, **outs)
    res['micro_gflops'] = conv_micro('jax', shapes, 3)
    return res


# ----------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------

def main(argv=None):
    ap = common.base_parser(__doc__.split('\n\n')[0])
    ap.add_argument('--sizes', type=int, nargs='+', default=None, help='latent sizes (default 32 64)')
    ap.add_argument('--variants', nargs='+', default=None, help=f'from {list(VARIANTS)}')
    ap.add_argument('--custom', nargs='*', default=[], metavar='NAME=XLA_FLAGS',
                    help='extra variants with your own XLA flags')
    ap.add_argument('--profile', action='store_true', help='per-op-class breakdown (torch and the '
                    '--profile-variants)')
    ap.add_argument('--profile-variants', nargs='+', default=['baseline'], help='variants to profile')
    ap.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference process')
    ap.add_argument('--variant', help=argparse_hidden())
    ap.add_argument('--save', help=argparse_hidden())
    args = ap.parse_args(argv)
    args.sizes = args.sizes or ([8] if args.smoke else [32, 64])
    args.reps = args.reps or (1 if args.smoke else 3)
    # every variant starts from jaxlib's defaults: vd_jax's own CPU flags are a lever here
    if args.variant:
        common.setup(args.threads, jaxlib_defaults=True)
        print(json.dumps(child(args), default=str))
        return
    common.setup(args.threads, jaxlib_defaults=True)
    for c in args.custom:
        name, _, flags = c.partition('=')
        VARIANTS[name] = dict(xla_flags=flags)
    names = args.variants or (['baseline'] if args.smoke else list(DEFAULT_ORDER))
    names += [c.partition('=')[0] for c in args.custom]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f'unknown variant(s) {unknown}; known: {list(VARIANTS)}')
    rec = dict(benchmark='levers', args=vars(args), machine=common.machine_info(), variants={})
    me = os.path.abspath(__file__)
    base = ['--sizes', *map(str, args.sizes), '--reps', str(args.reps), '--threads', str(args.threads)] + \
        (['--smoke'] if args.smoke else [])
    tmp = tempfile.mkdtemp(prefix='vd_levers_')
    if not args.no_torch:
        print('== torch (diffusers UNet2DConditionModel)')
        r = common.run_child([me, '--variant', 'torch'] + base + (['--profile'] if args.profile else []))
        rec['torch'] = r
        print('  forward ' + ', '.join(f'{s}: {common.fmt_s(v)}' for s, v in r['forward'].items()))
    for n in names:
        v = VARIANTS[n]
        env = {'XLA_FLAGS': (os.environ.get('XLA_FLAGS', '') + ' ' + v.get('xla_flags', '')).strip()}
        env.update(v.get('env', {}))
        print(f"== {n}: {v}")
        argv = [me, '--variant', n, '--save', os.path.join(tmp, f'{n}.npz')] + base
        if args.profile and n in args.profile_variants:
            argv.append('--profile')
        try:
            r = common.run_child(argv, env=env)
        except RuntimeError as e:
            print(f'  FAILED: {str(e)[:500]}')
            rec['variants'][n] = dict(error=str(e)[-2000:])
            continue
        rec['variants'][n] = r
        print('  ' + ', '.join(f"{s}: compile {r['compile_s'][s]:.1f}s, forward {common.fmt_s(f)}"
                               for s, f in r['forward'].items()))
    import numpy as np
    ref_path = os.path.join(tmp, 'baseline.npz')
    ref = dict(np.load(ref_path)) if os.path.exists(ref_path) else None
    for n, r in rec['variants'].items():
        p = os.path.join(tmp, f'{n}.npz')
        if ref is not None and os.path.exists(p):
            o = np.load(p)
            r['max_abs_diff_vs_baseline'] = {s: float(np.abs(o[s] - ref[s]).max()) for s in ref}
    rec['max_abs_output'] = {s: float(np.abs(a).max()) for s, a in ref.items()} if ref else None
    common.write_record('bench_levers', rec, args.out, args.smoke)
    print_tables(rec)
    return rec


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


def print_tables(rec):
    sizes = [str(x) for x in rec['args']['sizes']]
    tf = rec.get('torch', {}).get('forward', {})
    rows = []
    if tf:
        rows.append(('torch (diffusers)', 'oneDNN conv, MKL GEMM, flash SDPA',
                     *[common.fmt_s(tf[s]) for s in sizes], *['1.00x'] * len(sizes), '',
                     ', '.join(f'{k} {v:.0f}' for k, v in rec['torch']['micro_gflops'].items())))
    for n, r in rec['variants'].items():
        if 'error' in r:
            rows.append((n, str(VARIANTS.get(n, {})), *['failed'] * (2 * len(sizes)), '', ''))
            continue
        f = r['forward']
        v = VARIANTS.get(n, {})
        change = ' + '.join([r['xla_flags']] * bool(r['xla_flags']) +
                            [f'{k}={x}' for k, x in v.items() if k != 'xla_flags']) or 'defaults'
        d = r.get('max_abs_diff_vs_baseline', {})
        rows.append((n, change, *[common.fmt_s(f[s]) for s in sizes],
                     *[f"{tf[s]['median'] / f[s]['median']:.2f}x" if s in tf else '' for s in sizes],
                     ', '.join(f'{d[s]:.1g}' for s in sizes if s in d),
                     ', '.join(f'{k} {v:.0f}' for k, v in r['micro_gflops'].items())))
    print(f"\nUNet forward, batch 2, context 77, float32 weights; one process per variant "
          f"(max |output| {rec.get('max_abs_output')})\n" +
          common.table(['variant', 'change', *[f'{s}x{s} s' for s in sizes],
                        *[f'torch/jax {s}x{s}' for s in sizes], 'max |diff| vs baseline',
                        'micro GFLOP/s (conv3x3 HxWxC, GEMM)'], rows))
    for s in sizes:
        prof = [('torch', rec.get('torch', {}).get('profile', {}).get(s))] + \
            [(f'jax {n}', r.get('profile', {}).get(s)) for n, r in rec['variants'].items()]
        prof = [(k, p) for k, p in prof if p]
        if not prof:
            continue
        classes = sorted({c for _, p in prof for c in p['by_class_ms']})
        rows = [(c, *[f"{p['by_class_ms'].get(c, 0):.0f}" for _, p in prof]) for c in classes]
        rows.append(('not attributed: wall - sum (async Eigen conv/dot)',
                     *[f"{max(0.0, p['wall_ms'] - sum(p['by_class_ms'].values())):.0f}" for _, p in prof]))
        rows.append(('(wall, one forward)', *[f"{p['wall_ms']:.0f}" for _, p in prof]))
        print(f'\nTime per op class in one forward at {s}x{s} (ms; summed over threads)\n' +
              common.table(['class'] + [k for k, _ in prof], rows))
        for k, p in prof:
            print(f'\nTop ops at {s}x{s}, {k}:')
            for name, cls, ms in p['top_ops_ms'][:10]:
                print(f'  {ms:8.1f} ms  {cls:22s} {name}')


if __name__ == '__main__':
    main()
