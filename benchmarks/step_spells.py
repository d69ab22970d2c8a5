"""The spread of vd_jax's image-stream CFG step on this host, call by call: what happens
between two calls, and what a slow call costs (CPU time, page faults, the host's steal).

One process, the CFG DDIM step of `bench_unet.py` (batch 2, VD's image UNet at full width,
random weights converted by our converter) compiled once, then timed call by call after each
of these conditions, round robin (slow spells last several calls, so every condition meets
them alike):
  back_to_back   nothing between two calls
  sleep          the machine idle for --gap seconds before the call
  churn          --churn-mb of fresh memory touched and freed before the call (what PyTorch's
                 allocator does with its large tensors every step), then idle up to --gap
  torch          diffusers' CFG step before the call, as bench_unet.py interleaves them
Per call: wall time, the process's user and system CPU time and minor page faults
(`getrusage`), and the machine's steal time (`/proc/stat`). A call is slow when it takes more
than 1.05x the median of the back-to-back calls. BENCHMARKS.md 3f reads these records.

  python benchmarks/step_spells.py                 # 64x64, 8 calls per condition, ~12 min
  python benchmarks/step_spells.py --smoke         # tiny config, seconds (CI)
"""
from __future__ import annotations

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_unet  # noqa: E402
import common  # noqa: E402

CONDITIONS = ('back_to_back', 'sleep', 'churn', 'torch')
SLOW = 1.05   # a slow call: above this times the back-to-back median


def stat_jiffies() -> dict:
    """The machine's CPU time so far, in seconds, from the first line of /proc/stat."""
    fields = open('/proc/stat').readline().split()[1:]
    hz = os.sysconf('SC_CLK_TCK')
    names = ('user', 'nice', 'system', 'idle', 'iowait', 'irq', 'softirq', 'steal')
    return {n: int(v) / hz for n, v in zip(names, fields)}


def churn(nbytes: int) -> None:
    """Touch nbytes of fresh memory in 64 MiB arrays and free each one."""
    import numpy as np
    chunk = min(nbytes, 64 * 2**20)
    for _ in range(max(1, nbytes // chunk)):
        a = np.ones(chunk // 4, np.float32)
        a += 1
        del a


def timed_call(run) -> dict:
    """One call of run(): wall, the process's CPU time and faults, the machine's steal."""
    s0, r0 = stat_jiffies(), resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    s1, r1 = stat_jiffies(), resource.getrusage(resource.RUSAGE_SELF)
    return dict(wall_s=wall, user_s=r1.ru_utime - r0.ru_utime, sys_s=r1.ru_stime - r0.ru_stime,
                minflt=r1.ru_minflt - r0.ru_minflt, steal_s=s1['steal'] - s0['steal'])


def main(argv=None):
    ap = common.base_parser(__doc__.split('\n\n')[0])
    ap.add_argument('--size', type=int, default=None, help='latent size (default 64; smoke 16)')
    ap.add_argument('--gap', type=float, default=None,
                    help='seconds between calls for sleep/churn (default 9: a 64x64 diffusers step)')
    ap.add_argument('--churn-mb', type=int, default=None, help='memory churned (default 768)')
    ap.add_argument('--conditions', nargs='+', choices=CONDITIONS, default=list(CONDITIONS))
    args = ap.parse_args(argv)
    common.setup(args.threads, jaxlib_defaults=args.xla_default)
    smoke = args.smoke
    size = args.size or (16 if smoke else 64)
    gap = args.gap if args.gap is not None else (0.05 if smoke else 9.0)
    churn_bytes = (args.churn_mb if args.churn_mb is not None else (8 if smoke else 768)) * 2**20
    reps = args.reps if args.reps is not None else (2 if smoke else 8)
    warmup = args.warmup if args.warmup is not None else 1

    import torch
    import jax.numpy as jnp
    from vd_jax.models.unet import Diffuser

    rec = dict(benchmark='step_spells', args=vars(args), machine=common.machine_info(),
               size=size, conditions={})
    log = print
    log('== build diffusers UNet2DConditionModel and convert it')
    ab = bench_unet.cfg_setup(smoke)
    params, sched, tstep, ctx2, jctx, juctx = ab.params, ab.sched, ab.tstep, ab.ctx2, ab.jctx, ab.juctx
    js = bench_unet.JaxSide(Diffuser(ab.cfg.diffuser), params, 50, ab.cfg.schedule)
    x = torch.randn(1, 4, size, size, generator=ab.g)
    jx = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    pos = jnp.asarray(0, jnp.int32)
    log(f'== compile the CFG DDIM step, batch 2, latent {size}x{size}')
    compiled = js.step.lower(params, jx, pos, jctx, juctx, js.schedule).compile()

    def run():
        compiled(params, jx, pos, jctx, juctx, js.schedule).block_until_ready()

    def torch_step():
        tstep(x, sched.timesteps[0], ctx2)

    def churn_then_idle():
        t0 = time.perf_counter()
        churn(churn_bytes)
        time.sleep(max(0.0, gap - (time.perf_counter() - t0)))

    before = {'back_to_back': lambda: None, 'sleep': lambda: time.sleep(gap),
              'churn': churn_then_idle, 'torch': torch_step}
    for _ in range(warmup):
        run()
        torch_step()
    calls = {c: [] for c in args.conditions}
    for r in range(reps):
        for c in args.conditions:
            if c == 'back_to_back':
                run()   # the call before: the timed one follows it directly
            t0 = time.perf_counter()
            before[c]()
            between = time.perf_counter() - t0
            calls[c].append(dict(timed_call(run), between_s=between))
            k = calls[c][-1]
            log(f"  rep {r + 1} {c:12s}: {k['wall_s']:.3f} s (user {k['user_s']:.2f}, sys "
                f"{k['sys_s']:.2f}, {k['minflt']} faults, steal {k['steal_s']:.2f}; "
                f"{between:.1f} s before)")
    ref = None
    if 'back_to_back' in calls:
        ref = common.stats([k['wall_s'] for k in calls['back_to_back']])['median']
    for c, ks in calls.items():
        walls = [k['wall_s'] for k in ks]
        rec['conditions'][c] = dict(
            calls=ks, wall=common.stats(walls),
            slow=None if ref is None else sum(w > SLOW * ref for w in walls),
            mean_user_s=sum(k['user_s'] for k in ks) / len(ks),
            mean_minflt=sum(k['minflt'] for k in ks) / len(ks),
            max_steal_s=max(k['steal_s'] for k in ks))
    rec['slow_threshold_s'] = None if ref is None else SLOW * ref
    common.write_record('step_spells', rec, args.out, smoke)
    print_tables(rec)
    return rec


def print_tables(rec):
    thr = rec.get('slow_threshold_s')
    print(f"vd_jax's CFG DDIM step at {rec['size']}x{rec['size']}, call by call by what came "
          f'before it (slow: above {SLOW}x the back-to-back median'
          + (f', {thr:.3f} s)' if thr else ')'))
    rows = [(c, len(v['calls']), round(v['wall']['median'], 3),
             f"{v['wall']['min']:.3f}-{v['wall']['max']:.3f}",
             '-' if v['slow'] is None else v['slow'], round(v['mean_user_s'], 2),
             round(v['mean_minflt']), round(v['max_steal_s'], 2))
            for c, v in rec['conditions'].items()]
    print(common.table(['before the call', 'calls', 'median s', 'min-max s', 'slow',
                        'user CPU s (mean)', 'minor faults (mean)', 'steal s (max)'], rows))


if __name__ == '__main__':
    main()
