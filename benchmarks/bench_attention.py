"""The attention core alone: PyTorch's SDPA (what diffusers runs) against vd_jax's attention
forms, at the UNet's self-attention shapes (batch 2 = the CFG batch, 8 heads, 320 channels:
32x32 and 64x64 latents give 1024 and 4096 tokens) and its cross-attention (77 keys).

In one process, interleaved (ABBA), after warm-up:
  torch_sdpa     torch.nn.functional.scaled_dot_product_attention on (B, H, L, D), as
                 diffusers' AttnProcessor2_0 calls it (CPU: a blockwise flash kernel)
  packed_dense   the einsum over the packed (B, L, H, D) layout that vd_jax used first
                 (kept here, in the script, as the reference point of the layout lever)
  dense          vd_jax.models.layers.attention(implementation='dense'): head-major
  blockwise      vd_jax.models.layers.attention(implementation='blockwise')
  auto           what the model runs (blockwise above layers.BLOCKWISE_MIN_KEYS keys)
  blockwise_running  blockwise with the running-max shift (FlashAttention's; before the
                 fixed bound of `layers.blockwise_attention(shift='bound')`)
  bw_QxK         with --blocks QxK ...: blockwise with q_block=Q, k_block=K (the sweep that
                 chooses layers.Q_BLOCK / K_BLOCK; K >= the key count is one softmax per
                 query block, no online rescaling)
Every output is compared with torch's (max abs diff).

  python benchmarks/bench_attention.py            # ~2 min
  python benchmarks/bench_attention.py --smoke    # seconds (CI)
  python benchmarks/bench_attention.py --shapes 4096x4096 --blocks 64x4096 128x1024 --tag sweep
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HEADS, CHANNELS = 8, 320
SHAPES = ((1024, 1024), (4096, 4096), (1024, 77), (4096, 77))  # (query tokens, key tokens)
SMOKE_SHAPES = ((64, 64), (256, 256), (64, 7))


def packed_dense(q, k, v, num_heads):
    """Attention contracted in the packed layout (the form the head-major change replaced)."""
    import jax
    import jax.numpy as jnp
    b, lq, inner = q.shape
    d = inner // num_heads
    q4 = q.reshape(b, lq, num_heads, d)
    k4 = k.reshape(b, k.shape[1], num_heads, d)
    v4 = v.reshape(b, v.shape[1], num_heads, d)
    w = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q4, k4) * d ** -0.5, axis=-1)
    return jnp.einsum('bhqk,bkhd->bqhd', w, v4).reshape(b, lq, inner)


def main(argv=None):
    ap = common.base_parser(__doc__.split('\n\n')[0])
    ap.add_argument('--shapes', nargs='+', default=None, metavar='LQxLK',
                    help='(query, key) token counts to run (default: the UNet\'s four)')
    ap.add_argument('--blocks', nargs='+', default=[], metavar='QxK',
                    help='extra blockwise variants: query block x key block')
    args = ap.parse_args(argv)
    shapes = [common.parse_pair(x, '--shapes') for x in args.shapes] if args.shapes else None
    blocks = [common.parse_pair(x, '--blocks') for x in args.blocks]
    common.setup(args.threads, jaxlib_defaults=args.xla_default)
    reps = args.reps or (1 if args.smoke else 10)
    warmup = args.warmup if args.warmup is not None else 1

    import numpy as np
    import torch
    import torch.nn.functional as F
    import jax
    from vd_jax.models import layers

    heads, channels = (2, 32) if args.smoke else (HEADS, CHANNELS)
    rec = dict(benchmark='attention', args=vars(args), machine=common.machine_info(),
               heads=heads, channels=channels, block_min_keys=layers.BLOCKWISE_MIN_KEYS, runs=[])
    for lq, lk in shapes or (SMOKE_SHAPES if args.smoke else SHAPES):
        print(f'== {lq} queries x {lk} keys, batch 2, {heads} heads, {channels} channels')
        rng = np.random.default_rng(lq + lk)
        q, k, v = (rng.standard_normal((2, n, channels), dtype=np.float32) for n in (lq, lk, lk))
        tq, tk, tv = (torch.from_numpy(x).reshape(2, x.shape[1], heads, -1).transpose(1, 2)
                      for x in (q, k, v))
        jq, jk, jv = (jax.device_put(x) for x in (q, k, v))

        def torch_fn(tq=tq, tk=tk, tv=tv):  # bound now: the loop rebinds the names
            with torch.inference_mode():
                return F.scaled_dot_product_attention(tq, tk, tv)
        jits = {
            'packed_dense': jax.jit(lambda a, b, c: packed_dense(a, b, c, heads)),
            **{impl: jax.jit(lambda a, b, c, impl=impl: layers.attention(a, b, c, heads,
                                                                         implementation=impl))
               for impl in ('dense', 'blockwise', 'auto')},
            'blockwise_running': jax.jit(lambda a, b, c: layers.blockwise_attention(
                a, b, c, heads, (channels // heads) ** -0.5, shift='running')),
            **{f'bw_{qb}x{kb}': jax.jit(lambda a, b, c, qb=qb, kb=kb: layers.blockwise_attention(
                a, b, c, heads, (channels // heads) ** -0.5, q_block=qb, k_block=kb))
               for qb, kb in blocks}}
        ref = torch_fn().transpose(1, 2).reshape(2, lq, channels).numpy()
        fns, diffs = {'torch_sdpa': torch_fn}, {}
        for name, f in jits.items():
            out = np.asarray(f(jq, jk, jv))
            diffs[name] = float(np.abs(out - ref).max())
            fns[name] = lambda f=f, jq=jq, jk=jk, jv=jv: jax.block_until_ready(f(jq, jk, jv))
        times = common.interleaved(fns, reps, warmup, log=lambda s: None)
        run = dict(lq=lq, lk=lk, times=times, max_abs_diff_vs_torch=diffs)
        rec['runs'].append(run)
        base = times['torch_sdpa']['median']
        print('  ' + ', '.join(f"{n} {t['median'] * 1e3:.1f} ms ({base / t['median']:.2f}x)"
                               for n, t in times.items()))
    common.write_record('bench_attention', rec, args.out, args.smoke)
    print_tables(rec)
    return rec


def print_tables(rec):
    rows, names = [], ()
    for r in rec['runs']:
        names = tuple(r['times'])
        base = r['times']['torch_sdpa']['median']
        rows.append((f"{r['lq']} x {r['lk']}",
                     *[f"{r['times'][n]['median'] * 1e3:.1f} ({base / r['times'][n]['median']:.2f}x)"
                       for n in names],
                     f"{max(r['max_abs_diff_vs_torch'].values()):.1g}"))
    print(f"\nAttention core, batch 2, {rec['heads']} heads, {rec['channels']} channels, f32: "
          f"ms, median (speed-up vs torch SDPA); auto = blockwise above {rec['block_min_keys']} keys")
    print(common.table(['queries x keys', *names, 'max abs diff vs torch'], rows))


if __name__ == '__main__':
    main()
