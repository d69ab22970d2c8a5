"""Is the default sampler's compiled program the same as another tree's? A load-independent
check (no timing): the jitted 50-step guided DDIM run of the tiny diffuser is compiled in this
tree and in `--baseline-tree` (child processes, PYTHONPATH=<tree>), and XLA's optimized HLO
is compared: instruction count, FLOPs and bytes from XLA's cost analysis, and the instruction
lines with names and source locations stripped (sorted, and tuple types with sorted elements,
so the order of a while loop's carried values does not count).

    python benchmarks/compare_sampler_program.py --baseline-tree ../old-checkout
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def child() -> dict:
    common.setup()
    import jax.numpy as jnp
    from vd_jax.config import load_config
    from vd_jax.diffusion import sampling
    from vd_jax.diffusion.schedule import make_schedule
    from vd_jax.models.init import abstract_params, random_params
    from vd_jax.models.unet import Diffuser, example_inputs
    model = Diffuser(load_config('tiny').model.diffuser)
    x, _, ctx, xtype, ctype = example_inputs(model.config, 2)
    params = random_params(abstract_params(model, *example_inputs(model.config)), seed=1)

    def apply(p, x_t, t, c):
        return model.apply({'params': p}, x_t, t, c, xtype, ctype)
    run = sampling.Sampler(apply, sampler='ddim', steps=50)
    static, scale, eta, *rest = run._static(7.5, 0.0)   # older trees return 3 values
    ctx = jnp.ones(ctx.shape)
    args = (params, make_schedule(), ctx, jnp.zeros_like(ctx), scale, eta, None, jnp.arange(2),
            None, *rest)
    compiled = sampling._sample_jit.lower(*args, shape=(2, 16, 16, x.shape[-1]), **static).compile()
    text = compiled.as_text()
    lines = []
    for ln in text.splitlines():
        if ' = ' not in ln:
            continue
        ln = re.sub(r'metadata=\{[^}]*\}|,? ?stack_frame_id=\d+', '', ln)
        ln = re.sub(r'%[\w.\-]+', '%v', ln)
        ln = re.sub(r'index=\d+', 'index=i', ln)
        ln = re.sub(r'/\*index=\d+\*/', '', ln).strip()
        # a loop carry's tuple type: element order is not the program (sort its elements)
        ln = re.sub(r'= \(([^()]*)\) ', lambda m: '= (' + ', '.join(sorted(
            e.strip() for e in m.group(1).split(', '))) + ') ', ln)
        lines.append(ln)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ops = collections.Counter(re.findall(r'= \S+ (\w[\w-]*)\(', '\n'.join(lines)))
    return dict(instructions=len(lines), flops=cost.get('flops'), bytes=cost.get('bytes accessed'),
                ops=dict(ops.most_common(8)),
                sorted_lines_sha256=hashlib.sha256('\n'.join(sorted(lines)).encode()).hexdigest(),
                lines=sorted(lines))


def main():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument('--baseline-tree', required=False, default='')
    p.add_argument('--child', action='store_true', help=argparse_suppress())
    args = p.parse_args()
    if args.child:
        print(json.dumps(child()))
        return
    common.setup()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    me = [os.path.abspath(__file__), '--child']
    rec = dict(args=vars(args), this=common.run_child(me, env={'PYTHONPATH': here}))
    rows = [['this tree', rec['this']['instructions'], rec['this']['flops'], rec['this']['bytes']]]
    if args.baseline_tree:
        rec['baseline'] = common.run_child(me, env={'PYTHONPATH': os.path.abspath(args.baseline_tree)})
        rows.append(['baseline', rec['baseline']['instructions'], rec['baseline']['flops'],
                     rec['baseline']['bytes']])
        a, b = (collections.Counter(rec[k].pop('lines')) for k in ('this', 'baseline'))
        rec['differing_lines'] = sum((a - b).values())
        rec['differing_examples'] = [ln[:300] for ln in list(a - b)[:3]]
        rec['same_cost'] = all(rec['this'][k] == rec['baseline'][k] for k in
                               ('instructions', 'flops', 'bytes'))
    else:
        rec['this'].pop('lines')
    print(common.table(['tree', 'HLO instructions', 'FLOPs', 'bytes'], rows))
    if 'same_cost' in rec:
        print(f"same instruction count, FLOPs and bytes: {rec['same_cost']}; "
              f"{rec['differing_lines']} of {rec['this']['instructions']} normalized instruction "
              'lines differ')
    common.write_record('compare_sampler_program', rec, args.out, args.smoke)


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


if __name__ == '__main__':
    main()
