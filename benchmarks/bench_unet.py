"""Image stream at full width: diffusers `UNet2DConditionModel` (SD-v1 / VD `image_unet`
config, random weights) against our `Diffuser`, converted from it by our converter.

Measures, in ONE process with PyTorch and JAX interleaved (torch at `--threads` threads):
  * parity: max |eps_torch - eps_jax| of one forward (batch 2, smallest latent size);
  * per-step time of a classifier-free-guidance DDIM step (batch 2 = uncond + cond, one UNet
    call, guidance, DDIM update) at every `--sizes` latent: diffusers under
    `torch.inference_mode` + `DDIMScheduler.step` vs our jitted step (`make_eps_fn` ->
    `cfg_denoise`, `run_steps`: the sampler's own step code);
  * FLOPs of one forward (torch's counter with the CPU-SDPA formula registered; XLA's cost
    analysis; dot/conv FLOPs parsed from the optimised HLO), achieved FLOP/s, and the f32
    GEMM peak of numpy / torch / jax measured at the start of the same run;
  * the whole DDIM text->image loop (`--loop-steps`, default 50) at the first size for both,
    parity of the final latents, and XLA compile time of the jitted loop for several step
    counts (one `lax.scan`: it must not grow with the steps);
  * peak RSS of a sampler process per side (`--probes`: fresh child processes that build one
    side and run a short guided DDIM loop at the largest size).

VD's text->image step is image data layers + text context layers at context length 77; the
converted stream here runs its own (image) context layers at length 77, which is the same
computation (same widths and heads).

  python benchmarks/bench_unet.py                      # full width, ~25 min on 2 cores
  python benchmarks/bench_unet.py --xla-default --attention dense   # jaxlib defaults, dense attn
  python benchmarks/bench_unet.py --smoke              # tiny config, seconds (CI)
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GUIDANCE = 7.5
CTX_LEN = 77


def unet_config(smoke: bool) -> dict:
    """diffusers constructor arguments of VD's image_unet (SD-v1), or the tiny test config."""
    if smoke:
        return dict(sample_size=16, in_channels=4, out_channels=4, flip_sin_to_cos=True,
                    freq_shift=0, block_out_channels=(32, 64, 64), layers_per_block=1,
                    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32,
                    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
                    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'))
    return dict(sample_size=64, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
                up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3)


def model_config(smoke: bool):
    """Our config with just the image stream (global + data + context layers)."""
    from vd_jax.config import load_config
    return load_config('vd_basic:tiny' if smoke else 'vd_basic').model


def ddim_scheduler(steps: int):
    """diffusers DDIM configured as VD's sampler: 'leading' grid + offset 1 (t = 981..1),
    last step to alpha_bar[0], no clipping (= our 'uniform' plan)."""
    from diffusers import DDIMScheduler
    s = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule='scaled_linear', clip_sample=False, set_alpha_to_one=False,
                      steps_offset=1, timestep_spacing='leading')
    s.set_timesteps(steps)
    return s


