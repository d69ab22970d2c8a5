"""Every sampler's 50-step loop on the tiny diffuser, and the default (DDIM) against another
tree of the code (e.g. the commit before the samplers became `Solver` modules), in one run.

    python benchmarks/bench_samplers.py                          # this tree, every sampler
    python benchmarks/bench_samplers.py --baseline-tree ../old   # + DDIM of another checkout

The baseline runs in child processes with PYTHONPATH=<tree> (its own vd_jax), alternating
with children of this tree (ABBA), each timing `--reps` whole guided 50-step runs of the same
jitted `Sampler(sampler='ddim')` after a warm-up (compile) run. Reported: ms per step (median
of each child's median), ratio this / baseline. Host (CPU family/model) in the record.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

STEPS = 50


def child(sampler: str, reps: int, hw: int) -> dict:
    """Time `reps` whole runs of one sampler in this process (the tree on sys.path)."""
    common.setup()
    import jax
    import jax.numpy as jnp
    from vd_jax.config import load_config
    from vd_jax.diffusion.sampling import Sampler
    from vd_jax.diffusion.schedule import make_schedule
    from vd_jax.models.init import abstract_params, random_params
    from vd_jax.models.unet import Diffuser, example_inputs
    cfg = load_config('tiny')
    model = Diffuser(cfg.model.diffuser)
    x, _, ctx, xtype, ctype = example_inputs(model.config, 2)
    params = random_params(abstract_params(model, *example_inputs(model.config)), seed=1)

    def apply(p, x_t, t, c):
        return model.apply({'params': p}, x_t, t, c, xtype, ctype)
    run = Sampler(apply, sampler=sampler, steps=STEPS)
    ctx = jax.random.normal(jax.random.key(0), ctx.shape)
    kw = dict(uncond_context=jnp.zeros_like(ctx), guidance_scale=7.5, seeds=jnp.arange(2),
              shape=(2, hw, hw, x.shape[-1]))
    sched = make_schedule()
    run(params, sched, ctx, **kw).block_until_ready()      # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(params, sched, ctx, **kw).block_until_ready()
        times.append(time.perf_counter() - t0)
    return dict(sampler=sampler, ms_per_step=1e3 * statistics.median(times) / STEPS,
                all_s=times)


def main():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument('--baseline-tree', default='', help='another checkout of vd_jax to compare DDIM with')
    p.add_argument('--rounds', type=int, default=3, help='alternating child pairs')
    p.add_argument('--hw', type=int, default=16, help='latent side')
    p.add_argument('--child', default='', help=argparse_hidden())
    args = p.parse_args()
    reps = args.reps or (1 if args.smoke else 3)
    if args.child:
        print(json.dumps(child(args.child, reps, args.hw)))
        return
    common.setup()
    from vd_jax.diffusion.sampling import SAMPLERS
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    me = [os.path.abspath(__file__), '--reps', str(reps), '--hw', str(args.hw)]
    rows, record = [], dict(args=vars(args), steps=STEPS, samplers={}, default={})
    for name in (('ddim',) if args.smoke else SAMPLERS):
        r = common.run_child(me + ['--child', name], env={'PYTHONPATH': here})
        record['samplers'][name] = r
        rows.append([name, f"{r['ms_per_step']:.2f}"])
        print(f'{name}: {r["ms_per_step"]:.2f} ms/step')
    print(common.table(['sampler', 'ms / step (this tree)'], rows))
    if args.baseline_tree:
        this, base = [], []
        for i in range(1 if args.smoke else args.rounds):
            order = [('this', here), ('base', os.path.abspath(args.baseline_tree))]
            for name, tree in (order if i % 2 == 0 else order[::-1]):
                r = common.run_child(me + ['--child', 'ddim'], env={'PYTHONPATH': tree})
                (this if name == 'this' else base).append(r['ms_per_step'])
                print(f'round {i + 1} {name}: {r["ms_per_step"]:.2f} ms/step')
        record['default'] = dict(this_ms=this, baseline_ms=base, baseline_tree=args.baseline_tree,
                                 ratio=statistics.median(this) / statistics.median(base))
        print(common.table(['default DDIM', 'this tree ms/step', 'baseline ms/step', 'this / baseline'],
                           [['50 steps, CFG', f'{statistics.median(this):.2f}',
                             f'{statistics.median(base):.2f}', f"{record['default']['ratio']:.3f}"]]))
    common.write_record('bench_samplers', record, args.out, args.smoke)


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == '__main__':
    main()
