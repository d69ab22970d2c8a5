"""Schedules, prediction types and every sampler against diffusers' schedulers of the same name
and settings: whole trajectories from the same initial noise, with the same step noise for the
stochastic samplers, on an analytic model function and on the tiny diffuser.

The matrix: DDIM (eta 0 and 0.5), DDPM, DPM++ 2M (with and without the Karras grid), Euler,
Euler ancestral x epsilon / v prediction x VD's schedule / zero terminal SNR x leading /
trailing spacing. The bar: max |ours - diffusers| <= 1e-4 max |diffusers|.

Where diffusers itself returns NaN (an epsilon model asked for x0 at a zero-SNR step by DDIM or
DDPM on the trailing grid, which starts at t = T - 1), we refuse with a clear error instead.
"""
import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler)
from diffusers.schedulers import (scheduling_ddpm, scheduling_euler_ancestral_discrete,
                                  scheduling_ddim)
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from vd_jax.diffusion import sampling
from vd_jax.errors import ConfigError
from vd_jax.models.unet import example_inputs
from vd_jax.diffusion.schedule import (BETA_SCHEDULES, ScheduleConfig, make_schedule, schedule_arrays,
                                       zero_terminal_snr_betas)

S2 = 0.5                       # data variance of the analytic model
SHAPE = (2, 4, 4, 3)
STEPS = 10
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')
TOL = 1e-4                     # of max |reference|


# ----------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('beta_schedule', BETA_SCHEDULES)
@pytest.mark.parametrize('zero_snr', [False, True])
def test_schedule_arrays_equal_diffusers(beta_schedule, zero_snr):
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule,
                        rescale_betas_zero_snr=zero_snr)
    ours = make_schedule(beta_schedule=beta_schedule, rescale_zero_terminal_snr=zero_snr)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6)
    # diffusers computes the betas in float32; near T, beta = 1 - ab[t] / ab[t-1] of tiny
    # numbers, where float32 division leaves ~1e-5: checked in float64 below instead.
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), atol=1e-6 if not zero_snr else 2e-5)
    if zero_snr:
        assert float(ours.alphas_cumprod[-1]) == 0.0 and ours.zero_terminal_snr
        # sqrt(alpha_bar_0) is kept
        assert abs(float(ours.sqrt_alphas_cumprod[0]) - float(make_schedule(
            beta_schedule=beta_schedule).sqrt_alphas_cumprod[0])) < 1e-7


def test_zero_terminal_snr_rescale_equals_diffusers_in_float64():
    betas = schedule_arrays()['betas']
    ref = diffusers_rescale(torch.from_numpy(betas)).numpy()     # float64 in, float64 out
    np.testing.assert_allclose(zero_terminal_snr_betas(betas), ref, rtol=0, atol=1e-12)


def test_schedule_config_errors_name_the_key_and_value():
    with pytest.raises(ConfigError, match="beta_schedule must be one of .* got 'cosine'"):
        make_schedule(beta_schedule='cosine')
    with pytest.raises(ConfigError, match="prediction_type must be one of .* got 'v'"):
        make_schedule(prediction_type='v')
    with pytest.raises(ConfigError, match=r"unknown schedule option\(s\) \['rescale_betas_zero_snr'\]"):
        make_schedule({'rescale_betas_zero_snr': True})
    # older configs (no new keys) and the legacy tuple mean VD's schedule with epsilon
    old = ScheduleConfig.coerce({'beta_linear_start': 0.00085, 'beta_linear_end': 0.012, 'timesteps': 1000})
    assert old == ScheduleConfig() == ScheduleConfig.coerce((0.00085, 0.012, 1000))
    assert make_schedule(old).prediction_type == 'epsilon'