def build_torch(smoke: bool, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(smoke)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            if p.ndim == 1:  # norm affines/biases off their defaults: permutations cannot hide
                p.add_(0.1 * torch.randn_like(p))
    return unet


def to_device(flat_np: dict):
    """numpy leaves -> jax arrays one at a time, dropping each numpy array as it goes (the
    full-width trees are GBs; never hold two extra copies)."""
    import jax.numpy as jnp
    from vd_jax.checkpoint import unflatten
    out = {}
    for k in list(flat_np):
        out[k] = jnp.asarray(flat_np.pop(k))
    return unflatten(out)


def convert(unet, cfg):
    """Our converter on the diffusers state dict (layout 'diffusers', prefix image_unet.)."""
    from vd_jax.checkpoint import flatten
    from vd_jax.convert import convert_checkpoint
    sd = {f'image_unet.{k}': v for k, v in unet.state_dict().items()}
    t0 = time.perf_counter()
    params = convert_checkpoint(sd, cfg)['diffuser']
    t_conv = time.perf_counter() - t0
    del sd
    return to_device(flatten(params)), t_conv


def cfg_setup(smoke: bool):
    """What the A/B scripts share: diffusers' UNet and its conversion, the DDIM scheduler, the
    torch CFG step and the (uncond, cond) contexts on both sides. Returns a namespace with cfg,
    unet, params, sched, tstep, ctx2 (torch, uncond first), jctx, juctx and the torch
    generator g that drew the contexts (draw the latents from it next)."""
    import types
    cfg = model_config(smoke)
    unet = build_torch(smoke)
    params, _ = convert(unet, cfg)
    sched = ddim_scheduler(50)
    tstep = common.torch_cfg_step(unet, sched, GUIDANCE)
    g, ctx2, jctx, juctx = draw_contexts(smoke)
    return types.SimpleNamespace(cfg=cfg, unet=unet, params=params, sched=sched, tstep=tstep,
                                 g=g, ctx2=ctx2, jctx=jctx, juctx=juctx)


def draw_contexts(smoke: bool):
    """The benchmarks' (cond, uncond) contexts, drawn in that order from a torch generator
    seeded 1: returns (g, ctx2 = [uncond; cond] for torch, jctx, juctx for jax); g draws the
    latents next."""
    import torch
    import jax.numpy as jnp
    cd = unet_config(smoke)['cross_attention_dim']
    g = torch.Generator().manual_seed(1)
    ctx, uctx = (torch.randn(1, CTX_LEN, cd, generator=g) for _ in range(2))
    return g, torch.cat([uctx, ctx]), jnp.asarray(ctx.numpy()), jnp.asarray(uctx.numpy())


class JaxSide:
    """Our jitted CFG DDIM step and loop over the converted params."""

    def __init__(self, model, params, steps: int, schedule_cfg, xtype: str = 'image',
                 ctype: str = 'image', shares_x: bool = True):
        import jax
        import jax.numpy as jnp
        from vd_jax.diffusion import sampling
        from vd_jax.diffusion.schedule import make_schedule
        self.jax, self.jnp, self.sampling = jax, jnp, sampling
        self.model, self.params, self.shares_x = model, params, shares_x
        self.schedule = make_schedule(schedule_cfg)
        self.plan = sampling.make_plan('ddim', steps)

        def apply_fn(p, x, t, c):
            return model.apply({'params': p}, x, t, c, xtype, ctype)
        self.apply_fn = apply_fn
        self.forward = jax.jit(apply_fn)

        def step(p, x, pos, ctx, uctx, schedule):
            eps_fn = sampling.make_eps_fn(self.denoise_fn(p), ctx, uncond_context=uctx,
                                          guidance_scale=GUIDANCE)
            st = sampling.SamplerState(x=x, pred_x0=jnp.zeros_like(x), keys=None)
            return sampling.run_steps(eps_fn, schedule, self.plan, st, pos[None]).x
        self.step = jax.jit(step)

    def denoise_fn(self, p):
        """denoise(x_t, t, ctx) over params p, marked as the pipeline's `conditioning.Single`
        is: guidance passes x once and the diffuser repeats it after the first self-attention
        (`guidance.SHARES_X`); shares_x=False repeats x up front (the previous program)."""
        from vd_jax.diffusion.guidance import mark_shares_x

        def denoise(xt, t, c):
            return self.apply_fn(p, xt, t, c)
        return mark_shares_x(denoise, self.shares_x)

    def loop_fn(self, steps: int):
        """The whole guided DDIM loop (`sampling.sample`, one lax.scan) as a jittable function."""
        sampling = self.sampling

        def loop(p, x_T, ctx, uctx, schedule):
            return sampling.sample(self.denoise_fn(p), schedule, ctx,
                                   uncond_context=uctx, guidance_scale=GUIDANCE, sampler='ddim',
                                   steps=steps, x_T=x_T)
        return loop


def main(argv=None):
    ap = common.base_parser(__doc__.split('\n\n')[0])
    ap.add_argument('--sizes', type=int, nargs='+', default=None, help='latent sizes (default 32 64)')
    ap.add_argument('--loop-steps', type=int, default=None, help='steps of the whole loop (0: skip)')
    ap.add_argument('--compile-steps', type=int, nargs='*', default=None,
                    help='step counts whose loop compile time is measured')
    ap.add_argument('--no-probes', action='store_true', help='skip the per-side RSS probes')
    ap.add_argument('--no-gemm', action='store_true', help='skip the GEMM peak measurement')
    ap.add_argument('--attention', choices=('auto', 'dense', 'blockwise'), default='auto',
                    help="our Diffuser's attention implementation (auto: blockwise above 512 keys)")
    ap.add_argument('--probe', choices=('torch', 'jax'), help=argparse_hidden())
    ap.add_argument('--probe-size', type=int, default=None, help=argparse_hidden())
    args = ap.parse_args(argv)
    common.setup(args.threads, jaxlib_defaults=args.xla_default)
    if args.probe:
        return probe(args)
    smoke = args.smoke
    sizes = args.sizes or ([16] if smoke else [32, 64])
    loop_steps = args.loop_steps if args.loop_steps is not None else (2 if smoke else 50)
    compile_steps = args.compile_steps if args.compile_steps is not None else \
        ([2] if smoke else [1, 10, 50])
    warmup = args.warmup if args.warmup is not None else 1
    reps = args.reps if args.reps is not None else (1 if smoke else 5)

    import numpy as np
    import torch
    import jax
    import jax.numpy as jnp
    from vd_jax.models.unet import Diffuser

    rec = dict(benchmark='unet_image_stream', args=vars(args), machine=common.machine_info())
    log = print
    if not args.no_gemm:
        common.machine_peaks(rec, smoke, log=log)

    log('== build diffusers UNet2DConditionModel and convert it')
    cfg = model_config(smoke)
    t0 = time.perf_counter()
    unet = build_torch(smoke)
    n_params = sum(p.numel() for p in unet.parameters())
    t_build = time.perf_counter() - t0
    mem_torch = common.rss()
    params, t_conv = convert(unet, cfg)
    n_jax = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    mem_both = common.rss()
    rec['model'] = dict(torch_params=n_params, jax_params=n_jax, torch_build_s=t_build,
                        convert_s=t_conv, rss_after_torch_gib=common.gib(mem_torch['rss']),
                        rss_after_convert_gib=common.gib(mem_both['rss']))
    log(f'  params torch {n_params:,} / ours {n_jax:,}; build {t_build:.1f}s, convert {t_conv:.1f}s')
    model = Diffuser(cfg.diffuser, attention=args.attention)
    js = JaxSide(model, params, loop_steps or 50, cfg.schedule)
    sched = ddim_scheduler(loop_steps or 50)
    tstep = common.torch_cfg_step(unet, sched, GUIDANCE)
    g, ctx2, jctx, juctx = draw_contexts(smoke)

    # -- parity of one forward ----------------------------------------------------------
    log('== parity (one forward, batch 2)')
    s0 = sizes[0]
    x2 = torch.randn(2, 4, s0, s0, generator=g)
    t2 = torch.tensor([981, 981])
    with torch.inference_mode():
        ref = unet(x2, t2, encoder_hidden_states=ctx2).sample.numpy()
    t0 = time.perf_counter()
    ours = np.asarray(js.forward(params, jnp.asarray(x2.numpy().transpose(0, 2, 3, 1)),
                                 jnp.asarray(t2.numpy()), jnp.concatenate([juctx, jctx])))
    t_first_fwd = time.perf_counter() - t0
    ours = ours.transpose(0, 3, 1, 2)
    rec['parity'] = dict(size=s0, max_abs_diff=float(np.abs(ours - ref).max()),
                         max_abs_ref=float(np.abs(ref).max()),
                         rel_l2=float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)))
    log(f"  max |diff| = {rec['parity']['max_abs_diff']:.3g} (max |ref| {rec['parity']['max_abs_ref']:.3g}); "
        f'first jitted forward (compile+run) {t_first_fwd:.1f}s')

    # -- per-step time, FLOPs ------------------------------------------------------------
    rec['step'] = {}
    for s in sizes:
        log(f'== CFG DDIM step, batch 2, latent {s}x{s}')
        x = torch.randn(1, 4, s, s, generator=g)
        rec['step'][str(s)] = time_cfg_step(js, params, unet, tstep, x, sched.timesteps[0], ctx2,
                                            jctx, juctx, reps=reps, warmup=warmup, log=log)

    # -- whole loop and compile time vs steps --------------------------------------------
    if loop_steps:
        s = sizes[0]
        log(f'== compile time of the jitted {s}x{s} loop vs steps')
        x_T = torch.randn(1, 4, s, s, generator=g)
        jx_T = jnp.asarray(x_T.numpy().transpose(0, 2, 3, 1))
        comp = {}
        compiled_loop = None
        for n in sorted(set(compile_steps) | {loop_steps}):
            fn = jax.jit(js.loop_fn(n))
            t0 = time.perf_counter()
            lowered = fn.lower(params, jx_T, jctx, juctx, js.schedule)
            t_lower = time.perf_counter() - t0
            c = lowered.compile()
            t_c = time.perf_counter() - t0 - t_lower
            comp[str(n)] = dict(trace_lower_s=t_lower, compile_s=t_c,
                                hlo_chars=len(c.as_text()))
            log(f'  {n:3d} steps: trace+lower {t_lower:.2f}s, compile {t_c:.2f}s, '
                f'HLO {len(c.as_text()):,} chars')
            if n == loop_steps:
                compiled_loop = c
        rec['compile_vs_steps'] = comp
        log(f'== whole {loop_steps}-step DDIM loop at {s}x{s} (one run per side)')
        sched.set_timesteps(loop_steps)

        def torch_loop():
            xx = x_T.clone()
            for tt in sched.timesteps:
                xx = tstep(xx, tt, ctx2)
            return xx
        out = {}
        order = ['jax', 'torch'] if not smoke else ['torch', 'jax']
        for side in order:
            t0 = time.perf_counter()
            if side == 'torch':
                out['torch'] = torch_loop().numpy()
            else:
                out['jax'] = np.asarray(compiled_loop(params, jx_T, jctx, juctx, js.schedule)
                                        ).transpose(0, 3, 1, 2)
            out[side + '_s'] = time.perf_counter() - t0
            log(f'  {side}: {out[side + "_s"]:.1f}s')
        rec['loop'] = dict(size=s, steps=loop_steps, torch_s=out['torch_s'], jax_s=out['jax_s'],
                           speedup=out['torch_s'] / out['jax_s'],
                           jax_compile_s=comp[str(loop_steps)]['compile_s'],
                           final_max_abs_diff=float(np.abs(out['torch'] - out['jax']).max()),
                           final_max_abs=float(np.abs(out['torch']).max()))
        log(f"  speed-up {rec['loop']['speedup']:.2f}x; final latents max |diff| "
            f"{rec['loop']['final_max_abs_diff']:.3g} (max |x0| {rec['loop']['final_max_abs']:.3g})")

    del unet, params, js
    # -- peak RSS of a sampler process per side ------------------------------------------
    if not args.no_probes:
        ps = args.probe_size or sizes[-1]
        log(f'== peak RSS of a sampler process per side (child processes, {ps}x{ps})')
        rec['probes'] = {}
        for side in ('torch', 'jax'):
            argv = [os.path.abspath(__file__), '--probe', side, '--probe-size', str(ps),
                    '--threads', str(args.threads)] + (['--smoke'] if smoke else []) + \
                ['--attention', args.attention]
            rec['probes'][side] = common.run_child(argv)
            p = rec['probes'][side]
            log(f"  {side}: peak RSS {p['peak_rss_gib']:.2f} GiB (after build {p['rss_built_gib']:.2f}, "
                f"baseline after imports {p['rss_imports_gib']:.2f})")

    common.write_record('bench_unet', rec, args.out, smoke)
    print_tables(rec)
    return rec


