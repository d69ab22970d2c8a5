"""Every step count 1..T builds a grid for every sampler: the original VD grid where it is
defined (parity unchanged), else a documented grid of exactly S steps with a one-line notice;
checked against diffusers' own schedulers."""
import warnings

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from vd_jax.diffusion import check_steps, make_schedule, StepGridNotice
from vd_jax.diffusion.sampling import DEFAULT_SPACING, SAMPLERS, Sampler, make_plan, sample

T = 1000
SCHED = make_schedule()
AC = np.asarray(SCHED.alphas_cumprod)
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')
S2 = 0.5


def original_grid(steps):
    """The released code's `make_ddim_timesteps('uniform')`, ascending."""
    return np.arange(0, T, T // steps) + 1


def plan_with_warnings(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        plan = make_plan(*args, **kwargs)
    return plan, [str(w.message) for w in caught if issubclass(w.category, StepGridNotice)]


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_every_step_count_builds_a_plan(sampler):
    fallbacks = []
    for steps in range(1, T + 1):
        spacing, notice = check_steps(sampler, steps)
        plan, warned = plan_with_warnings(sampler, steps)
        assert plan.spacing == spacing
        ts = np.asarray(plan.timesteps)
        # strictly decreasing (no repeated step), all inside the schedule
        assert ts.min() >= 0 and ts.max() <= T - 1 and np.all(np.diff(ts) < 0), (sampler, steps)
        if spacing == 'uniform':  # the original grid, S or S + 1 entries as the released code
            np.testing.assert_array_equal(ts, original_grid(steps)[::-1])
        else:                     # every other grid has exactly S steps
            assert plan.num_steps == steps, (sampler, steps, spacing)
        # a notice exactly when 'auto' left the sampler's usual grid, the same one warned
        assert (notice is None) == (spacing == DEFAULT_SPACING[sampler]), (sampler, steps)
        assert warned == ([] if notice is None else [notice])
        if notice is not None:
            fallbacks.append(steps)
            assert notice.startswith(f'{sampler}: ') and '\n' not in notice
    if sampler == 'dpm++':
        assert fallbacks == [T]
    else:  # the original grid feeds t = T exactly when T // S divides T - 1
        assert fallbacks == [s for s in range(1, T + 1) if original_grid(s)[-1] >= T]
        assert len(fallbacks) == 599
        assert fallbacks[:8] == [3, 9, 27, 36, 37, 101, 102, 103]


def test_parity_grids_unchanged_where_the_original_is_defined():
    for sampler in ('ddim', 'ddpm'):
        plan, warned = plan_with_warnings(sampler, 50)
        assert plan.timesteps == tuple(range(981, 0, -20)) and plan.spacing == 'uniform'
        assert warned == []
        plan30 = make_plan(sampler, 30)
        assert plan30.num_steps == 31  # as the original (its length assertion is commented out)
        np.testing.assert_array_equal(plan30.timesteps, original_grid(30)[::-1])
        assert make_plan(sampler, 30, spacing='uniform') == plan30
    # the defaults did not change: spacing None is 'auto', the last DDIM step targets alpha_bar[0]
    assert make_plan('ddim', 50) == make_plan('ddim', 50, spacing=None)
    assert make_plan('ddim', 50).prev[-1] == 0 and make_plan('ddpm', 50).prev[-1] == -1
    assert make_plan('dpm++', 20).spacing == 'linspace'


@pytest.mark.filterwarnings('ignore::vd_jax.diffusion.sampling.StepGridNotice')
def test_fallback_grids_are_diffusers_grids():
    # 'leading' is diffusers' timestep_spacing='leading' with steps_offset=1 (exactly S steps)
    for steps in (3, 9, 27, 36, 101, 333, 501, 999):
        ref = DDIMScheduler(**BETAS, steps_offset=1, timestep_spacing='leading')
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(make_plan('ddim', steps).timesteps, ref.timesteps.numpy())
        np.testing.assert_array_equal(make_plan('ddpm', steps, spacing='leading').timesteps,
                                      ref.timesteps.numpy())
    # where the original grid has exactly S entries, 'leading' is the same grid
    for steps in (1, 2, 4, 10, 50, 100, 500):
        lead, orig = make_plan('ddim', steps, spacing='leading'), make_plan('ddim', steps)
        assert (lead.timesteps, lead.prev) == (orig.timesteps, orig.prev)
    # dpm++ keeps diffusers' linspace up to T - 1 steps; T steps are every timestep
    for steps in (3, 101, 999):
        ref = DPMSolverMultistepScheduler(**BETAS)
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(make_plan('dpm++', steps).timesteps, ref.timesteps.numpy())
    full = DDPMScheduler(**BETAS)
    full.set_timesteps(T)
    for sampler in SAMPLERS:
        np.testing.assert_array_equal(make_plan(sampler, T).timesteps, full.timesteps.numpy())
    # ddpm at T steps is the existing unstrided 'full' chain
    assert make_plan('ddpm', T) == make_plan('ddpm', spacing='full')


def eps_jax(x, t, ctx=None):
    a = jax.numpy.asarray(AC)[t].reshape((-1,) + (1,) * (x.ndim - 1))
    return (jax.numpy.sqrt(1 - a) * x / (S2 * a + 1 - a)
            + 0.1 * jax.numpy.tanh(x) * jax.numpy.cos(t.astype(jax.numpy.float32).reshape(a.shape) / 300.))


def eps_torch(x, t):
    a = torch.tensor(AC[int(t)])
    return torch.sqrt(1 - a) * x / (S2 * a + 1 - a) + 0.1 * torch.tanh(x) * np.cos(int(t) / 300.)


def _diffusers_run(scheduler, x, timesteps=None):
    if timesteps is None:
        timesteps = list(scheduler.timesteps)
    x = torch.from_numpy(x)
    for t in timesteps:
        x = scheduler.step(eps_torch(x, t), t, x).prev_sample
    return x.numpy()


def test_fallback_trajectories_match_diffusers():
    x_T = np.random.RandomState(0).randn(2, 4, 4, 3).astype(np.float32)
    # DDIM at 3 steps (the original grid is undefined): diffusers' leading grid
    ref = DDIMScheduler(**BETAS, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                        timestep_spacing='leading')
    ref.set_timesteps(3)
    with pytest.warns(StepGridNotice, match="ddim: the original VD grid .* steps=3"):
        ours = sample(eps_jax, SCHED, None, guidance_scale=1.0, x_T=x_T, steps=3)
    err = float(np.abs(np.asarray(ours) - _diffusers_run(ref, x_T)).max())
    print(f'DDIM 3 steps (leading) vs diffusers: max abs err {err:.2e}')
    assert err < 1e-5  # float32 rounding of O(1) values over 3 steps (measured ~1e-7)
    # DPM-Solver++(2M) at T steps: every timestep, last step to clean data
    ref = DPMSolverMultistepScheduler(**BETAS, algorithm_type='dpmsolver++', solver_order=2,
                                      final_sigmas_type='zero')
    ref.set_timesteps(timesteps=list(range(T - 1, -1, -1)))
    with pytest.warns(StepGridNotice, match=r"dpm\+\+: steps=1000 runs every timestep"):
        run = Sampler(lambda p, x, t, c: eps_jax(x, t), sampler='dpm++', steps=T)
    assert run.plan.num_steps == T and run.plan.second_order[-1] is False
    ours = run({}, SCHED, None, guidance_scale=1.0, x_T=x_T)
    want = _diffusers_run(ref, x_T)
    err = float(np.abs(np.asarray(ours) - want).max())
    print(f'DPM++(2M) {T} steps (full) vs diffusers: max abs err {err:.2e}')
    assert np.isfinite(want).all() and err < 5e-5  # 1000 float32 steps (measured 8e-6)


def test_errors_name_the_sampler_steps_and_spacing():
    with pytest.raises(ValueError) as e:
        check_steps('ddpm', 3, 'uniform')
    msg = str(e.value)
    assert msg.startswith('ddpm: steps=3') and "spacing='uniform'" in msg and 'ddim' not in msg.lower()
    assert "spacing='auto'" in msg  # the way out
    for bad in (0, T + 1, 2.5, True, '50'):
        with pytest.raises(ValueError, match=r'dpm\+\+: steps must be an integer from 1 to 1000'):
            check_steps('dpm++', bad)
    with pytest.raises(ValueError, match=r"dpm\+\+: steps=1000 with spacing='linspace'.*repeat"):
        check_steps('dpm++', T, 'linspace')
    with pytest.raises(ValueError, match=r"ddim: steps=1000 with spacing='leading'.*t=1000"):
        check_steps('ddim', T, 'leading')
    with pytest.raises(ValueError, match=r"ddpm: steps=50 with spacing='full'"):
        check_steps('ddpm', 50, 'full')
    with pytest.raises(ValueError, match=r"ddim: unknown spacing 'quad'"):
        check_steps('ddim', 50, 'quad')
    with pytest.raises(ValueError, match='unknown sampler'):
        check_steps('heun', 50)  # not (yet) a sampler
    # make_plan and Sampler raise the same errors before anything is compiled
    for build in (lambda: make_plan('ddpm', 3, spacing='uniform'),
                  lambda: Sampler(lambda *a: None, sampler='ddpm', steps=3, spacing='uniform')):
        with pytest.raises(ValueError, match="ddpm: steps=3 with spacing='uniform'"):
            build()
    # explicit spacings never warn
    for sampler in SAMPLERS:
        for steps, spacing in ((3, 'leading'), (999, 'linspace'), (T, 'full')):
            assert plan_with_warnings(sampler, steps, spacing=spacing)[1] == []
            assert check_steps(sampler, steps, spacing) == (spacing, None)


def test_auto_spacing_of_a_zero_snr_v_model_is_trailing():
    """'auto' gives a zero-terminal-SNR v-prediction model the grid that starts at pure noise
    (t = T - 1); every other schedule keeps the original VD grid (parity unchanged)."""
    zero_v = make_schedule(prediction_type='v_prediction', rescale_zero_terminal_snr=True)
    for sampler in ('ddim', 'ddpm', 'euler', 'euler_a'):
        p = make_plan(sampler, 50, schedule=zero_v)
        assert p.spacing == 'trailing' and p.timesteps[0] == T - 1, sampler
        assert p.timesteps == make_plan(sampler, 50, spacing='trailing').timesteps
        # an explicit spacing is kept
        assert make_plan(sampler, 50, spacing='uniform', schedule=zero_v).spacing == 'uniform'
    assert make_plan('dpm++', 50, schedule=zero_v).spacing == 'linspace'  # starts at T - 1
    # check_steps (what command lines call) answers as make_plan does once given the schedule:
    # at 3 steps the original grid is undefined; VD's schedule falls back to 'leading' with a
    # note, the zero-SNR v schedule is 'trailing' without one
    assert check_steps('ddim', 3, 'auto')[0] == 'leading' and check_steps('ddim', 3, 'auto')[1]
    assert check_steps('ddim', 3, 'auto', schedule=zero_v) == ('trailing', None)
    from vd_jax.diffusion.plan import auto_depends_on_schedule
    assert auto_depends_on_schedule('ddim', 'auto') and auto_depends_on_schedule('euler_a', None)
    assert not auto_depends_on_schedule('dpm++', 'auto')
    assert not auto_depends_on_schedule('ddim', 'leading')
    for other in (SCHED, make_schedule(prediction_type='v_prediction'),
                  make_schedule(rescale_zero_terminal_snr=True)):   # the last: eps, zero SNR
        p = make_plan('ddim', 50, schedule=other)
        assert p.spacing == 'uniform' and p.timesteps[0] == 981


def test_auto_spacing_reads_a_closed_over_schedule_inside_jit():
    """`sample` builds its plan while `jit` traces: a schedule closed over (concrete arrays)
    still resolves 'auto' by its values; a schedule passed in as an argument (traced) keeps the
    sampler's usual grid instead of failing."""
    import jax
    zero_v = make_schedule(prediction_type='v_prediction', rescale_zero_terminal_snr=True)
    for schedule, expected in ((zero_v, T - 1), (make_schedule(prediction_type='v_prediction'),
                                                 981)):
        seen = []

        @jax.jit
        def closed_over(x, schedule=schedule, seen=seen):
            seen.append(make_plan('euler_a', 50, schedule=schedule).timesteps[0])
            return x
        closed_over(np.zeros(1))
        assert seen == [expected]
    traced = []

    @jax.jit
    def passed_in(s):
        traced.append(make_plan('ddim', 50, schedule=s).spacing)
        return s.alphas_cumprod[0]
    passed_in(zero_v)
    assert traced == ['uniform']


@pytest.mark.slow
def test_a_zero_snr_v_model_samples_on_the_trailing_grid_by_default():
    from vd_jax.config import load_config
    from vd_jax.pipeline import VersatileDiffusion
    cfg = load_config('tiny')
    cfg.model.schedule.prediction_type = 'v_prediction'
    cfg.model.schedule.rescale_zero_terminal_snr = True
    vd = VersatileDiffusion.random(cfg, seed=0)
    auto = np.asarray(vd.text_to_image('a cat', steps=4, seed=1))
    np.testing.assert_array_equal(auto, vd.text_to_image('a cat', steps=4, seed=1,
                                                         spacing='trailing'))
    assert np.abs(auto - np.asarray(vd.text_to_image('a cat', steps=4, seed=1,
                                                     spacing='uniform'))).max() > 1e-3
