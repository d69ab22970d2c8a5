"""Samplers (DDIM, DDPM, DPM-Solver++(2M)), classifier-free guidance and the jitted loop, on
analytic fake denoisers, against diffusers' schedulers step by step.

The fake denoiser is the exact eps-predictor for Gaussian data x0 ~ N(0, S2 I) plus a bounded
nonlinear term, so trajectories stay at unit scale (like scaled VAE latents) and errors are
measured where float32 resolves ~1e-7.
"""
import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_ddpm

from vd_jax.diffusion import make_schedule, q_sample
from vd_jax.diffusion import ddim, ddpm, sampling
from vd_jax.diffusion.guidance import cfg_denoise
from vd_jax.diffusion.schedule import schedule_arrays
from vd_jax.diffusion.sampling import Sampler, make_plan, sample

SCHED = make_schedule()             # the original VD buffers (float64 -> float32)
AC = np.asarray(SCHED.alphas_cumprod)
S2 = 0.5                            # data variance of the analytic denoiser
SHAPE = (2, 4, 4, 3)                # small NHWC latents
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')


def eps_jax(x, t, ctx=None):
    """Analytic eps(x_t, t[, ctx]) in JAX; ctx (B, L, C) shifts each sample by its mean."""
    a = jnp.asarray(AC)[t].reshape((-1,) + (1,) * (x.ndim - 1))
    tf = t.astype(jnp.float32).reshape(a.shape)
    x = x.astype(jnp.float32)
    e = jnp.sqrt(1 - a) * x / (S2 * a + 1 - a) + 0.1 * jnp.tanh(x) * jnp.cos(tf / 300.)
    if ctx is not None:
        e = e + 0.2 * jnp.mean(ctx.astype(jnp.float32), axis=(1, 2)).reshape(a.shape)
    return e


def eps_torch(x, t):
    """The same function in torch for diffusers (scalar timestep, no context)."""
    a = torch.tensor(AC[int(t)])
    return torch.sqrt(1 - a) * x / (S2 * a + 1 - a) + 0.1 * torch.tanh(x) * np.cos(int(t) / 300.)


def x_T_np(seed=0, shape=SHAPE):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def _step_fn(plan, eta):
    """One jitted loop-body call at a traced position: the code `sample` scans."""
    def eps_fn(x, t):
        return eps_jax(x, t)
    return jax.jit(lambda st, pos: sampling.run_steps(eps_fn, SCHED, plan, st, pos[None], eta=eta))


def _stepwise(plan, scheduler, *, eta=0.0, keys=None, inject=None, step_kwargs=None):
    """Drive diffusers' loop; at every step feed diffusers' current sample to our step and
    compare outputs. Returns (max abs error per step, final diffusers sample).

    `inject(noise)` routes our per-step noise into diffusers (variance_noise= or a patch)."""
    scheduler.set_timesteps(plan.num_steps)
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), plan.timesteps)
    step = _step_fn(plan, eta)
    noise_fn = jax.jit(sampling.step_noise, static_argnums=2)
    x = torch.from_numpy(x_T_np())
    state = sampling.init_state(SCHED, plan, x_T=x.numpy(), keys=keys)
    err = 0.
    for p, t in enumerate(scheduler.timesteps):
        kwargs = dict(step_kwargs or {})
        if inject is not None:
            noise = torch.from_numpy(np.array(noise_fn(state.keys, p, SHAPE[1:])))
            kwargs.update(inject(noise))
        ref = scheduler.step(eps_torch(x, t), t, x, **kwargs).prev_sample
        # our state keeps its own DPM++ history (pred_x0); x is reset to diffusers' sample
        state = step(state.replace(x=jnp.asarray(x.numpy())), jnp.int32(p))
        err = max(err, float(np.abs(np.asarray(state.x) - ref.numpy()).max()))
        x = ref
    return err, x.numpy()


# ----------------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------------