def time_cfg_step(js, params, unet, tstep, x, t, ctx2, jctx, juctx, reps, warmup, log) -> dict:
    """One CFG DDIM step, batch 2, at the size of x (1, 4, s, s), torch vs jax: compile time,
    interleaved times, step parity and FLOPs. A function rather than main's loop body so the
    timed closures bind this size's inputs and nothing outlives the call (main deletes the
    models afterwards)."""
    import numpy as np
    import torch
    import jax.numpy as jnp
    jx = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    pos = jnp.asarray(0, jnp.int32)
    t0 = time.perf_counter()
    compiled = js.step.lower(params, jx, pos, jctx, juctx, js.schedule).compile()
    t_compile = time.perf_counter() - t0
    fns = {'torch': lambda: tstep(x, t, ctx2),
           'jax': lambda: compiled(params, jx, pos, jctx, juctx, js.schedule).block_until_ready()}
    # step parity (guidance + DDIM update on top of the forward)
    d = float(np.abs(np.asarray(fns['jax']()).transpose(0, 3, 1, 2) - fns['torch']().numpy()).max())
    times = common.interleaved(fns, reps=reps, warmup=warmup, log=log)
    with torch.inference_mode():
        fl_t = common.torch_flops(lambda: unet(torch.cat([x, x]), t, encoder_hidden_states=ctx2))
    xla = common.xla_cost(compiled)
    hlo = common.hlo_dot_conv_flops(compiled)
    r = dict(torch=times['torch'], jax=times['jax'], compile_s=t_compile,
             speedup=times['torch']['median'] / times['jax']['median'],
             step_max_abs_diff=d, flops_torch_counter=fl_t['total'],
             flops_torch_per_op=fl_t['per_op'], flops_xla_cost=xla.get('flops'),
             xla_bytes_accessed=xla.get('bytes accessed'), flops_hlo_dot_conv=hlo)
    fl = fl_t['total']
    r['gflops_torch'] = fl / times['torch']['median'] / 1e9
    r['gflops_jax'] = fl / times['jax']['median'] / 1e9
    log(f"  torch {common.fmt_s(times['torch'])} | jax {common.fmt_s(times['jax'])} | "
        f"speed-up {r['speedup']:.2f}x | compile {t_compile:.1f}s | step |diff| {d:.2g}")
    log(f"  FLOPs torch {fl / 1e9:.1f} G, HLO dot+conv {hlo / 1e9:.1f} G, "
        f"XLA cost {xla.get('flops', 0) / 1e9:.1f} G")
    return r


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


