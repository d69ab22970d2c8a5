"""How much of the image-stream CFG step is the attention core, on each side, measured by
ablation rather than by a profiler (a trace adds a cost per XLA thunk, and the blockwise
attention is thousands of small thunks, so a profile over-states its share).

One process, PyTorch and JAX interleaved (ABBA), the CFG DDIM step of `bench_unet.py` (batch 2,
VD's image UNet at full width, random weights converted by our converter):
  torch          diffusers as shipped (AttnProcessor2_0: torch's CPU flash SDPA)
  torch_nocore   every attention core replaced by `q` (the q/k/v/out projections still run;
                 k and v feed a mean so nothing is dead code)
  jax            vd_jax as shipped (`attention='auto'`)
  jax_nocore     the same replacement in `vd_jax.models.attention`
  jax_repeat_x   vd_jax with x repeated for the two CFG halves up front (before the diffuser
                 shared the prefix up to its first self-attention: `guidance.SHARES_X`)
  jax_SHIFT      with --shifts (default: running): the blockwise core with that exponent
                 shift (`layers.blockwise_attention(shift=...)`; the shipped one is 'bound')
  jax_bw_QxK     with --blocks: the blockwise core with q_block=Q, k_block=K in every
                 self-attention above layers.BLOCKWISE_MIN_KEYS keys
The core's cost on a side is (side - side_nocore); the rest of the step is side_nocore. The
record keeps every time, the host (CPU family/model/flags) and the GEMM peaks of the run.

  python benchmarks/attention_share.py --sizes 64              # ~10 min on 2 cores
  python benchmarks/attention_share.py --sizes 64 --blocks 128x1024 64x4096
  python benchmarks/attention_share.py --smoke                 # tiny config, seconds (CI)
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_unet  # noqa: E402
import common  # noqa: E402


def _core_as_q(q, k, v, *args, dtype=None, **kwargs):
    """The attention core replaced by q (the shapes of the real output); k and v still used."""
    out = q + 0.0 * (k.mean() + v.mean())
    return out if dtype is None else out.astype(dtype)


@contextlib.contextmanager
def jax_core(variant):
    """Trace (and compile) vd_jax's attention modules with the core of `variant`: None as
    shipped, 'nocore', or (q_block, k_block)."""
    from vd_jax.models import attention as attn_mod
    from vd_jax.models import layers
    shipped = attn_mod.attention
    if variant == 'nocore':
        attn_mod.attention = _core_as_q
    elif variant is not None:
        opts = dict(variant)   # blockwise_attention's q_block / k_block / shift

        def blocks(q, k, v, num_heads, bias=None, scale=None, dtype=None, implementation='auto',
                   **kw):
            if bias is None and k.shape[1] > layers.BLOCKWISE_MIN_KEYS:
                d = q.shape[-1] // num_heads
                return layers.blockwise_attention(q, k, v, num_heads, d ** -0.5, dtype, **opts)
            return shipped(q, k, v, num_heads, bias=bias, scale=scale, dtype=dtype,
                           implementation=implementation, **kw)
        attn_mod.attention = blocks
    try:
        yield
    finally:
        attn_mod.attention = shipped


class TorchCoreAsQ:
    """diffusers attention processor: projections as AttnProcessor2_0, the core replaced by q."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        out = q + 0.0 * (k.mean() + v.mean())
        return attn.to_out[1](attn.to_out[0](out))


