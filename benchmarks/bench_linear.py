"""The image stream's linear layers, shape by shape: XLA's GEMM against PyTorch's on exactly
the matrix products one CFG step runs.

The shapes come from the program itself, not from a table: the jaxpr of `bench_unet.py`'s
jitted CFG DDIM step (batch 2, the shared CFG prefix as shipped) at each latent size, every
`dot_general` with a two-dimensional right-hand side (the weights of q/k/v/out, the
feed-forward, proj_in/out, the time embedding) as (M, K, N) with how many times the step
runs it. The attention core's batched products are left out (`bench_attention.py` measures
them). Each distinct shape is then timed alone, in one process, interleaved (ABBA):
  torch  `torch.nn.functional.linear(x, w)` (MKL's sgemm at `--threads` threads)
  jax    the jitted `x @ w` with the flags vd_jax ships (XLA:CPU's Eigen GEMM)
and the per-step total of each side is the sum of count x median time: what the linear
layers of one step cost each library, outside the model. The record keeps every shape, the
host and the GEMM peaks of the run.

  python benchmarks/bench_linear.py --sizes 32 64      # ~4 min on 2 cores
  python benchmarks/bench_linear.py --smoke            # tiny config, seconds (CI)
"""
from __future__ import annotations

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _sub_jaxprs(eqn):
    """The jaxprs nested in one equation's parameters (jit, scan, cond, remat, custom rules)."""
    from jax.extend import core
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, core.Jaxpr):
                yield x


def linear_shapes(jaxpr) -> collections.Counter:
    """Counter of (M, K, N) over the dot_generals of `jaxpr` (nested ones included) whose
    right-hand side is a 2-D matrix contracted on one axis and that have no batch axes. A
    loop body's products count once (the CFG step runs its linear layers outside loops: the
    only loop bodies are the blockwise attention's, whose batched products are not counted)."""
    import numpy as np
    found = collections.Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'dot_general':
            (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            if len(rhs) == 2 and len(rc) == 1 and not lb and not rb and len(lc) == 1:
                k = lhs[lc[0]]
                m = int(np.prod([d for i, d in enumerate(lhs) if i != lc[0]]))
                found[(m, k, rhs[1 - rc[0]])] += 1
        for sub in _sub_jaxprs(eqn):
            found.update(linear_shapes(sub))
    return found


def step_shapes(size: int, smoke: bool) -> collections.Counter:
    """(M, K, N) -> count of the linear products of one CFG step at a size x size latent."""
    import jax
    import jax.numpy as jnp
    import bench_unet
    from vd_jax.models.init import abstract_params
    from vd_jax.models.unet import Diffuser
    cfg = bench_unet.model_config(smoke)
    model = Diffuser(cfg.diffuser)
    params = abstract_params(model)
    js = bench_unet.JaxSide(model, params, 50, cfg.schedule)
    cd = bench_unet.unet_config(smoke)['cross_attention_dim']
    x = jax.ShapeDtypeStruct((1, size, size, 4), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, bench_unet.CTX_LEN, cd), jnp.float32)
    jaxpr = jax.make_jaxpr(js.step)(params, x, jnp.asarray(0, jnp.int32), ctx, ctx, js.schedule)
    return linear_shapes(jaxpr.jaxpr)