def probe(args):
    """Child process: build one side, run a 2-step guided DDIM loop, report peak RSS."""
    import json
    import numpy as np
    smoke, size, steps = args.smoke, args.probe_size, 2
    if args.probe == 'torch':
        import torch
        r0 = common.rss()
        unet = build_torch(smoke)
        r1 = common.rss()
        sched = ddim_scheduler(steps)
        step = common.torch_cfg_step(unet, sched, GUIDANCE)
        cd = unet_config(smoke)['cross_attention_dim']
        ctx2 = torch.randn(2, CTX_LEN, cd)
        x = torch.randn(1, 4, size, size)
        for t in sched.timesteps:
            x = step(x, t, ctx2)
    else:
        import jax
        import jax.numpy as jnp
        from vd_jax.diffusion.sampling import Sampler
        from vd_jax.diffusion.schedule import make_schedule
        from vd_jax.models.init import random_params
        from vd_jax.models.init import abstract_params
        from vd_jax.models.unet import Diffuser
        cfg = model_config(smoke)
        model = Diffuser(cfg.diffuser, attention=args.attention)
        r0 = common.rss()
        params = random_params(abstract_params(model))
        jax.block_until_ready(params)
        r1 = common.rss()

        def apply_fn(p, x, t, c):
            return model.apply({'params': p}, x, t, c, 'image', 'image')
        sampler = Sampler(apply_fn, steps=steps)
        cd = cfg.diffuser['streams']['image']['context_dim']
        ctx = jnp.ones((1, CTX_LEN, cd))
        z = sampler(params, make_schedule(cfg.schedule), ctx, uncond_context=0 * ctx,
                    seeds=jnp.arange(1), shape=(1, size, size, 4), guidance_scale=GUIDANCE)
        np.asarray(z)
    print(json.dumps(dict(side=args.probe, size=size, steps=steps,
                          rss_imports_gib=common.gib(r0['rss']), rss_built_gib=common.gib(r1['rss']),
                          peak_rss_gib=common.gib(common.peak_rss()))))


