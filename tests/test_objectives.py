"""Training objectives: classifier-free-guidance dropout (its rate, and that it uses exactly the
pipeline's unconditional contexts), and the stage-0 networks (AutoKL, Optimus, CLIP) learning
a small set, with their exports loading into the pipeline."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vd_jax.config import load_config
from vd_jax.models import family
from vd_jax.train import objectives as O
from vd_jax.train.settings import apply_overrides


def _diffusion(p):
    from vd_jax.models.unet import Diffuser
    cfg = load_config('tiny').model
    flows = (('t2i', 'image', 'text', 1.0), ('i2t', 'text', 'image', 1.0))
    return O.Diffusion(Diffuser(cfg.diffuser), flows, (0.00085, 0.012, 1000), False, p)


@pytest.mark.slow
def test_cfg_dropout_rate_and_the_pipelines_unconditional_contexts():
    from vd_jax.pipeline import VersatileDiffusion
    comps = VersatileDiffusion.random('tiny').components
    obj = _diffusion(0.1)
    b = 4000
    ctx = jnp.ones((b, 77, 32))
    u_t2i = comps.uncond_context('text', 'image', 'v1.0', ctx[:1])
    batch = {'index': jnp.arange(b, dtype=jnp.uint32), O.uncond_key('t2i'): u_t2i}
    key = jax.random.PRNGKey(7)
    out = obj.dropped_context(key, batch, 0, 't2i', ctx)
    dropped = np.asarray(jnp.all(out == u_t2i, axis=(1, 2)))
    kept = np.asarray(jnp.all(out == ctx, axis=(1, 2)))
    assert np.all(dropped ^ kept)                       # each row: exactly one of the two
    assert abs(dropped.mean() - 0.1) < 0.015, dropped.mean()   # 4000 draws: 3 sigma = 0.014
    # the same record under the same step key drops the same way, in any batch position
    perm = np.random.default_rng(0).permutation(b)
    out2 = obj.dropped_context(key, {'index': batch['index'][perm],
                                     O.uncond_key('t2i'): u_t2i}, 0, 't2i', ctx[perm])
    np.testing.assert_array_equal(np.asarray(jnp.all(out2 == u_t2i, axis=(1, 2))), dropped[perm])
    # another step (key) or another flow draws anew
    other = obj.dropped_context(jax.random.PRNGKey(8), batch, 0, 't2i', ctx)
    assert (np.asarray(jnp.all(other == u_t2i, axis=(1, 2))) != dropped).mean() > 0.1
    flow1 = obj.dropped_context(key, dict(batch, **{O.uncond_key('i2t'): u_t2i}), 1, 'i2t', ctx)
    assert (np.asarray(jnp.all(flow1 == u_t2i, axis=(1, 2))) != dropped).mean() > 0.1
    # p = 0: the contexts untouched
    assert _diffusion(0.0).dropped_context(key, batch, 0, 't2i', ctx) is ctx


@pytest.mark.slow
def test_training_drops_to_the_uncond_contexts_the_pipeline_samples_with(tmp_path):
    """A real run: the batch constants of the step are the pipeline's unconditional contexts
    of the frozen encoders (random tiny ones here), one per flow."""
    from vd_jax.pipeline import VersatileDiffusion
    from vd_jax.train import setup
    cfg = load_config('train_tiny:test')
    apply_overrides(cfg, ['total_steps=2', 'tensorboard=False', 'log_every=1000'])
    run = setup(cfg, str(tmp_path))
    assert sorted(run.consts) == sorted(O.uncond_key(f) for f in ('t2i', 'i2i', 'i2t', 't2t'))
    vd = VersatileDiffusion(cfg.model, run.frozen.params)
    c = vd.components
    text, image = jnp.zeros((1, 77, 32)), jnp.zeros((1, 257, 32))
    np.testing.assert_allclose(run.consts[O.uncond_key('t2i')],
                               c.uncond_context('text', 'image', 'v1.0', text), atol=1e-6)
    np.testing.assert_array_equal(run.consts[O.uncond_key('i2i')], np.zeros((1, 257, 32)))
    np.testing.assert_allclose(run.consts[O.uncond_key('i2t')],
                               c.uncond_context('image', 'text', 'v1.0', image), atol=1e-6)


def _fit(obj, batch, steps, lr=3e-3):
    import optax
    params = jax.jit(obj.init)(jax.random.PRNGKey(0))
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, i):  # the batch is an argument: XLA must not constant-fold it
        m, g = obj.loss_and_grads(params, batch, jax.random.PRNGKey(1), i)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt, m
    first = None
    for i in range(steps):
        params, opt, m = step(params, opt, batch, i)
        first = first or jax.device_get(m)
    return params, first, jax.device_get(m)


def _captions(n):
    from vd_jax.data import shapes
    return [s.caption for s in shapes.sample('train', n, 0)], \
        np.stack([shapes.render(s.attrs) for s in shapes.sample('train', n, 0)])


def test_optimus_targets_decode_back_to_the_sentence():
    from vd_jax.text_io import ids_to_text
    from vd_jax.tokenizers import gpt2_tokenizer
    cfg = family('optimus').make_config(load_config('vd_mini').model.vae.text)
    caps, _ = _captions(20)
    ids = O.decoder_ids(caps, gpt2_tokenizer(), cfg)
    for row, cap in zip(ids, caps):
        n = int((row != cfg.pad_id).sum())
        assert row[0] == cfg.bos_id and row[n - 1] == cfg.eos_id
        assert ids_to_text(row[:n], first_added_id=cfg.pad_id) == cap


@pytest.mark.slow
def test_stage0_networks_learn_a_small_set():
    """Each stage-0 objective fits 16 shapes-world records: the loss falls well below its
    start (AutoKL reconstruction, Optimus token accuracy, CLIP retrieval accuracy)."""
    from vd_jax.components import Components
    model = load_config('vd_mini').model
    caps, imgs = _captions(16)
    images = jnp.asarray(imgs, jnp.float32) / 127.5 - 1.0
    index = jnp.arange(16, dtype=jnp.uint32)
    comps = Components(model, {})

    ak = O.AutoKL(family('autokl').build(model.vae.image), kl_weight=1e-6, crop=32)
    _, first, last = _fit(ak, {'image': images, 'index': index}, 60)
    assert last['loss/recon'] < 0.5 * first['loss/recon'], (first, last)

    op = O.Optimus(family('optimus').build(model.vae.text), beta=0.0, free_bits=0.0)
    batch = {'index': index, **{k: jnp.asarray(v) for k, v in
                                op.host_fields(comps, {'caption': np.asarray(caps)}).items()}}
    _, first, last = _fit(op, batch, 80)
    assert last['token_accuracy'] > 0.8 > first['token_accuracy'], (first, last)

    cl = O.CLIP(family('clip_text').build(model.ctx.text),
                family('clip_vision').build(model.ctx.image))
    batch = {'index': index, 'image': images,
             **{k: jnp.asarray(v) for k, v in
                cl.host_fields(comps, {'caption': np.asarray(caps)}).items()}}
    params, first, last = _fit(cl, batch, 150)
    assert last['loss'] < 0.25 * first['loss'] and last['accuracy'] >= 0.9, (first, last)
    assert set(cl.export(params)) == {'ctx_text', 'ctx_image'}


def test_objective_configs_are_checked():
    from vd_jax.errors import ConfigError
    from vd_jax.train.settings import StepConfig
    from vd_jax.train import make_model
    cfg = load_config('train_vd_mini:autokl')
    sc = StepConfig.from_config(cfg, make_model(cfg))
    assert isinstance(sc.objective, O.AutoKL) and sc.flows == () and sc.objective.crop == 0
    cfg.objective = 'gan'
    with pytest.raises(ConfigError, match='objective must be one of'):
        StepConfig.from_config(cfg, None)
    cfg = load_config('train_vd_mini:basic')
    cfg.cfg_dropout.p = 1.0
    with pytest.raises(ConfigError, match=r'cfg_dropout.p must be in \[0, 1\)'):
        StepConfig.from_config(cfg, make_model(cfg))


@pytest.mark.slow
def test_export_from_workdir_records_the_vae_latent_scale(tmp_path):
    """`train.py --export` of a stage-0 AutoKL writes what the run's own export writes: the VAE
    and its calibrated `latent_scale_factor` (1 / std of the latents of a batch), so that
    diffusion trained on either export sees unit-variance latents."""
    from vd_jax.checkpoint import load_part, read_config
    from vd_jax.train import export_from_workdir, train
    cfg = load_config('train_vd_mini:autokl')
    apply_overrides(cfg, ['total_steps=6', 'batch_size=4', 'checkpoint.every=6',
                          'data.num_records=48', 'optimizer.warmup_steps=2', 'log_every=3',
                          'validation.every=0', 'tensorboard=False'])
    work = str(tmp_path / 'autokl')
    at_end = train(cfg, work)['export']
    again = export_from_workdir(cfg, work, out=str(tmp_path / 'again'))
    params = load_part(again, 'vae_image')
    np.testing.assert_array_equal(  # the same EMA weights
        jax.tree.leaves(params)[0], jax.tree.leaves(load_part(at_end, 'vae_image'))[0])
    scales = [float(read_config(p)['latent_scale_factor']['image']) for p in (at_end, again)]
    # an untrained-ish VAE's latents are far from unit std: the factor is measured, not 1
    assert all(abs(s - 1.0) > 0.05 for s in scales), scales
    assert abs(scales[0] - scales[1]) < 0.2 * scales[0], scales  # two batches of one world
    # the recorded factor is 1 / std of the export's own latents on 16 training records
    _, imgs = _captions(16)
    images = jnp.asarray(imgs, jnp.float32) / 127.5 - 1.0
    model = family('autokl').build(load_config('vd_mini').model.vae.image)
    mean, _ = model.apply({'params': params}, images, method='encode')
    assert abs(scales[1] * float(jnp.std(mean)) - 1.0) < 0.25, (scales, float(jnp.std(mean)))


@pytest.mark.slow
def test_optimus_deterministic_steps_train_a_plain_autoencoder_first():
    """Before `deterministic_steps`: z = mu (the key does not matter) and no KL term; from then
    on: a posterior sample and the KL with its warm-up counted from there."""
    from vd_jax.components import Components
    model = load_config('vd_mini').model
    caps, _ = _captions(4)
    op = O.Optimus(family('optimus').build(model.vae.text), beta=0.5, free_bits=0.1,
                   warmup_steps=10, deterministic_steps=5)
    comps = Components(model, {})
    batch = {'index': jnp.arange(4, dtype=jnp.uint32),
             **{k: jnp.asarray(v) for k, v in op.host_fields(comps, {'caption': np.asarray(caps)}).items()}}
    params = jax.jit(op.init)(jax.random.PRNGKey(0))
    # one compiled program (the step is traced, as in training); op by op it took 100 s
    loss = jax.jit(op.loss)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    early1, m1 = loss(params, batch, k1, jnp.int32(4))
    early2, _ = loss(params, batch, k2, jnp.int32(4))
    assert float(early1) == float(early2) == float(m1['loss/recon']) and float(m1['beta']) == 0.0
    late1, m = loss(params, batch, k1, jnp.int32(5))
    late2, _ = loss(params, batch, k2, jnp.int32(5))
    assert float(late1) != float(late2)                   # a posterior sample
    assert abs(float(m['beta']) - 0.5 * 1 / 10) < 1e-7    # warm-up counted from step 5


def test_sampled_softmax_candidates_cover_the_targets():
    """The batch's distinct targets first (sorted, unused slots masked), then the uniform draws
    with the log-ratio bias (draws that repeat a target masked); targets become indices."""
    v, k = 50, 16
    target = jnp.asarray([[7, 3, 7, 49], [3, 0, 0, 0]], jnp.int32)
    valid = jnp.asarray([[1, 1, 1, 1], [1, 0, 0, 0]], bool)
    cand, bias, idx = O.sampled_candidates(target, valid, v, k, jax.random.PRNGKey(3))
    cand, bias, idx = np.asarray(cand), np.asarray(bias), np.asarray(idx)
    u = target.size
    assert cand.shape == bias.shape == (u + k,) and idx.shape == target.shape
    np.testing.assert_array_equal(cand[:3], [3, 7, 49])          # 0 is padding here
    assert np.all(bias[:3] == 0) and np.all(np.isneginf(bias[3:u]))
    ok = np.asarray(valid)
    np.testing.assert_array_equal(cand[idx][ok], np.asarray(target)[ok])
    neg = cand[u:]
    hit = np.isin(neg, [3, 7, 49])
    assert np.all(np.isneginf(bias[u:][hit]))
    np.testing.assert_allclose(bias[u:][~hit], np.log((v - 3) / k), rtol=1e-6)


def test_optimus_sampled_softmax_estimates_the_full_loss():
    """With K draws the sampled loss is close to the exact one (the log-ratio makes the draws
    stand for the rest of the vocabulary) and its gradient reaches the decoder; measured on
    VD-mini's Optimus (50,260 tokens) at initialisation."""
    from vd_jax.components import Components
    model = load_config('vd_mini').model
    caps, _ = _captions(8)
    kw = dict(beta=0.5, free_bits=0.1, warmup_steps=10)
    exact = O.Optimus(family('optimus').build(model.vae.text), **kw)
    sampled = O.Optimus(family('optimus').build(model.vae.text), **kw, sampled_softmax=2048)
    comps = Components(model, {})
    batch = {'index': jnp.arange(8, dtype=jnp.uint32),
             **{k: jnp.asarray(v) for k, v in
                exact.host_fields(comps, {'caption': np.asarray(caps)}).items()}}
    params = jax.jit(exact.init)(jax.random.PRNGKey(0))
    step = jnp.int32(0)
    # compiled once per objective (op by op this test took 150 s)
    exact_loss, sampled_loss = jax.jit(exact.loss), jax.jit(sampled.loss)
    full = float(exact_loss(params, batch, jax.random.PRNGKey(1), step)[1]['loss/recon'])
    est = [float(sampled_loss(params, batch, jax.random.PRNGKey(s), step)[1]['loss/recon'])
           for s in range(4)]
    # at initialisation the logits are near zero: recon ~ tokens x log(50260) ~ 160 nats
    assert full > 100 and abs(np.mean(est) - full) < 0.01 * full, (full, est)
    grads = jax.jit(jax.grad(lambda p: sampled.loss(p, batch, jax.random.PRNGKey(1), step)[0]))(
        params)
    wte = jax.tree_util.tree_leaves_with_path(grads)
    norms = {jax.tree_util.keystr(p): float(jnp.abs(g).sum()) for p, g in wte}
    assert all(np.isfinite(list(norms.values())))
    assert any('wte' in p and n > 0 for p, n in norms.items()), norms


def test_optimus_sampled_softmax_setting_is_checked():
    from vd_jax.errors import ConfigError
    from vd_jax.train import make_model
    from vd_jax.train.settings import StepConfig
    cfg = load_config('train_vd_mini:optimus')
    # the recipe's (measured: docs/vd-mini.md, Wall times); 0 is the exact softmax
    assert StepConfig.from_config(cfg, make_model(cfg)).objective.sampled_softmax == 1024
    for k in (0, 512):
        cfg.optimus.sampled_softmax = k
        assert StepConfig.from_config(cfg, make_model(cfg)).objective.sampled_softmax == k
    cfg.optimus.sampled_softmax = -1
    with pytest.raises(ConfigError, match='optimus.sampled_softmax'):
        StepConfig.from_config(cfg, make_model(cfg))