def test_ddim_grid_reproduces_original_quirks():
    plan = make_plan('ddim', 50)
    # make_ddim_timesteps('uniform') = arange(0, 1000, 20) + 1, fed to the model as is
    np.testing.assert_array_equal(plan.timesteps, (np.arange(0, 1000, 20) + 1)[::-1])
    assert plan.timesteps[0] == 981 and plan.timesteps[-1] == 1
    # alphas_prev = [alpha_bar[0]] + alpha_bar[ts[:-1]]: the last step targets alpha_bar[0]
    assert plan.prev[-1] == 0 and plan.prev[:-1] == plan.timesteps[1:]
    tab = sampling.step_tables(SCHED, plan, 0.5)
    assert float(tab['a_prev'][-1]) == AC[0] and abs(AC[0] - 0.99915) < 1e-6
    # sigma = eta sqrt((1-a_prev)/(1-a)(1-a/a_prev)), from the original's float32 alphas
    a, ap = AC[plan.timesteps[0]].astype(np.float64), AC[plan.prev[0]].astype(np.float64)
    np.testing.assert_allclose(tab['sigma'][0], 0.5 * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap)),
                               rtol=1e-6)
    # steps not dividing T: the original's grid is longer than `steps` (assert commented out)
    assert len(ddim.make_ddim_timesteps(30)) == 31
    with pytest.raises(ValueError, match='outside the 1000-step schedule'):
        make_plan('ddim', 1000, spacing='uniform')  # 'auto' falls back (tests/test_step_grids.py)


@pytest.mark.slow
@pytest.mark.parametrize('eta', [0.0, 0.7])
def test_ddim_matches_diffusers_stepwise(eta):
    # steps_offset=1 <=> the +1 quirk; set_alpha_to_one=False <=> alpha_bar[0] at the end.
    sch = DDIMScheduler(**BETAS, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    keys = jax.random.split(jax.random.key(1), SHAPE[0])
    plan = make_plan('ddim', 50)
    inject = (lambda noise: dict(variance_noise=noise)) if eta else None
    err, ref = _stepwise(plan, sch, eta=eta, keys=keys, inject=inject,
                         step_kwargs=dict(eta=eta))
    print(f'DDIM eta={eta} stepwise max abs err {err:.2e}')
    # diffusers builds alpha_bar by a float32 cumprod (ours: float64 then cast, as the original);
    # they differ by <1e-6 relative, and each step's float32 arithmetic on O(1) values by a few
    # ulp, so 1e-5 absolute is ~20x the observed error yet catches any formula slip.
    assert err < 1e-5
    # whole trajectory through the public one-shot API (errors accumulate over 50 steps)
    ours = jax.jit(lambda x: sample(eps_jax, SCHED, None, guidance_scale=1.0, x_T=x, keys=keys,
                                    eta=eta))(x_T_np())
    traj = float(np.abs(np.asarray(ours) - ref).max())
    print(f'DDIM eta={eta} trajectory max abs err {traj:.2e}')
    assert traj < 1e-5


# ----------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('steps,final', [(50, 'zero'), (10, 'zero'), (10, 'sigma_min'),
                                         (20, 'sigma_min')])
def test_dpmpp_2m_matches_diffusers_stepwise(steps, final):
    # final 'zero' <=> our clean-data target (set_alpha_to_one=True, the dpm++ default);
    # 'sigma_min' <=> alpha_bar[0]; then lower_order_final decides the last order (S < 15).
    sch = DPMSolverMultistepScheduler(**BETAS, algorithm_type='dpmsolver++', solver_order=2,
                                      final_sigmas_type=final)
    assert sch.config.timestep_spacing == 'linspace' and sch.config.lower_order_final
    plan = make_plan('dpm++', steps, set_alpha_to_one=(final == 'zero'))
    assert plan.second_order[0] is False and plan.second_order[1] is True
    assert plan.second_order[-1] is (final == 'sigma_min' and steps >= 15)
    err, ref = _stepwise(plan, sch)
    print(f'DPM++(2M) {steps} steps final={final} stepwise max abs err {err:.2e}')
    # diffusers goes through sigma = sqrt((1-a)/a) (float32) and back; ours reads alpha_bar;
    # float32 rounding of the two routes on O(1) samples stays far below 1e-5.
    assert err < 1e-5
    if steps == 10:  # one whole-trajectory check per final type
        ours = jax.jit(lambda x: sample(eps_jax, SCHED, None, guidance_scale=1.0, x_T=x,
                                        plan=plan))(x_T_np())
        traj = float(np.abs(np.asarray(ours) - ref).max())
        print(f'DPM++(2M) {steps} steps final={final} trajectory max abs err {traj:.2e}')
        assert traj < 1e-5


