"""Training step: examples/s and step time on 1 device vs 8 host devices (data x FSDP).

Each (config, device count) runs in its own process, because the number of host devices is
an XLA flag read at start-up (`--xla_force_host_platform_device_count=8`). A process builds
the run with the trainer's own API (`vd_jax.train.setup` -> mesh, shardings, jitted step;
`initial_state` with numpy-random init), places one constant synthetic global batch, compiles
(timed), then times `--reps` optimizer steps (all four flows, AdamW, EMA) blocking on the
loss each step. The global batch is the same for every device count, so the cost per example
compares directly.

Configs: 'tiny' (the four-flow tiny model of `configs/train_tiny.py`) and 'mid' (a mid-size
four-flow model defined here: 64 channels, mult [1,2,4], 4 heads, context 128, 16x16 latents).
On one 2-core machine 8 "devices" share the same two cores, so this measures the overhead of
the sharded program (collectives, per-device partitioning), not a speed-up.

  python benchmarks/bench_train.py                # tiny + mid, 1 vs 8 devices
  python benchmarks/bench_train.py --smoke        # the trainer's test model on 2 devices
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def train_config(name: str):
    """The training ConfigDict of a benchmark config ('test', 'tiny', 'mid')."""
    from vd_jax.config import load_config
    if name in ('test', 'tiny'):
        cfg = load_config('train_tiny' + (':test' if name == 'test' else ''))
        return cfg
    from configs import common as cc
    from configs import train_common
    image = cc.tiny_image_stream()
    image.update(model_channels=64, channel_mult=[1, 2, 4], num_res_blocks=[1, 1, 1],
                 attention_resolutions=[2, 4], num_heads=4, context_dim=128)
    text = cc.tiny_text_stream()
    text.update(input_channels=64, output_channels=64, model_channels=64, channel_mult=[1, 2, 4],
                num_noattn_blocks=[1, 1, 1], second_dim=[4, 4, 4], with_attn=[False, True, True],
                num_heads=4, context_dim=128)
    root = cc.wrap(cc.model_config(dict(image=image, text=text), tiny=True, name='vd_bench_mid'), 'mid')
    # the context encoders' widths must match the diffuser's context width
    root.model.ctx.image.projection_dim = 128
    root.model.ctx.text.projection_dim = 128
    root.model.vae.text.latent_size = 64
    cfg = train_common.train_config(root, ['t2i', 'i2i', 'i2t', 't2t'], 'mid')
    cfg.init.method = 'random'
    cfg.data.latent_size = 16
    cfg.data.context_len = {'text': 16, 'image': 17}
    # no CFG dropout: its unconditional contexts come from the frozen encoders (77 / 257
    # tokens), not the 16 / 17 synthetic tokens of this config (and the step measured here
    # before CFG dropout existed had none)
    cfg.cfg_dropout.p = 0.0
    cfg.optimizer.warmup_steps = 10
    return cfg


def child(args) -> dict:
    import numpy as np
    import jax
    from vd_jax import sharding as shd
    from vd_jax import train as trainer
    from vd_jax.train.settings import needed_fields
    n_dev = len(jax.devices())
    cfg = train_config(args.config)
    cfg.batch_size = args.batch
    cfg.init.method = 'random'
    if n_dev > 1:
        cfg.mesh = dict(data=n_dev // args.fsdp, fsdp=args.fsdp, model=1)
    else:
        cfg.mesh = dict(data=1, fsdp=1, model=1)
    t0 = time.perf_counter()
    run = trainer.setup(cfg, '/tmp/vd_bench_train_unused')
    state = trainer.initial_state(run)
    t_setup = time.perf_counter() - t0
    # one constant synthetic batch with every field the flows read
    rng = np.random.default_rng(0)
    b, ls = args.batch, int(cfg.data.latent_size)
    streams = cfg.model.diffuser.streams
    shapes = {'index': (b,), 'latent_image': (b, ls, ls, int(streams.image.in_channels)),
              'latent_text': (b, int(streams.text.input_channels)),
              'context_image': (b, int(cfg.data.context_len['image']), int(streams.image.context_dim)),
              'context_text': (b, int(cfg.data.context_len['text']), int(streams.text.context_dim))}
    local = {}
    for f in needed_fields(run.sc.flows):
        local[f] = (np.arange(b, dtype=np.int32) if f == 'index'
                    else rng.standard_normal(shapes[f], dtype=np.float32))
    batch = dict(shd.global_batch(local, run.mesh, run.sc.rules), **run.consts)
    t0 = time.perf_counter()
    state, m = run.step_fn(state, batch)
    loss0 = float(m['loss'])
    t_first = time.perf_counter() - t0
    times = []
    for _ in range(args.warmup):
        state, m = run.step_fn(state, batch)
        float(m['loss'])
    for _ in range(args.reps):
        t0 = time.perf_counter()
        state, m = run.step_fn(state, batch)
        float(m['loss'])
        times.append(time.perf_counter() - t0)
    st = common.stats(times)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
    from vd_jax.train.observe import step_flops  # what train.py logs as perf/tflops_per_device
    flops = step_flops(run.step_fn, state, batch, run.sc, run.mesh)
    return dict(config=args.config, devices=n_dev, mesh=dict(run.mesh.shape), batch=b,
                latent_size=ls, context_len=dict(cfg.data.context_len),
                flows=[f[0] for f in run.sc.flows], params=n_params, setup_s=t_setup,
                first_step_s=t_first, step=st, examples_per_s=b / st['median'],
                flops_per_step_per_device=flops,
                tflops_per_device=flops / st['median'] / 1e12 if flops else None,
                loss_first=loss0, loss_last=float(m['loss']), peak_rss_gib=common.gib(common.peak_rss()))


def main(argv=None):
    ap = common.base_parser(__doc__.split('\n\n')[0])
    ap.add_argument('--configs', nargs='+', default=None, help="from 'test', 'tiny', 'mid'")
    ap.add_argument('--devices', type=int, nargs='+', default=None, help='host device counts')
    ap.add_argument('--batch', type=int, default=None, help='global batch (same for every count)')
    ap.add_argument('--fsdp', type=int, default=2, help='size of the fsdp axis on multi-device meshes')
    ap.add_argument('--config', help=argparse_hidden())
    args = ap.parse_args(argv)
    args.reps = args.reps or (1 if args.smoke else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 1)
    args.batch = args.batch or 8
    if args.config:
        common.setup(args.threads, jaxlib_defaults=args.xla_default)
        print(json.dumps(child(args), default=str))
        return
    configs = args.configs or (['test'] if args.smoke else ['tiny', 'mid'])
    devices = args.devices or ([2] if args.smoke else [1, 8])
    rec = dict(benchmark='train_step', args=vars(args), machine=common.machine_info(), runs=[])
    common.setup(args.threads, jaxlib_defaults=args.xla_default)
    common.machine_peaks(rec, args.smoke)  # MFU = TFLOP/s of all devices / the f32 GEMM peak
    me = os.path.abspath(__file__)
    for c in configs:
        for n in devices:
            print(f'== {c}, {n} device(s), global batch {args.batch}')
            env = {'XLA_FLAGS': (os.environ.get('XLA_FLAGS', '') +
                                 f' --xla_force_host_platform_device_count={n}').strip()}
            r = common.run_child([me, '--config', c, '--batch', str(args.batch), '--reps', str(args.reps),
                                  '--warmup', str(args.warmup), '--fsdp', str(min(args.fsdp, n)),
                                  '--threads', str(args.threads)], env=env)
            rec['runs'].append(r)
            print(f"  mesh {r['mesh']}: step {common.fmt_s(r['step'])}, {r['examples_per_s']:.2f} ex/s, "
                  f"first step (compile) {r['first_step_s']:.1f}s, "
                  f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    common.write_record('bench_train', rec, args.out, args.smoke)
    print_tables(rec)
    return rec


def print_tables(rec):
    rows = []
    peak = common.peak_of(rec.get('gemm') or {}, 'jax')  # GFLOP/s of jax's f32 GEMM
    for r in rec['runs']:
        one = next((x for x in rec['runs'] if x['config'] == r['config'] and x['devices'] == 1), None)
        rel = f"{r['step']['median'] / one['step']['median']:.2f}x" if one else '-'
        rows.append((r['config'], f"{r['params']:,}", r['devices'], r['mesh'], r['batch'],
                     common.fmt_s(r['step']), f"{r['examples_per_s']:.2f}", rel,
                     f"{r['first_step_s']:.1f}", r['peak_rss_gib'], _mfu(r, peak)))
    print('\nTraining step (4 flows, AdamW + EMA, float32)\n' +
          common.table(['config', 'params', 'devices', 'mesh', 'global batch', 'step s',
                        'examples/s', 'cost/example vs 1 device', 'first step s', 'peak RSS GiB',
                        'GFLOP/s (MFU vs jax GEMM)'], rows))


def _mfu(r, peak) -> str:
    """XLA's FLOPs of the step (all devices; host devices share the cores) per second, and
    their share of the machine's measured jax f32 GEMM peak."""
    if not r.get('tflops_per_device'):
        return '-'
    gf = r['tflops_per_device'] * r['devices'] * 1e3
    return f'{gf:.1f} ({100 * gf / peak:.0f}%)' if peak else f'{gf:.1f}'


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == '__main__':
    main()