def test_default_schedule_is_bit_for_bit_vd():
    """The default is VD's buffers exactly: linspace(sqrt(start), sqrt(end))^2 in float64."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1 - betas)
    np.testing.assert_array_equal(np.asarray(make_schedule().alphas_cumprod), ac.astype(np.float32))


# ----------------------------------------------------------------------------------------
# The analytic model: the exact posterior mean of Gaussian data x0 ~ N(0, S2 I), plus a
# bounded nonlinear term, as eps or v. Defined at a = 0 (pure noise) too.
# ----------------------------------------------------------------------------------------

def analytic_np(x, a, t, prediction_type):
    x0 = np.sqrt(a) * S2 * x / (S2 * a + 1 - a) + 0.1 * np.tanh(x) * np.cos(t / 300.)
    eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
    if prediction_type == 'epsilon':
        return eps
    return np.sqrt(a) * eps - np.sqrt(1 - a) * x0


def analytic_jax(ac, prediction_type):
    ac = jnp.asarray(ac)

    def fn(x, t):
        a = ac[t].reshape((-1,) + (1,) * (x.ndim - 1))
        tf = t.astype(jnp.float32).reshape(a.shape)
        x0 = jnp.sqrt(a) * S2 * x / (S2 * a + 1 - a) + 0.1 * jnp.tanh(x) * jnp.cos(tf / 300.)
        eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        if prediction_type == 'epsilon':
            return eps
        return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0
    return fn


# ----------------------------------------------------------------------------------------
# Running both
# ----------------------------------------------------------------------------------------

SAMPLER_CASES = {   # id: (our sampler, extra make_plan kwargs, eta, diffusers class, its kwargs)
    'ddim': ('ddim', {}, 0.0, DDIMScheduler, dict(set_alpha_to_one=False, clip_sample=False)),
    'ddim_eta': ('ddim', {}, 0.5, DDIMScheduler, dict(set_alpha_to_one=False, clip_sample=False)),
    'ddpm': ('ddpm', {}, 0.0, DDPMScheduler, dict(clip_sample=False, variance_type='fixed_small')),
    'dpm++': ('dpm++', {}, 0.0, DPMSolverMultistepScheduler, {}),
    'dpm++_karras': ('dpm++', dict(karras=True), 0.0, DPMSolverMultistepScheduler,
                     dict(use_karras_sigmas=True)),
    'euler': ('euler', {}, 0.0, EulerDiscreteScheduler, {}),
    'euler_a': ('euler_a', {}, 0.0, EulerAncestralDiscreteScheduler, {}),
}


def our_noise(keys, p, sample_shape):
    """The noise our stochastic step p draws (sampling.step_noise of the state's keys)."""
    return np.asarray(sampling.step_noise(sampling.fold_keys(sampling.as_keys(keys), 1), p,
                                          tuple(sample_shape)))


class NoiseFeed:
    """Routes our per-step noise into diffusers' `randn_tensor` calls, one per step."""

    def __init__(self, keys):
        self.keys, self.p = keys, 0

    def __call__(self, shape, *args, **kwargs):
        noise = torch.from_numpy(our_noise(self.keys, self.p, shape[1:]))
        assert tuple(noise.shape) == tuple(shape)
        return noise.to(kwargs.get('dtype') or torch.float32)


def run_diffusers(case, spacing, prediction_type, zero_snr, model_np, x_T, keys, monkeypatch,
                  plan, alphas_cumprod=None):
    """diffusers' loop; `alphas_cumprod` (T,) replaces its float32-cumprod table by ours (the
    same values to ~4e-7, tested above) where a sensitive model would amplify that difference."""
    _, _, eta, cls, kw = SAMPLER_CASES[case]
    sch = cls(**BETAS, prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr,
              timestep_spacing=spacing, steps_offset=1 if spacing == 'leading' else 0, **kw)
    if alphas_cumprod is not None:
        ac = torch.from_numpy(np.array(alphas_cumprod, np.float32))
        if zero_snr and cls in (DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                                EulerAncestralDiscreteScheduler):
            ac[-1] = 2 ** -24    # what these schedulers' __init__ does
        sch.alphas_cumprod = ac
        if cls is DPMSolverMultistepScheduler:
            sch.alpha_t, sch.sigma_t = torch.sqrt(ac), torch.sqrt(1 - ac)
            sch.lambda_t = torch.log(sch.alpha_t) - torch.log(sch.sigma_t)
    if cls is DPMSolverMultistepScheduler and spacing == 'leading':
        # diffusers' DPM 'leading' grid is its own ((1..S) * T // (S + 1)); give it ours
        sch.set_timesteps(timesteps=list(plan.timesteps))
    else:
        sch.set_timesteps(STEPS)
    np.testing.assert_array_equal(np.asarray(sch.timesteps, np.float64), plan.timesteps)
    feed = NoiseFeed(keys)
    for module in (scheduling_ddpm, scheduling_euler_ancestral_discrete, scheduling_ddim):
        monkeypatch.setattr(module, 'randn_tensor', feed)
    x = torch.from_numpy(x_T) * sch.init_noise_sigma
    for p, t in enumerate(sch.timesteps):
        feed.p = p
        x_in = sch.scale_model_input(x, t)
        out = torch.from_numpy(model_np(x_in.numpy(), int(t)).astype(np.float32))
        extra = dict(eta=eta) if cls is DDIMScheduler else {}
        if cls is DDIMScheduler and eta:
            extra['variance_noise'] = torch.from_numpy(our_noise(keys, p, x_T.shape[1:]))
        x = sch.step(out, t, x, **extra).prev_sample
    return x.numpy()


def run_ours(case, spacing, schedule, model_jax, x_T, keys):
    sampler, kw, eta, _, _ = SAMPLER_CASES[case]
    plan = sampling.make_plan(sampler, STEPS, spacing=spacing, schedule=schedule, **kw)
    return plan, (lambda: np.asarray(sampling.sample(
        lambda x, t, c: model_jax(x, t), schedule, None, guidance_scale=1.0, plan=plan,
        x_T=x_T, keys=keys, eta=eta)))


MATRIX = [(case, spacing, pred, zero)
          for case in SAMPLER_CASES for pred in ('epsilon', 'v_prediction')
          for zero in (False, True)
          for spacing in (('trailing',) if case == 'dpm++_karras' else ('leading', 'trailing'))]


@pytest.mark.slow
@pytest.mark.parametrize('case,spacing,prediction_type,zero_snr', MATRIX,
                         ids=['-'.join(map(str, m)) for m in MATRIX])
def test_sampler_matches_diffusers_on_analytic_model(case, spacing, prediction_type, zero_snr,
                                                     monkeypatch):
    schedule = make_schedule(prediction_type=prediction_type, rescale_zero_terminal_snr=zero_snr)
    ac = np.asarray(schedule.alphas_cumprod)
    x_T = np.random.RandomState(0).randn(*SHAPE).astype(np.float32)
    keys = jax.random.split(jax.random.key(3), SHAPE[0])
    plan, ours = run_ours(case, spacing, schedule, analytic_jax(ac, prediction_type), x_T, keys)

    def model_np(x, t):
        return analytic_np(x.astype(np.float64), np.float64(ac[t]), t, prediction_type)

    ref = run_diffusers(case, spacing, prediction_type, zero_snr, model_np, x_T, keys,
                        monkeypatch, plan)
    undefined = (prediction_type == 'epsilon' and zero_snr and plan.timesteps[0] == 999
                 and case in ('ddim', 'ddim_eta', 'ddpm'))
    if undefined:   # diffusers divides by sqrt(alpha_bar_T) = 0; we say why before running
        assert not np.isfinite(ref).all()
        with pytest.raises(ValueError, match='cannot denoise t=999.*v_prediction'):
            ours()
        return
    got = ours()
    assert np.isfinite(ref).all()
    err = float(np.abs(got - ref).max())
    assert err <= TOL * float(np.abs(ref).max()), (err, float(np.abs(ref).max()))


# ----------------------------------------------------------------------------------------
# The tiny diffuser as the model function (text stream: 0-D latents; image stream: 8x8)
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_diffuser(tiny_config):
    from vd_jax.models.init import random_params, abstract_params
    from vd_jax.models.unet import Diffuser
    model = Diffuser(tiny_config.model.diffuser)
    params = random_params(abstract_params(model, *example_inputs(model.config)), seed=1)
    return model, params


@pytest.mark.slow
@pytest.mark.parametrize('case', list(SAMPLER_CASES))
@pytest.mark.parametrize('prediction_type,zero_snr,spacing',
                         [('epsilon', False, 'leading'), ('v_prediction', True, 'trailing')])
def test_sampler_matches_diffusers_on_tiny_model(tiny_diffuser, case, prediction_type, zero_snr,
                                                 spacing, monkeypatch):
    model, params = tiny_diffuser
    x, _, ctx, xtype, ctype = example_inputs(model.config, SHAPE[0])
    # 8x8 latents: at 4x4 the tiny UNet's deepest level is 1x1, where GroupNorm of a near-constant
    # makes the random network amplify float32 rounding 40x (measured), whatever the sampler
    shape = (SHAPE[0], 8, 8, x.shape[-1])
    ctx = jax.random.normal(jax.random.key(5), ctx.shape)
    apply = jax.jit(lambda x, t: model.apply({'params': params}, x, t, ctx, xtype, ctype))
    schedule = make_schedule(prediction_type=prediction_type, rescale_zero_terminal_snr=zero_snr)
    x_T = np.random.RandomState(1).randn(*shape).astype(np.float32)
    keys = jax.random.split(jax.random.key(4), shape[0])
    if case == 'dpm++_karras':
        spacing = 'trailing'
    plan, ours = run_ours(case, spacing, schedule, apply, x_T, keys)

    def model_np(xn, t):
        return np.asarray(apply(jnp.asarray(xn, jnp.float32), jnp.full((shape[0],), t, jnp.int32)))

    # a random network is far more sensitive to its input than the analytic model: diffusers
    # runs on our alpha_bar table, so the difference measured is the samplers' arithmetic
    ref = run_diffusers(case, spacing, prediction_type, zero_snr, model_np, x_T, keys,
                        monkeypatch, plan, alphas_cumprod=np.asarray(schedule.alphas_cumprod))
    got = ours()
    err = float(np.abs(got - ref).max())
    assert np.isfinite(ref).all() and err <= TOL * float(np.abs(ref).max()), err


# ----------------------------------------------------------------------------------------
# Guidance rescale
# ----------------------------------------------------------------------------------------

def test_guidance_rescale_equals_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    from vd_jax.diffusion.guidance import cfg_denoise
    rng = np.random.RandomState(0)
    x = rng.randn(*SHAPE).astype(np.float32)
    t = np.array([500, 20], np.int32)
    cond, uncond = rng.randn(2, 3, 8).astype(np.float32), rng.randn(2, 3, 8).astype(np.float32)

    def denoise(x_t, t, c):
        return 0.7 * x_t + jnp.mean(c, axis=(1, 2))[:, None, None, None] * jnp.cos(x_t)
    for phi in (0.0, 0.3, 0.7, 1.0):
        got = np.asarray(cfg_denoise(denoise, 7.5, phi)(x, t, cond, uncond))
        e_u, e_c = np.asarray(denoise(x, t, uncond)), np.asarray(denoise(x, t, cond))
        guided = torch.from_numpy(e_u + 7.5 * (e_c - e_u))
        ref = rescale_noise_cfg(guided, torch.from_numpy(e_c), guidance_rescale=phi).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())
    # phi changes the output (the option is really applied) and 0 compiles it out
    assert not np.allclose(np.asarray(cfg_denoise(denoise, 7.5, 0.7)(x, t, cond, uncond)),
                           np.asarray(cfg_denoise(denoise, 7.5, 0)(x, t, cond, uncond)))


def test_guidance_rescale_is_traced_not_recompiled():
    traces = []

    def apply(params, x, t, c):
        traces.append(1)
        return 0.5 * x + jnp.mean(c) * params
    sampler = sampling.Sampler(apply, steps=4)
    kw = dict(uncond_context=jnp.zeros((2, 3, 8)), seeds=jnp.array([1, 2]), shape=SHAPE)
    ctx = jnp.ones((2, 3, 8))
    a = sampler(jnp.float32(1.), make_schedule(), ctx, guidance_rescale=0.3, **kw)
    n = len(traces)
    b = sampler(jnp.float32(1.), make_schedule(), ctx, guidance_rescale=0.9, **kw)
    assert len(traces) == n and not np.allclose(a, b)


def test_karras_only_for_samplers_that_take_it():
    with pytest.raises(ValueError, match="ddim: the Karras sigma grid is for .*dpm"):
        sampling.make_plan('ddim', 10, karras=True, schedule=make_schedule())
    with pytest.raises(ValueError, match='needs the schedule'):
        sampling.make_plan('dpm++', 10, karras=True)