# ----------------------------------------------------------------------------------------
# DDPM
# ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('grid', ['full', 'uniform'])
def test_ddpm_matches_diffusers_stepwise(grid, monkeypatch):
    if grid == 'full':   # every t in 999..0, posterior buffers of the schedule
        sch = DDPMScheduler(**BETAS, clip_sample=False)
        plan = make_plan('ddpm', spacing='full')
    else:                # the DDIM grid 981..1 (steps_offset=1), last step to clean data
        sch = DDPMScheduler(**BETAS, clip_sample=False, steps_offset=1)
        plan = make_plan('ddpm', 50)
    assert plan.prev[-1] == -1
    keys = jax.random.split(jax.random.key(2), SHAPE[0])
    holder = {}
    # DDPMScheduler draws its own noise (no variance_noise=); route ours in instead.
    monkeypatch.setattr(scheduling_ddpm, 'randn_tensor', lambda *a, **k: holder['noise'])
    err, _ = _stepwise(plan, sch, keys=keys, inject=lambda n: holder.update(noise=n) or {})
    print(f'DDPM {grid} stepwise max abs err {err:.2e}')
    # 'uniform': both compute the strided posterior in float32 from alpha_bar: 1e-5 as DDIM.
    # 'full': we use the schedule's float64-computed posterior buffers (LDM p_sample); diffusers
    # recomputes them in float32, where 1 - alpha_bar_t (~1e-3 at t <= 2) loses ~3e-5 relative
    # precision to the rounding of alpha_bar itself. The test below shows ours is the accurate
    # one (1e-6 of the float64 posterior); diffusers' own error there is ~2.5e-5.
    assert err < (1e-5 if grid == 'uniform' else 5e-5)


def test_ddpm_full_grid_uses_float64_posterior_buffers():
    arrays = schedule_arrays()  # the float64 buffers before the float32 cast
    x, e = x_T_np(0).astype(np.float64), 0.5 * x_T_np(1).astype(np.float64)
    for t in (999, 500, 20, 5, 2, 1, 0):
        c1, c2, std = ddpm.schedule_posterior(SCHED, jnp.int32(t))
        got, _ = ddpm.ddpm_step(jnp.float32(x), jnp.float32(e), jnp.float32(AC[t]), c1, c2, std)
        a = arrays['alphas_cumprod'][t]
        want = (arrays['posterior_mean_coef1'][t] * (x - np.sqrt(1 - a) * e) / np.sqrt(a) +
                arrays['posterior_mean_coef2'][t] * x)
        np.testing.assert_allclose(got, want, atol=1e-6)  # float32 rounding of O(1) values
        assert (float(std) == 0.) == (t == 0)  # no noise on the last step
        if t:
            np.testing.assert_allclose(std, np.sqrt(arrays['posterior_variance'][t]), rtol=1e-6)


@pytest.mark.slow
def test_ddpm_on_ddim_grid_is_ddim_eta_one():
    # Posterior sampling between strided alphas is DDIM with eta = 1 (same mean and variance).
    keys = jax.random.split(jax.random.key(3), SHAPE[0])
    run = jax.jit(lambda x, k: (
        sample(eps_jax, SCHED, None, guidance_scale=1.0, x_T=x, keys=k, sampler='ddpm',
               steps=25, set_alpha_to_one=False),
        sample(eps_jax, SCHED, None, guidance_scale=1.0, x_T=x, keys=k, sampler='ddim',
               steps=25, eta=1.0)))
    a, b = run(x_T_np(), keys)
    np.testing.assert_allclose(a, b, atol=1e-5)  # two algebraic routes, float32 rounding


# ----------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------

def _counting(fn):
    calls = []

    def wrapped(x, t, ctx):
        calls.append(x.shape[0])
        return fn(x, t, ctx)
    return wrapped, calls


