"""Training options of the diffusion loss against their formulas: prediction targets,
min-SNR-gamma weights (zero SNR included), offset noise, and v-prediction training on a
Gaussian toy problem reaching the analytic optimum."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax

from vd_jax.diffusion import prediction
from vd_jax.diffusion.losses import diffusion_loss, offset_noise
from vd_jax.diffusion.schedule import eps_loss, make_schedule


def test_min_snr_weights_follow_the_formulas_and_zero_snr_is_finite():
    sched = make_schedule(rescale_zero_terminal_snr=True)
    a = np.asarray(sched.alphas_cumprod, np.float64)
    snr = a / (1 - a)
    gamma = 5.0
    for ptype, expect in (('epsilon', np.minimum(snr, gamma) / np.where(snr > 0, snr, 1)),
                          ('v_prediction', np.minimum(snr, gamma) / (snr + 1)),
                          ('sample', np.minimum(snr, gamma))):
        w = np.asarray(prediction.min_snr_weight(jnp.asarray(a, jnp.float32), gamma, ptype))
        assert np.isfinite(w).all(), ptype
        assert w[-1] == 1.0                          # SNR = 0 at T - 1: weight 1, never NaN
        np.testing.assert_allclose(w[:-1], expect[:-1], rtol=2e-5)
    # high-SNR steps are clipped: eps weight gamma/SNR < 1 at t = 0, 1 where SNR < gamma
    w = np.asarray(prediction.min_snr_weight(jnp.asarray(a, jnp.float32), gamma, 'epsilon'))
    assert w[0] < 0.01 and w[500] == pytest.approx(1.0)


def test_targets_and_split_are_inverse():
    rng = np.random.RandomState(0)
    x0, eps = rng.randn(2, 3, 4, 4, 2).astype(np.float32)
    for a in (0.0, 0.3, 0.99):
        x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
        for ptype in ('epsilon', 'v_prediction', 'sample'):
            if ptype == 'epsilon' and a == 0.0:
                continue   # x0 is undefined for an eps model at zero SNR
            if ptype == 'sample' and a == 0.0:
                continue   # eps = x_t / 1 needs sqrt(1 - a) > 0: fine, but x0 target is all
            out = prediction.target(x0, eps, a, ptype)
            got_x0, got_eps = prediction.split(out, x_t, a, ptype)
            np.testing.assert_allclose(got_x0, x0, atol=2e-5)
            np.testing.assert_allclose(got_eps, eps, atol=2e-5)
    # v at zero SNR: x0 = -v, eps = x_t
    v = prediction.target(x0, eps, 0.0, 'v_prediction')
    np.testing.assert_allclose(v, -x0)


def test_default_loss_is_vd_eps_loss_exactly():
    sched = make_schedule()
    rng = np.random.RandomState(1)
    x0, noise = jnp.asarray(rng.randn(2, 4, 4, 4, 3).astype(np.float32))
    t = jnp.array([3, 500, 999, 0])

    def model(x, tt):
        return jnp.tanh(x) * (tt[:, None, None, None] / 1000.)
    ref = eps_loss(model, sched, x0, jax.random.PRNGKey(0), t=t, noise=noise)
    got = diffusion_loss(model, sched, x0, t, noise)
    np.testing.assert_array_equal(got[1], ref[1])


def test_v_loss_and_weights_by_hand():
    sched = make_schedule(prediction_type='v_prediction', rescale_zero_terminal_snr=True)
    rng = np.random.RandomState(2)
    x0, noise = rng.randn(2, 3, 5).astype(np.float32)
    t = np.array([0, 400, 999])

    def model(x, tt):
        return 0.5 * x
    a = np.asarray(sched.alphas_cumprod, np.float64)[t][:, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    per = ((0.5 * x_t - (np.sqrt(a) * noise - np.sqrt(1 - a) * x0)) ** 2).mean(-1)
    snr = (a / (1 - a))[:, 0]
    w = np.where(snr > 0, np.minimum(snr, 5.0) / (snr + 1), 1.0)
    _, got = diffusion_loss(model, sched, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    np.testing.assert_allclose(got, per, rtol=1e-5)
    _, got_w = diffusion_loss(model, sched, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise),
                              snr_gamma=5.0)
    np.testing.assert_allclose(got_w, per * w, rtol=1e-5)
    assert np.isfinite(np.asarray(got_w)).all()


def test_offset_noise_is_one_draw_per_sample_and_channel():
    off = np.asarray(offset_noise(jax.random.key(0), (4000, 8, 8, 3), 0.1))
    assert off.shape == (4000, 1, 1, 3)
    assert abs(off.std() - 0.1) < 0.005 and abs(off.mean()) < 0.005
    # every pixel of a (sample, channel) gets the same offset when added to eps
    eps = np.zeros((2, 8, 8, 3), np.float32) + np.asarray(offset_noise(jax.random.key(1), (2, 8, 8, 3), 0.5))
    assert np.all(eps == eps[:, :1, :1, :])
    # independent across channels and samples
    c = np.corrcoef(off[:, 0, 0, 0], off[:, 0, 0, 1])[0, 1]
    assert abs(c) < 0.05


def test_v_prediction_training_reaches_the_gaussian_optimum():
    """x0 ~ N(0, S2 I); model out = w[t] x_t with one scalar per timestep. The v-loss optimum
    is w*(t) = sqrt(a (1 - a)) (1 - S2) / (a S2 + 1 - a) (a linear regression of v on x_t),
    0 at the zero-SNR step. Train on five timesteps (the zero-SNR one included) with Adam and compare."""
    s2 = 0.25
    sched = make_schedule(prediction_type='v_prediction', rescale_zero_terminal_snr=True)
    ts = jnp.array([200, 400, 600, 800, 999])
    a = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(ts)]
    w_star = np.sqrt(a * (1 - a)) * (1 - s2) / (a * s2 + 1 - a)

    def loss(w, key):
        k1, k2, k3 = jax.random.split(key, 3)
        idx = jax.random.randint(k1, (512,), 0, len(ts))
        x0 = jnp.sqrt(s2) * jax.random.normal(k2, (512, 16))
        noise = jax.random.normal(k3, (512, 16))
        lookup = jnp.zeros(1000).at[ts].set(w)

        def model(x, tt):
            return lookup[tt][:, None] * x
        return diffusion_loss(model, sched, x0, ts[idx], noise)[0]

    opt = optax.adam(optax.cosine_decay_schedule(0.05, 800, alpha=0.02))
    w = jnp.zeros(len(ts))
    state = opt.init(w)

    @jax.jit
    def step(w, state, key):
        g = jax.grad(loss)(w, key)
        upd, state = opt.update(g, state)
        return optax.apply_updates(w, upd), state
    key = jax.random.key(0)
    for i in range(800):
        w, state = step(w, state, jax.random.fold_in(key, i))
    np.testing.assert_allclose(np.asarray(w), w_star, atol=0.02)
    assert abs(float(w[-1])) < 0.02 and float(w[0]) > 0.3   # the optimum is not trivial


def test_training_config_carries_the_options():
    from vd_jax.config import load_config
    from vd_jax.errors import ConfigError
    from vd_jax.train.settings import StepConfig, apply_overrides
    from vd_jax.models.unet import Diffuser
    cfg = load_config('train_tiny')
    apply_overrides(cfg, ['loss.snr_gamma=5', 'noise.offset=0.1',
                          'model.schedule.prediction_type=v_prediction',
                          'model.schedule.rescale_zero_terminal_snr=True'])
    sc = StepConfig.from_config(cfg, Diffuser(cfg.model.diffuser))
    obj = sc.objective
    assert (obj.snr_gamma, obj.noise_offset) == (5.0, 0.1)
    assert obj.schedule.prediction_type == 'v_prediction' and obj.schedule.rescale_zero_terminal_snr
    bad = load_config('train_tiny')
    apply_overrides(bad, ['model.schedule.prediction_type=v'])
    with pytest.raises(ConfigError, match="prediction_type must be one of"):
        StepConfig.from_config(bad, Diffuser(bad.model.diffuser))


def test_export_refuses_a_model_config_other_than_the_runs(tmp_path):
    """`train.py --export` without the run's overrides would write the wrong schedule (found on
    the zero-SNR ablation): the model config is compared with the run's config.json first."""
    import json
    from vd_jax.config import load_config
    from vd_jax.train import check_same_model
    from vd_jax.errors import ConfigError
    from vd_jax.train.settings import apply_overrides, to_plain
    run = load_config('train_tiny')
    apply_overrides(run, ['model.schedule.prediction_type=v_prediction'])
    (tmp_path / 'config.json').write_text(json.dumps(to_plain(run), default=str))
    check_same_model(run, str(tmp_path))                      # the run's own config: fine
    with pytest.raises(ConfigError, match=r"model.schedule.prediction_type: run 'v_prediction', "
                                          r"given 'epsilon'"):
        check_same_model(load_config('train_tiny'), str(tmp_path))
    check_same_model(load_config('train_tiny'), str(tmp_path / 'nothing-saved'))
