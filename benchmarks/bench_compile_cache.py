"""The persistent XLA compilation cache of sample.py: compile time of a second process vs the first.

sample.py turns jax's persistent compilation cache on by default (`vd_jax.cli.usage.
compile_cache`: `$XDG_CACHE_HOME/vd_jax/xla`, `--no-compile-cache` opts out). Here the same
text->image job runs in fresh processes one after the other, all with one new cache folder:

  off    the cache disabled (what every process paid before the cache),
  cold   the cache on and empty: compiles everything and writes the cache,
  warm   the cache on and filled by `cold`: loads the compiled programs.

Each process enables the cache exactly as sample.py does, builds the model (random weights,
only the parts text->image needs), then calls `text_to_image` twice with the same shapes: the
first call traces, lowers, compiles (or loads) and runs every program of the task (CLIP text
encoder, the whole guided DDIM loop, the VAE decoder), the second only runs them, so
first - second is what compilation costs the first call. jax's monitoring events give the
backend-compile seconds, persistent-cache hits / misses and the compile time a hit saved.
Tracing and lowering to HLO are not cached: they remain in the warm process's first call.

Configs: 'tiny' (the tests' four-flow model at 32x32, 50 steps) and 'vd_dc' (the paper's
VD-DC at full width: image stream, CLIP text and the kl-f8 AutoKL, 1.33e9 parameters, random
weights) at 64x64 and 2 steps: the denoising loop is one `lax.scan`, whose compile time does
not depend on the number of steps (BENCHMARKS.md), while 50 full-width steps take minutes
per call on this CPU and would drown the difference in the noise of a shared machine.

  python benchmarks/bench_compile_cache.py                   # tiny and vd_dc, ~5 min
  python benchmarks/bench_compile_cache.py --configs tiny
  python benchmarks/bench_compile_cache.py --smoke           # tiny, 2 steps (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MODES = ('off', 'cold', 'warm')
# config -> (config name, output side in pixels, default DDIM steps); the parts text->image needs
CONFIGS = {'tiny': ('tiny', 32, 50), 'vd_dc': ('vd_dc', 64, 2)}
PARTS = ('diffuser', 'ctx_text', 'vae_image')


def child(args) -> dict:
    """One process: enable the cache as sample.py does, build, time two text->image calls."""
    t_start = time.perf_counter()
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    from vd_jax.platform import configure_xla
    configure_xla()  # as sample.py (common.setup would also import torch: not this job's cost)
    import numpy as np
    import jax
    from jax import monitoring
    from vd_jax.cli.usage import compile_cache
    events = {'backend_compile_s': 0.0, 'cache_hits': 0, 'cache_misses': 0,
              'compile_time_saved_s': 0.0, 'cache_retrieval_s': 0.0}

    def on_duration(name, secs, **_):
        key = {'/jax/core/compile/backend_compile_duration': 'backend_compile_s',
               '/jax/compilation_cache/compile_time_saved_sec': 'compile_time_saved_s',
               '/jax/compilation_cache/cache_retrieval_time_sec': 'cache_retrieval_s'}.get(name)
        if key:
            events[key] += float(secs)

    def on_event(name, **_):
        key = {'/jax/compilation_cache/cache_hits': 'cache_hits',
               '/jax/compilation_cache/cache_misses': 'cache_misses'}.get(name)
        if key:
            events[key] += 1
    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)
    cache = compile_cache(args.mode != 'off')
    from vd_jax.config import load_config
    from vd_jax.models.init import random_params
    from vd_jax.pipeline import VersatileDiffusion
    name, side, _ = CONFIGS[args.config]
    t0 = time.perf_counter()
    cfg = load_config(name)
    vd = VersatileDiffusion(cfg, {}, source=f'random:{name}')
    abstract = vd.components.abstract_params(PARTS)
    for i, part in enumerate(PARTS):
        vd.components.set_params(part, random_params(abstract[part], i))
    build_s = time.perf_counter() - t0
    kw = dict(n=args.batch, steps=args.steps, height=side, width=side, seed=0)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = vd.text_to_image('a red bicycle', **kw)
        times.append(time.perf_counter() - t0)
    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
    return dict(config=args.config, mode=args.mode, cache=cache, params=params,
                steps=args.steps, batch=args.batch, side=side, build_s=build_s,
                first_call_s=times[0], second_call_s=times[1],
                compile_s=times[0] - times[1], process_s=time.perf_counter() - t_start,
                output_mean=float(np.mean(out)), cache_files=_count_files(cache), **events)


def _count_files(path):
    if not path or not os.path.isdir(path):
        return 0
    return sum(len(f) for _, _, f in os.walk(path))


def main(argv=None):
    p = common.base_parser(__doc__.split('\n')[0])
    p.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument('--steps', type=int, default=None,
                   help='DDIM steps of every config (default: tiny 50, vd_dc 2; smoke 2)')
    p.add_argument('--batch', type=int, default=1, help='images per call')
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--mode', choices=MODES, help=argparse.SUPPRESS)
    p.add_argument('--config', choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    configs = ['tiny'] if args.smoke else args.configs
    rec = {'args': vars(args), 'runs': []}
    for config in configs:
        steps = args.steps or (2 if args.smoke else CONFIGS[config][2])
        root = tempfile.mkdtemp(prefix='vd_jax_cache_bench_')
        try:
            for mode in MODES:  # one after the other: each process starts from what the last left
                r = common.run_child([os.path.abspath(__file__), '--child', '--mode', mode,
                                      '--config', config, '--steps', str(steps),
                                      '--batch', str(args.batch)],
                                     env={'XDG_CACHE_HOME': root}, timeout=1800)
                r['cache'] = r['cache'] and os.path.relpath(r['cache'], root)
                print(f"{config} {mode}: first call {r['first_call_s']:.2f} s, then "
                      f"{r['second_call_s']:.2f} s; backend compile {r['backend_compile_s']:.2f} s, "
                      f"{r['cache_hits']} hits / {r['cache_misses']} misses", flush=True)
                rec['runs'].append(r)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    by = {(r['config'], r['mode']): r for r in rec['runs']}
    rec['summary'] = {c: {
        'compile_s_cold': by[c, 'cold']['compile_s'], 'compile_s_warm': by[c, 'warm']['compile_s'],
        'first_call_speedup': by[c, 'cold']['first_call_s'] / by[c, 'warm']['first_call_s'],
        'same_output': by[c, 'cold']['output_mean'] == by[c, 'warm']['output_mean']
        == by[c, 'off']['output_mean']} for c in configs}
    common.write_record('bench_compile_cache', rec, args.out, args.smoke)
    rows = [[r['config'], f"{r['params'] / 1e6:.1f} M", r['side'], r['steps'], r['mode'],
             r['first_call_s'], r['second_call_s'], r['compile_s'], r['backend_compile_s'],
             f"{r['cache_hits']} / {r['cache_misses']}", r['process_s']] for r in rec['runs']]
    print(f'\ntext->image, batch {args.batch} (first call - second call = compilation)\n')
    print(common.table(['config', 'params', 'side', 'steps', 'cache', 'first call s',
                        'second call s', 'compile s', 'backend compile s', 'hits / misses',
                        'process s'], rows))


if __name__ == '__main__':
    main()
