"""Text stream at full width: diffusers `UNetFlatConditionModel` at VD's text_unet config
(1,708,848,448 parameters, random weights) against our text data + text context layers,
converted from it by our converter.

In one process, PyTorch and JAX interleaved: parity of one forward (batch 2), per-step time
of a guided DDIM step (batch 2 = uncond + cond) for diffusers (`torch.inference_mode` +
`DDIMScheduler.step`) and our jitted step, FLOPs (torch counter, XLA) and achieved FLOP/s
against the GEMM peak measured in the same run, and -- because this model is not FLOP-bound
(4 positions per sample, 6.8 GB of f32 weights) -- the weight-streaming bandwidth each side
achieves (parameter bytes / step time) against the machine's measured read bandwidth.

  python benchmarks/bench_text_unet.py           # full width (needs ~15 GB RAM)
  python benchmarks/bench_text_unet.py --smoke   # tiny config (CI)
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GUIDANCE = 7.5
CTX_LEN = 77


def text_unet_config(smoke: bool) -> dict:
    """diffusers constructor arguments of VD's text_unet (diffusers' VD conversion script), or
    the tiny test config."""
    if smoke:
        return dict(sample_size=None, in_channels=(16, 1, 1), out_channels=(16, 1, 1),
                    flip_sin_to_cos=True, freq_shift=0, block_out_channels=(32, 64, 64),
                    layers_per_block=1, cross_attention_dim=32, attention_head_dim=2,
                    norm_num_groups=32,
                    down_block_types=('DownBlockFlat', 'CrossAttnDownBlockFlat', 'CrossAttnDownBlockFlat'),
                    up_block_types=('CrossAttnUpBlockFlat', 'CrossAttnUpBlockFlat', 'UpBlockFlat'))
    return dict(sample_size=None, in_channels=(768, 1, 1), out_channels=(768, 1, 1),
                flip_sin_to_cos=True, freq_shift=0, block_out_channels=(320, 640, 1280, 1280),
                layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                norm_num_groups=32,
                down_block_types=('CrossAttnDownBlockFlat',) * 3 + ('DownBlockFlat',),
                up_block_types=('UpBlockFlat',) + ('CrossAttnUpBlockFlat',) * 3)


def model_config(smoke: bool):
    """Our config: the text stream (data + context layers) plus the image stream's global
    (time) layers, which the text stream borrows as in VD."""
    from configs import common as cc
    if smoke:
        streams = dict(image=cc.tiny_image_stream(['global']), text=cc.tiny_text_stream())
    else:
        streams = dict(image=cc.image_stream(['global']), text=cc.text_stream())
    return cc.model_config(streams, tiny=smoke, name='text_stream_bench')


def build_torch(smoke: bool, seed: int = 0):
    import torch
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import \
        UNetFlatConditionModel
    torch.manual_seed(seed)
    unet = UNetFlatConditionModel(**text_unet_config(smoke)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            if p.ndim == 1:  # norm affines/biases off their defaults: permutations cannot hide
                p.add_(0.1 * torch.randn_like(p))
    return unet


def convert(unet, cfg):
    """Our converter on the diffusers layout: `text_unet.*` plus the shared time MLP as
    `image_unet.time_embedding.*` (diffusers keeps a copy in each UNet)."""
    from bench_unet import to_device
    from vd_jax.checkpoint import flatten
    from vd_jax.convert import convert_checkpoint
    sd = {f'text_unet.{k}': v for k, v in unet.state_dict().items()}
    sd.update({f'image_unet.{k}': v for k, v in unet.state_dict().items()
               if k.startswith('time_embedding.')})
    t0 = time.perf_counter()
    params = convert_checkpoint(sd, cfg)['diffuser']
    t_conv = time.perf_counter() - t0
    del sd
    return to_device(flatten(params)), t_conv


def main(argv=None):
    ap = common.base_parser(__doc__.split('\n\n')[0])
    ap.add_argument('--no-gemm', action='store_true', help='skip the GEMM peak / bandwidth measurement')
    args = ap.parse_args(argv)
    common.setup(args.threads, jaxlib_defaults=args.xla_default)
    smoke = args.smoke
    warmup = args.warmup if args.warmup is not None else 1
    reps = args.reps if args.reps is not None else (1 if smoke else 7)

    import numpy as np
    import torch
    import jax
    import jax.numpy as jnp
    from bench_unet import JaxSide, ddim_scheduler
    from vd_jax.models.unet import Diffuser

    rec = dict(benchmark='unet_text_stream', args=vars(args), machine=common.machine_info())
    log = print
    if not args.no_gemm:
        common.machine_peaks(rec, smoke, bandwidth=True, log=log)

    log('== build diffusers UNetFlatConditionModel and convert it')
    cfg = model_config(smoke)
    t0 = time.perf_counter()
    unet = build_torch(smoke)
    n_params = sum(p.numel() for p in unet.parameters())
    t_build = time.perf_counter() - t0
    params, t_conv = convert(unet, cfg)
    n_jax = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    rec['model'] = dict(torch_params=n_params, jax_params=n_jax, torch_build_s=t_build,
                        convert_s=t_conv, rss_after_convert_gib=common.gib(common.rss()['rss']))
    log(f'  params torch {n_params:,} / ours {n_jax:,}; build {t_build:.1f}s, convert {t_conv:.1f}s')
    model = Diffuser(cfg.diffuser)
    js = JaxSide(model, params, 50, cfg.schedule, xtype='text', ctype='text')
    sched = ddim_scheduler(50)
    tstep = common.torch_cfg_step(unet, sched, GUIDANCE, flat=True)
    tc = text_unet_config(smoke)
    cd, width = tc['cross_attention_dim'], tc['in_channels'][0]

    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, CTX_LEN, cd, generator=g)
    uctx = torch.randn(1, CTX_LEN, cd, generator=g)
    ctx2 = torch.cat([uctx, ctx])
    jctx, juctx = jnp.asarray(ctx.numpy()), jnp.asarray(uctx.numpy())

    log('== parity (one forward, batch 2)')
    x2 = torch.randn(2, width, generator=g)
    t2 = torch.tensor([981, 981])
    with torch.inference_mode():
        ref = unet(x2[:, :, None, None], t2, encoder_hidden_states=ctx2).sample[:, :, 0, 0].numpy()
    ours = np.asarray(js.forward(params, jnp.asarray(x2.numpy()), jnp.asarray(t2.numpy()),
                                 jnp.concatenate([juctx, jctx])))
    rec['parity'] = dict(max_abs_diff=float(np.abs(ours - ref).max()),
                         max_abs_ref=float(np.abs(ref).max()),
                         rel_l2=float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)))
    log(f"  max |diff| = {rec['parity']['max_abs_diff']:.3g} (max |ref| {rec['parity']['max_abs_ref']:.3g})")

    log('== CFG DDIM step, batch 2')
    x = torch.randn(1, width, generator=g)
    jx = jnp.asarray(x.numpy())
    t = sched.timesteps[0]
    pos = jnp.asarray(0, jnp.int32)
    t0 = time.perf_counter()
    compiled = js.step.lower(params, jx, pos, jctx, juctx, js.schedule).compile()
    t_compile = time.perf_counter() - t0
    fns = {'torch': lambda: tstep(x, t, ctx2),
           'jax': lambda: compiled(params, jx, pos, jctx, juctx, js.schedule).block_until_ready()}
    d = float(np.abs(np.asarray(fns['jax']()) - fns['torch']().numpy()).max())
    times = common.interleaved(fns, reps=reps, warmup=warmup, log=log)
    with torch.inference_mode():
        fl_t = common.torch_flops(lambda: unet(torch.cat([x, x])[:, :, None, None], t,
                                               encoder_hidden_states=ctx2))
    xla = common.xla_cost(compiled)
    param_bytes = 4 * n_jax
    r = dict(torch=times['torch'], jax=times['jax'], compile_s=t_compile,
             speedup=times['torch']['median'] / times['jax']['median'], step_max_abs_diff=d,
             flops_torch_counter=fl_t['total'], flops_torch_per_op=fl_t['per_op'],
             flops_xla_cost=xla.get('flops'), xla_bytes_accessed=xla.get('bytes accessed'),
             flops_hlo_dot_conv=common.hlo_dot_conv_flops(compiled), param_bytes=param_bytes)
    for side in ('torch', 'jax'):
        r[f'gflops_{side}'] = fl_t['total'] / times[side]['median'] / 1e9
        r[f'weight_gbps_{side}'] = param_bytes / times[side]['median'] / 1e9
    rec['step'] = r
    log(f"  torch {common.fmt_s(times['torch'])} | jax {common.fmt_s(times['jax'])} | "
        f"speed-up {r['speedup']:.2f}x | compile {t_compile:.1f}s | step |diff| {d:.2g}")
    common.write_record('bench_text_unet', rec, args.out, smoke)
    print_tables(rec)
    return rec


def print_tables(rec):
    gm, bw = rec.get('gemm'), rec.get('bandwidth')
    if gm:
        rows = [(lib, n, round(v['gflops_median'], 1), round(v['gflops_min'], 1), round(v['gflops_max'], 1))
                for lib, d in gm.items() for n, v in d.items()]
        print('\nf32 GEMM peak (GFLOP/s)\n' + common.table(['library', 'n', 'median', 'min', 'max'], rows))
    if bw:
        print('read bandwidth (GB/s): ' + ', '.join(f"{k} {v['gbps_median']:.1f}" for k, v in bw.items()))
    p, r = rec['parity'], rec['step']
    print(f"\nParity, one forward: max |diff| {p['max_abs_diff']:.3g}, max |ref| {p['max_abs_ref']:.3g}, "
          f"rel L2 {p['rel_l2']:.2g}")
    bwm = {s: bw[s]['gbps_median'] if bw and s in bw else None for s in ('torch', 'jax')}
    rows = []
    for side in ('torch', 'jax'):
        rows.append(('diffusers' if side == 'torch' else 'vd_jax', common.fmt_s(r[side]),
                     common.pct(r['gflops_' + side], gm, side),
                     f"{r['weight_gbps_' + side]:.1f}" +
                     (f" ({100 * r['weight_gbps_' + side] / bwm[side]:.0f}%)" if bwm[side] else '')))
    print(f"\nText stream CFG DDIM step, batch 2, float32: speed-up {r['speedup']:.2f}x, "
          f"{r['flops_torch_counter'] / 1e9:.2f} GFLOP, {r['param_bytes'] / 1e9:.2f} GB of weights, "
          f"compile {r['compile_s']:.1f}s, step |diff| {r['step_max_abs_diff']:.2g}\n" +
          common.table(['side', 'step s', 'GFLOP/s (% own / best GEMM peak)',
                        'weight GB/s (% read bw)'], rows))


if __name__ == '__main__':
    main()