def time_shape(m: int, k: int, n: int, reps: int, warmup: int) -> dict:
    """One (M, K, N): torch's and jax's times, interleaved, and their max |diff|."""
    import numpy as np
    import torch
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(m * k + n)
    a = rng.standard_normal((m, k), np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    ta, tw = torch.from_numpy(a), torch.from_numpy(np.ascontiguousarray(w.T))  # torch: (N, K)
    ja, jw = jnp.asarray(a), jnp.asarray(w)
    matmul = jax.jit(lambda a, w: a @ w)
    fns = {'torch': lambda: torch.nn.functional.linear(ta, tw),
           'jax': lambda: matmul(ja, jw).block_until_ready()}
    diff = float(np.abs(np.asarray(fns['jax']()) - fns['torch']().numpy()).max())
    times = common.interleaved(fns, reps=reps, warmup=warmup, log=lambda s: None)
    gflop = 2 * m * k * n / 1e9
    t_t, t_j = times['torch']['median'], times['jax']['median']
    return dict(m=m, k=k, n=n, torch=times['torch'], jax=times['jax'],
                gflops_torch=gflop / t_t, gflops_jax=gflop / t_j, speedup=t_t / t_j,
                max_abs_diff=diff)


def time_shapes(shapes, reps: int, warmup: int, log) -> list:
    """Every (M, K, N) of `shapes` (largest first), with its count."""
    rows = []
    for (m, k, n), count in sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2]):
        rows.append(dict(time_shape(m, k, n, reps, warmup), count=count))
        r = rows[-1]
        log(f"  {m}x{k}x{n} (x{count}): torch {r['torch']['median'] * 1e3:.2f} ms, "
            f"jax {r['jax']['median'] * 1e3:.2f} ms, {r['speedup']:.2f}x")
    return rows


def main(argv=None):
    ap = common.base_parser(__doc__.split('\n\n')[0])
    ap.add_argument('--sizes', type=int, nargs='+', default=None, help='latent sizes (default 32 64)')
    ap.add_argument('--no-gemm', action='store_true', help='skip the GEMM peak measurement')
    args = ap.parse_args(argv)
    common.setup(args.threads, jaxlib_defaults=args.xla_default)
    smoke = args.smoke
    sizes = args.sizes or ([16] if smoke else [32, 64])
    reps = args.reps if args.reps is not None else (2 if smoke else 30)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    log = print
    rec = dict(benchmark='linear_shapes', args=vars(args), machine=common.machine_info(),
               sizes={})
    if not args.no_gemm:
        common.machine_peaks(rec, smoke, log=log)
    for s in sizes:
        log(f'== linear products of one CFG step at {s}x{s}')
        shapes = step_shapes(s, smoke)
        rows = time_shapes(shapes, reps, warmup, log)
        tot = {side: sum(r['count'] * r[side]['median'] for r in rows) for side in ('torch', 'jax')}
        flop = sum(r['count'] * 2 * r['m'] * r['k'] * r['n'] for r in rows)
        rec['sizes'][str(s)] = dict(
            shapes=rows, products=sum(r['count'] for r in rows), gflop=flop / 1e9,
            step_linear_s=tot, speedup=tot['torch'] / tot['jax'],
            gflops=dict(torch=flop / tot['torch'] / 1e9, jax=flop / tot['jax'] / 1e9))
    print_tables(rec)
    common.write_record('bench_linear', rec, args.out, smoke)


def print_tables(rec):
    peak = common.best_peak(rec.get('gemm') or {})
    for s, r in rec['sizes'].items():
        print(f'\n{s}x{s} latent: {r["products"]} linear products, {r["gflop"]:.1f} GFLOP per step')
        rows = [[f"{x['m']}x{x['k']}x{x['n']}", x['count'],
                 f"{x['torch']['median'] * 1e3:.2f}", f"{x['jax']['median'] * 1e3:.2f}",
                 f"{x['gflops_torch']:.0f}", f"{x['gflops_jax']:.0f}", f"{x['speedup']:.2f}x"]
                for x in r['shapes']]
        tot = r['step_linear_s']
        rows.append(['**per step (count x time)**', r['products'], f"{tot['torch'] * 1e3:.0f}",
                     f"{tot['jax'] * 1e3:.0f}", f"{r['gflops']['torch']:.0f}",
                     f"{r['gflops']['jax']:.0f}", f"**{r['speedup']:.2f}x**"])
        print(common.table(['M x K x N', 'count', 'torch ms', 'jax ms', 'torch GFLOP/s',
                            'jax GFLOP/s', 'jax speed-up'], rows))
        if peak:
            print(f"jax: {100 * r['gflops']['jax'] / peak:.0f}% of the run's best GEMM peak "
                  f"({peak:.1f}); torch: {100 * r['gflops']['torch'] / peak:.0f}%")


if __name__ == '__main__':
    main()