def print_tables(rec):
    gm = rec.get('gemm')
    if gm:
        rows = [(lib, n, round(v['gflops_median'], 1), round(v['gflops_min'], 1), round(v['gflops_max'], 1))
                for lib, d in gm.items() for n, v in d.items()]
        print('\nf32 GEMM peak (GFLOP/s)\n' + common.table(['library', 'n', 'median', 'min', 'max'], rows))
    p = rec['parity']
    print(f"\nParity, one forward at {p['size']}x{p['size']}: max |diff| {p['max_abs_diff']:.3g}, "
          f"max |ref| {p['max_abs_ref']:.3g}, rel L2 {p['rel_l2']:.2g}")
    rows = []
    for s, r in rec['step'].items():
        rows.append((f'{s}x{s}', common.fmt_s(r['torch']), common.fmt_s(r['jax']),
                     f"{r['speedup']:.2f}x", f"{r['compile_s']:.1f}",
                     f"{r['flops_torch_counter'] / 1e9:.1f}",
                     common.pct(r['gflops_torch'], gm, 'torch'), common.pct(r['gflops_jax'], gm, 'jax'),
                     f"{r['step_max_abs_diff']:.2g}"))
    print('\nCFG DDIM step, batch 2, float32 (seconds, median (min-max, n); speed-up = diffusers / '
          'vd_jax; GFLOP/s = torch-counted FLOPs / median, in % of that library\'s f32 GEMM peak / '
          'of the best GEMM peak measured)\n' +
          common.table(['latent', 'diffusers s', 'vd_jax s', 'speed-up', 'compile s', 'GFLOP',
                        'diffusers GFLOP/s', 'vd_jax GFLOP/s', 'step |diff|'], rows))
    if 'compile_vs_steps' in rec:
        rows = [(n, f"{c['trace_lower_s']:.2f}", f"{c['compile_s']:.2f}", c['hlo_chars'])
                for n, c in rec['compile_vs_steps'].items()]
        print('\nCompile time of the jitted loop vs steps\n' +
              common.table(['steps', 'trace+lower s', 'compile s', 'HLO chars'], rows))
    if 'loop' in rec:
        lp = rec['loop']
        print(f"\nWhole {lp['steps']}-step loop at {lp['size']}x{lp['size']}: "
              f"diffusers {lp['torch_s']:.1f}s, "
              f"vd_jax {lp['jax_s']:.1f}s (+ compile {lp['jax_compile_s']:.1f}s once): "
              f"{lp['speedup']:.2f}x; final latents max |diff| {lp['final_max_abs_diff']:.3g}")
    if 'probes' in rec:
        rows = [(k, v['size'], v['rss_imports_gib'], v['rss_built_gib'], v['peak_rss_gib'])
                for k, v in rec['probes'].items()]
        print('\nPeak RSS of a sampler process (GiB)\n' +
              common.table(['side', 'latent', 'after imports', 'after build', 'peak'], rows))


if __name__ == '__main__':
    main()