def main(argv=None):
    ap = common.base_parser(__doc__.split('\n\n')[0])
    ap.add_argument('--sizes', type=int, nargs='+', default=None, help='latent sizes (default 64)')
    ap.add_argument('--blocks', nargs='+', default=[], metavar='QxK',
                    help='extra vd_jax variants: blockwise query block x key block')
    ap.add_argument('--shifts', nargs='*', default=['running'], metavar='SHIFT',
                    help="extra vd_jax variants: blockwise attention with this exponent shift "
                         "('running', 'bound': vd_jax.models.layers.SHIFTS)")
    ap.add_argument('--no-gemm', action='store_true', help='skip the GEMM peak measurement')
    args = ap.parse_args(argv)
    blocks = [common.parse_pair(b, '--blocks') for b in args.blocks]
    common.setup(args.threads, jaxlib_defaults=args.xla_default)
    smoke = args.smoke
    sizes = args.sizes or ([16] if smoke else [64])
    warmup = args.warmup if args.warmup is not None else 1
    reps = args.reps if args.reps is not None else (1 if smoke else 5)

    import torch

    rec = dict(benchmark='attention_share', args=vars(args), machine=common.machine_info(),
               sizes={})
    log = print
    if not args.no_gemm:
        common.machine_peaks(rec, smoke, log=log)
    log('== build diffusers UNet2DConditionModel and convert it')
    ab = bench_unet.cfg_setup(smoke)
    cfg, unet, params, sched, tstep, g = ab.cfg, ab.unet, ab.params, ab.sched, ab.tstep, ab.g
    ctx2, jctx, juctx = ab.ctx2, ab.jctx, ab.juctx
    variants = {'jax': None, 'jax_nocore': 'nocore', 'jax_repeat_x': 'repeat_x',
                **{f'jax_{shift}': {'shift': shift} for shift in args.shifts},
                **{f'jax_bw_{qb}x{kb}': {'q_block': qb, 'k_block': kb} for qb, kb in blocks}}
    for s in sizes:
        log(f'== CFG DDIM step, batch 2, latent {s}x{s}')
        x = torch.randn(1, 4, s, s, generator=g)
        rec['sizes'][str(s)] = measure_size(x, variants, cfg, params, unet, tstep, sched, ctx2,
                                            jctx, juctx, reps, warmup, log)
    common.write_record('attention_share', rec, args.out, smoke)
    print_tables(rec)
    return rec


def measure_size(x, variants, cfg, params, unet, tstep, sched, ctx2, jctx, juctx, reps, warmup,
                 log) -> dict:
    """Every variant's CFG step at the size of x (1, 4, s, s), interleaved; a function so the
    timed closures bind this size's inputs."""
    import numpy as np
    import jax.numpy as jnp
    from diffusers.models.attention_processor import AttnProcessor2_0
    from vd_jax.models.unet import Diffuser
    t = sched.timesteps[0]
    pos = jnp.asarray(0, jnp.int32)
    jx = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    fns, compile_s, outs = {}, {}, {}
    for name, variant in variants.items():
        js = bench_unet.JaxSide(Diffuser(cfg.diffuser), params, 50, cfg.schedule,
                                shares_x=variant != 'repeat_x')
        t0 = time.perf_counter()
        with jax_core(None if variant == 'repeat_x' else variant):
            compiled = js.step.lower(params, jx, pos, jctx, juctx, js.schedule).compile()
        compile_s[name] = time.perf_counter() - t0
        fns[name] = (lambda c=compiled, sc=js.schedule:
                     c(params, jx, pos, jctx, juctx, sc).block_until_ready())
        outs[name] = np.asarray(fns[name]()).transpose(0, 3, 1, 2)

    def torch_with(processor):
        def run():
            unet.set_attn_processor(processor)
            try:
                return tstep(x, t, ctx2)
            finally:
                unet.set_attn_processor(AttnProcessor2_0())
        return run
    fns['torch'] = torch_with(AttnProcessor2_0())
    fns['torch_nocore'] = torch_with(TorchCoreAsQ())
    ref = {k: fns[k]().numpy() for k in ('torch', 'torch_nocore')}
    # every variant computes what its torch counterpart does (the ablated ones too)
    diffs = {name: float(np.abs(out - ref['torch_nocore' if name == 'jax_nocore'
                                          else 'torch']).max()) for name, out in outs.items()}
    times = common.interleaved(fns, reps=reps, warmup=warmup, log=log)
    med = {k: v['median'] for k, v in times.items()}
    return dict(times=times, compile_s=compile_s, max_abs_diff_vs_torch=diffs,
                core_s={'torch': med['torch'] - med['torch_nocore'],
                        'jax': med['jax'] - med['jax_nocore']},
                rest_s={'torch': med['torch_nocore'], 'jax': med['jax_nocore']})


def print_tables(rec):
    for s, r in rec['sizes'].items():
        med = {k: v['median'] for k, v in r['times'].items()}
        rows = [(k, f'{v:.3f}', f"{med['torch'] / v:.2f}x",
                 f"{r['max_abs_diff_vs_torch'].get(k, 0.0):.2g}") for k, v in med.items()]
        print(f'\nCFG DDIM step at {s}x{s}, batch 2, f32: median seconds, speed-up = diffusers / '
              'variant, max |diff| against the matching torch side\n' +
              common.table(['variant', 's', 'vs diffusers', 'max |diff|'], rows))
        c, rest = r['core_s'], r['rest_s']
        print(f"attention core: diffusers {c['torch']:.3f} s, vd_jax {c['jax']:.3f} s; "
              f"the rest of the step: diffusers {rest['torch']:.3f} s, vd_jax {rest['jax']:.3f} s")


if __name__ == '__main__':
    main()