@pytest.mark.slow
def test_cfg_wrapper_one_batched_call_equals_two_pass_formula():
    rng = np.random.RandomState(0)
    x = jnp.asarray(x_T_np())
    t = jnp.array([981, 981])
    cond = (jnp.asarray(rng.randn(2, 3, 5), jnp.float32), {'b': jnp.asarray(rng.randn(2, 7, 2))})
    uncond = jax.tree.map(jnp.zeros_like, cond)
    # a pytree context: tuple of two contexts (dual-guided), one of them a dict

    def fn(x, t, c):
        return eps_jax(x, t, c[0]) + 0.3 * jnp.mean(c[1]['b'], (1, 2))[:, None, None, None]

    counted, calls = _counting(fn)
    got = cfg_denoise(counted, 7.5)(x, t, cond, uncond)
    assert calls == [4]          # ONE call over concat([x, x])
    e_u, e_c = fn(x, t, uncond), fn(x, t, cond)
    np.testing.assert_allclose(got, e_u + 7.5 * (e_c - e_u), atol=1e-5)
    # static scale 1: only the conditional pass, uncond not needed
    calls.clear()
    np.testing.assert_array_equal(cfg_denoise(counted, 1.0)(x, t, cond), e_c)
    assert calls == [2]
    with pytest.raises(ValueError, match='needs an uncond_context'):
        cfg_denoise(fn, 3.0)(x, t, cond)
    with pytest.raises(ValueError, match='differ in structure'):
        cfg_denoise(fn, 3.0)(x, t, cond, uncond[0])


