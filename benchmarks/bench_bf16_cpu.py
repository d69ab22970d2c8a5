"""bfloat16 on the CPU backend: one guided diffuser step (batch 2 = uncond + cond) of the
image stream (text->image) and of the text stream (text->text), float32 against bfloat16.

Variants, each the jitted diffuser forward on random weights:
  float32          float32 weights, float32 compute (the default)
  bfloat16         bfloat16 weights, bfloat16 compute: what `--dtype bfloat16` runs today
  bf16 cast/step   bfloat16 weights converted to float32 inside every step, float32 compute
  bf16 cast/call   bfloat16 weights converted to float32 once per sampling call (timed apart:
                   `cast s`), then float32 steps
so a 50-step call costs 50 x step (+ one cast for `cast/call`). XLA:CPU has no bfloat16
matmul kernel of its own: the question is whether the time goes into converting the weights
at every step (then converting once per call is the fix) or into the computation.

Config `mid` (the default): the released image and text streams at model_channels 128
instead of 320 (same layer order, ~16% of the parameters), 256 px; `tiny` for `--smoke`.
Short on purpose (the machine is shared): 3 interleaved repetitions after a warm-up.

    python benchmarks/bench_bf16_cpu.py [--config mid|tiny] [--reps 3] [--smoke]
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

VARIANTS = ('float32', 'bfloat16', 'bf16 cast/step', 'bf16 cast/call')
STREAMS = {'image': 't2i', 'text': 't2t'}  # the stream a step runs -> the task it serves
CALL_STEPS = 50


def model_config(name: str):
    from configs import common as cc
    if name == 'tiny':
        return cc.model_config(dict(image=cc.tiny_image_stream(), text=cc.tiny_text_stream()),
                               tiny=True, name='bf16_tiny'), 32
    streams = dict(image=dict(cc.image_stream(), model_channels=128, use_checkpoint=False),
                   text=dict(cc.text_stream(), model_channels=128, use_checkpoint=False))
    return cc.model_config(streams, name='bf16_mid'), 256


def step_fns(cfg, stream: str, hw: int, seed: int = 0):
    """{variant: (prepare(), step(prepared))}: prepare makes what one sampling call holds
    (the weights it runs on), step is one diffuser forward on it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from vd_jax.components import Components
    from vd_jax.models.init import param_count, random_params
    comps = {d: Components(cfg, {}, dtype=d) for d in ('float32', 'bfloat16')}
    abstract = comps['float32'].abstract_params(['diffuser'])['diffuser']
    p32 = jax.tree_util.tree_map(jnp.asarray, random_params(abstract, seed))
    p16 = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), p32)
    c = comps['float32']
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(c.latent_shape(stream, 2, (hw, hw)), np.float32))
    ctx_dim = int(cfg['diffuser']['streams']['text']['context_dim'])
    ctx = jnp.asarray(rng.standard_normal((2, 77, ctx_dim), np.float32))
    t = jnp.array([500, 500], jnp.int32)

    def forward(dtype):
        m = comps[dtype].module('diffuser')
        return lambda p: m.apply({'params': p}, x, t, ctx, stream, 'text')

    f32, bf16 = jax.jit(forward('float32')), jax.jit(forward('bfloat16'))
    upcast = jax.jit(lambda p: jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), p))
    per_step = jax.jit(lambda p: forward('float32')(
        jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), p)))
    # only the stream's own weights (and the global layers it borrows) matter for a step
    fns = {'float32': (lambda: p32, f32), 'bfloat16': (lambda: p16, bf16),
           'bf16 cast/step': (lambda: p16, per_step),
           'bf16 cast/call': (lambda: common.block(upcast(p16)), f32)}
    return fns, upcast, p16, param_count(p32)


def measure(cfg, stream, hw, reps, warmup, log=print) -> dict:
    import jax
    fns, upcast, p16, params = step_fns(cfg, stream, hw)
    held = {v: prep() for v, (prep, _) in fns.items()}
    steps = {v: (lambda v=v: jax.block_until_ready(fns[v][1](held[v]))) for v in fns}
    log(f'== {stream} stream ({STREAMS[stream]} step), {params / 1e6:.1f} M diffuser parameters')
    out = {'params': params, 'step': common.interleaved(steps, reps, warmup, log=log)}
    common.block(upcast(p16))  # compiled
    casts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        w = common.block(upcast(p16))
        casts.append(time.perf_counter() - t0)
        del w
    out['cast_once'] = common.stats(casts)
    a = jax.device_get(fns['float32'][1](held['float32']))
    b = jax.device_get(fns['bfloat16'][1](held['bfloat16'])).astype('float32')
    c = jax.device_get(fns['bf16 cast/call'][1](held['bf16 cast/call']))
    import numpy as np
    out['max_abs_diff'] = {'bfloat16 vs float32': float(np.abs(a - b).max()),
                           'bf16 cast/call vs float32': float(np.abs(a - c).max()),
                           'float32 output max': float(np.abs(a).max())}
    return out


def main(argv=None):
    p = common.base_parser(__doc__.split('\n')[0])
    p.add_argument('--config', default='mid', choices=['mid', 'tiny'])
    args = p.parse_args(argv)
    common.setup(args.threads, jaxlib_defaults=args.xla_default)
    config = 'tiny' if args.smoke else args.config
    reps = args.reps or (1 if args.smoke else 3)
    warmup = args.warmup if args.warmup is not None else 1
    cfg, hw = model_config(config)
    rec = {'args': vars(args), 'config': config, 'size_px': hw, 'batch': 2, 'streams': {}}
    rec['machine'] = common.machine_info()
    for stream in STREAMS:
        rec['streams'][stream] = measure(cfg, stream, hw, reps, warmup)
    common.write_record('bench_bf16_cpu', rec, args.out, args.smoke)
    rows = []
    for stream, r in rec['streams'].items():
        base = r['step']['float32']['median']
        cast = r['cast_once']['median']
        for v in VARIANTS:
            st = r['step'][v]['median']
            call = CALL_STEPS * st + (cast if v == 'bf16 cast/call' else 0.0)
            rows.append([f"{STREAMS[stream]} ({r['params'] / 1e6:.0f} M)", v,
                         common.fmt_s(r['step'][v]), f'{st / base:.2f}x',
                         f'{cast:.3f}' if v == 'bf16 cast/call' else '',
                         f'{call:.1f}', f'{call / (CALL_STEPS * base):.2f}x'])
    m = rec['machine']
    print(f"\n{m['cpu']} ({m['host_kind']}: family {m['cpu_id'].get('family')} model "
          f"{m['cpu_id'].get('model')}), "
          f"{config} config, {hw} px, batch 2, load "
          f"{rec['machine']['loadavg_at_start'][0]:.1f} at start\n")
    print(common.table(['step', 'variant', 'step s', 'vs float32', 'cast s',
                        f'{CALL_STEPS}-step call s', 'call vs float32'], rows))


if __name__ == '__main__':
    main()