def test_guidance_scale_one_equals_conditional_only_run():
    ctx = jnp.asarray(np.random.RandomState(1).randn(2, 3, 8), jnp.float32)
    unc = jnp.zeros_like(ctx)
    plan = make_plan('ddim', 10)
    run = jax.jit(lambda x, c, u, s: (
        sample(eps_jax, SCHED, c, guidance_scale=1.0, x_T=x, steps=10),   # static 1: cond only
        sample(eps_jax, SCHED, c, uncond_context=u, guidance_scale=s, x_T=x, steps=10),
        sample(eps_jax, SCHED, c, uncond_context=u, guidance_scale=1.0, x_T=x, steps=10),
        # the conditional-only run by hand: a plain eps(x, t, ctx) closure, no guidance code
        sampling.run_steps(lambda x_t, t: eps_jax(x_t, t, c), SCHED, plan,
                           sampling.init_state(SCHED, plan, x_T=x), plan.positions()).x))
    only_cond, traced_one, static_one, by_hand = run(x_T_np(), ctx, unc, jnp.float32(1.0))
    np.testing.assert_array_equal(only_cond, by_hand)
    np.testing.assert_array_equal(static_one, by_hand)
    # traced s = 1 runs the two-pass formula: e_u + (e_c - e_u) = e_c up to rounding
    np.testing.assert_allclose(traced_one, by_hand, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Image-variation "fidelity" start
# ----------------------------------------------------------------------------------------

def eps_numpy(x, t):
    a = np.float64(AC[t])
    return np.sqrt(1 - a) * x / (S2 * a + 1 - a) + 0.1 * np.tanh(x) * np.cos(t / 300.)


@pytest.mark.slow
@pytest.mark.parametrize('off_by_one', [True, False])
def test_fidelity_start_matches_original_loop(off_by_one):
    steps, k = 10, 4
    x0 = x_T_np(5)
    seeds = jnp.array([7, 8])
    # our sample, and the per-sample q_sample noise it used (initial noise of each seed)
    got, noise = jax.jit(lambda x0, s: (
        sample(eps_jax, SCHED, None, guidance_scale=1.0, steps=steps, x0=x0, keys=s,
               start_step=k, fidelity_off_by_one=off_by_one),
        sampling.per_sample_normal(sampling.fold_keys(sampling.as_keys(s), 0), x0.shape[1:])
    ))(x0, seeds)
    noise = np.asarray(noise, np.float64)
    # `DDIMSampler.ddim_sampling` with x_info['x0'] re-implemented in float64 numpy
    ts = np.arange(0, 1000, 1000 // steps) + 1
    alphas = AC[ts].astype(np.float64)
    alphas_prev = np.concatenate([[AC[0]], AC[ts[:-1]]]).astype(np.float64)
    x = np.sqrt(AC[ts[k]]) * x0 + np.sqrt(1 - AC[ts[k]]) * noise      # q_sample to ts[k]
    run = ts[:k] if off_by_one else ts[:k + 1]                         # the original: ts[:k]
    for index in range(len(run) - 1, -1, -1):
        e = eps_numpy(x, run[index])
        pred_x0 = (x - np.sqrt(1 - alphas[index]) * e) / np.sqrt(alphas[index])
        x = np.sqrt(alphas_prev[index]) * pred_x0 + np.sqrt(1 - alphas_prev[index]) * e
    np.testing.assert_allclose(got, x, atol=1e-5)  # float32 vs float64 over <= 5 steps
    plan = make_plan('ddim', steps, start_step=k, fidelity_off_by_one=off_by_one)
    assert plan.timesteps[plan.start] == (ts[k - 1] if off_by_one else ts[k])
    assert plan.x0_noise_t == ts[k] and len(plan.positions()) == len(run)


def test_fidelity_start_k0_returns_noised_x0():
    x0, seeds = x_T_np(5), jnp.array([7, 8])
    got = sample(eps_jax, SCHED, None, guidance_scale=1.0, steps=10, x0=x0, keys=seeds,
                 start_step=0)
    want = q_sample(SCHED, jnp.asarray(x0), jnp.array([1, 1]), sampling.per_sample_normal(
        sampling.fold_keys(sampling.as_keys(seeds), 0), x0.shape[1:]))
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match='start step k=10'):
        make_plan('ddim', 10, start_step=10)


# ----------------------------------------------------------------------------------------
# The jitted driver: seeds, compilation, chunks, dtypes
# ----------------------------------------------------------------------------------------

def _params(w, b):
    return {'w': jnp.float32(w), 'b': jnp.float32(b)}


def _ctx(seed, batch):
    return jnp.asarray(np.random.RandomState(seed).randn(batch, 3, 8), jnp.float32)


def make_apply(traces):
    def apply_fn(params, x, t, ctx):
        traces.append((x.shape, x.dtype, ctx.dtype))   # runs once per trace, not per call
        return params['w'] * eps_jax(x, t, ctx) + params['b']
    return apply_fn


@pytest.mark.slow
def test_seeds_reproducible_across_batch_sizes():
    # DDPM draws both the initial noise and noise at every step (DDIM eta > 0 shares the code)
    run = Sampler(make_apply([]), sampler='ddpm', steps=10)
    kw = dict(guidance_scale=3.0)
    p = _params(1.0, 0.0)
    ctx, unc = _ctx(0, 3), jnp.zeros((3, 3, 8))
    three = run(p, SCHED, ctx, uncond_context=unc, seeds=jnp.array([11, 12, 13]),
                shape=(3,) + SHAPE[1:], **kw)
    one = run(p, SCHED, ctx[1:2], uncond_context=unc[1:2], seeds=jnp.array([12]),
              shape=(1,) + SHAPE[1:], **kw)
    # initial and per-step noise are drawn per sample; the fake denoiser is elementwise, so
    # sample 1 of the batch is the same computation as the lone sample (up to vectorization)
    np.testing.assert_allclose(three[1], one[0], atol=1e-6)
    again = run(p, SCHED, ctx, uncond_context=unc, seeds=jnp.array([11, 12, 13]),
                shape=(3,) + SHAPE[1:], **kw)
    np.testing.assert_array_equal(three, again)
    other = run(p, SCHED, ctx, uncond_context=unc, seeds=jnp.array([21, 22, 23]),
                shape=(3,) + SHAPE[1:], **kw)
    assert all(float(jnp.abs(other[i] - three[i]).max()) > 0.1 for i in range(3))


def test_key_formats_agree():
    # int seeds (B,), typed keys (B,) and raw uint32 keys (B, 2) name the same per-sample keys
    seeds = jnp.array([3, 4])
    typed = jnp.stack([jax.random.key(3), jax.random.key(4)])
    raw = jax.random.key_data(typed)
    for keys in (seeds, typed, raw):
        np.testing.assert_array_equal(jax.random.key_data(sampling.as_keys(keys)), raw)
    with pytest.raises(ValueError, match='integer seeds'):
        sampling.as_keys(jnp.zeros((2, 3), jnp.float32))


@pytest.mark.slow
def test_sampler_does_not_recompile_for_new_inputs():
    traces = []
    run = Sampler(make_apply(traces), steps=10)
    kw = dict(shape=SHAPE)
    a = run(_params(1.0, 0.0), SCHED, _ctx(0, 2), uncond_context=_ctx(1, 2),
            guidance_scale=7.5, eta=0.3, seeds=jnp.array([0, 1]), **kw)
    b = run(_params(0.9, 0.01), SCHED, _ctx(2, 2), uncond_context=_ctx(3, 2),
            guidance_scale=5.0, eta=0.6, seeds=jnp.array([5, 6]), **kw)
    assert len(traces) == 1, traces          # params, contexts, seeds, scale, eta: all traced
    assert traces[0][0][0] == 2 * SHAPE[0]   # CFG: one call over the doubled batch
    assert float(jnp.abs(a - b).max()) > 0.1
    # the compiled program computes exactly what the pure `sample` does with the same inputs
    want = jax.jit(lambda: sample(lambda x, t, c: 0.9 * eps_jax(x, t, c) + 0.01, SCHED, _ctx(2, 2),
                                  uncond_context=_ctx(3, 2), guidance_scale=5.0, eta=0.6,
                                  keys=jnp.array([5, 6]), steps=10, **kw))()
    np.testing.assert_allclose(b, want, atol=1e-6)
    # a Python guidance scale of 1 is a different (conditional-only, batch B) program
    run(_params(1.0, 0.0), SCHED, _ctx(0, 2), guidance_scale=1.0, x_T=x_T_np())
    assert len(traces) == 2 and traces[1][0][0] == SHAPE[0]


@pytest.mark.slow
@pytest.mark.parametrize('sampler,eta', [('dpm++', 0.0), ('ddim', 0.8)])
def test_chunked_equals_one_shot(sampler, eta):
    run = Sampler(make_apply([]), sampler=sampler, steps=10)
    kw = dict(uncond_context=jnp.zeros((2, 3, 8)), guidance_scale=4.0, eta=eta,
              seeds=jnp.array([1, 2]), shape=SHAPE)
    one = run(_params(1.0, 0.0), SCHED, _ctx(0, 2), **kw)
    progress = []
    chunked = run.sample_chunked(_params(1.0, 0.0), SCHED, _ctx(0, 2), chunk=4,
                                 callback=lambda done, total: progress.append((done, total)),
                                 **kw)
    assert progress == [(4, 10), (8, 10), (10, 10)]
    # the same step program at the same positions (DPM++ history and step noise cross chunk
    # boundaries). Not asserted bitwise: XLA may contract a*b+c into an FMA differently in
    # differently fused programs (measured: 0 here, 4e-8 for DDPM's coefficient tables).
    np.testing.assert_allclose(chunked, one, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_denoiser_keeps_float32_state():
    traces = []
    kw = dict(uncond_context=jnp.zeros((2, 3, 8)), guidance_scale=4.0, seeds=jnp.array([1, 2]),
              shape=SHAPE)
    f32 = Sampler(make_apply(traces), steps=10)(_params(1.0, 0.0), SCHED, _ctx(0, 2), **kw)
    bf16_run = Sampler(make_apply(traces), steps=10, compute_dtype=jnp.bfloat16)
    *_, (_, _, state) = bf16_run.iterate(_params(1.0, 0.0), SCHED, _ctx(0, 2), chunk=10, **kw)
    assert traces[-1][1:] == (jnp.bfloat16, jnp.bfloat16)  # the denoiser sees bf16 x and ctx
    assert state.x.dtype == jnp.float32 and state.pred_x0.dtype == jnp.float32
    bf16 = state.x
    # bf16 keeps 8 mantissa bits (~4e-3 relative per denoiser call) over 10 steps
    err = float(jnp.abs(bf16 - f32).max())
    assert 0. < err < 5e-2, err


def test_clear_errors():
    plan = make_plan('ddim', 10)
    with pytest.raises(ValueError, match='draws noise: pass keys'):
        sample(eps_jax, SCHED, None, guidance_scale=1.0, x_T=x_T_np(), steps=10, eta=0.5)
    with pytest.raises(ValueError, match='not used by the deterministic dpm'):
        sample(eps_jax, SCHED, None, guidance_scale=1.0, x_T=x_T_np(), sampler='dpm++', eta=0.5)
    with pytest.raises(ValueError, match='3 keys for a batch of 2'):
        sampling.init_state(SCHED, plan, x_T=x_T_np(), keys=jnp.arange(3))
    with pytest.raises(ValueError, match='unknown sampler'):
        make_plan('heun')  # not (yet) a sampler
    with pytest.raises(ValueError, match='built for 500'):
        sampling.step_tables(SCHED, make_plan('ddim', 10, num_timesteps=500))
