"""Multi-flow training: gradient accumulation, group multipliers, EMA, overfitting, exact
resume, divergence, export, initialisation from smaller settings / SD, config overrides.

Two models:
  * `ToyDiffuser` (below): the `Diffuser` call signature and parameter-group names on a few
    dense layers. The trainer's arithmetic (accumulation over flows, weights, multipliers,
    EMA, microbatches) is checked on it exactly, each check compiling in about a second.
  * the real diffuser of `configs/train_tiny.py:test` (one level, all five parameter groups):
    overfitting, resume, divergence and export run the real train step. All of them use the
    same step settings (`_real_cfg`), so XLA compiles that program once (~20-50 s on this
    CPU) and every run reuses it.
"""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from vd_jax.checkpoint import flatten, load_part, read_config, write_checkpoint
from vd_jax.config import load_config
from vd_jax.diffusion.schedule import make_schedule
from vd_jax.models.init import random_params
from vd_jax.models.layers import timestep_embedding
from vd_jax.errors import ConfigError
from vd_jax.train.optim import OptimConfig
from vd_jax.train.settings import StepConfig, apply_overrides, parse_flows
from vd_jax.train.init_from import apply_init_sources
from vd_jax.train.inputs import SyntheticLatentSource, record_spec
from vd_jax.train import (Checkpointer, TrainingDiverged, export_from_workdir, load_metrics,
                               make_model, setup, train)
from vd_jax.train.optim import group_of, lr_schedule, make_optimizer, multiplier_tree
from vd_jax.sharding import create_mesh
from vd_jax.train.step import (_new_state, abstract_boxed_params, draw_noise, loss_and_grads,
                               state_shardings, train_step)

import train_helper

ROOT = os.path.join(os.path.dirname(__file__), '..')
FLOWS = (('t2i', 'image', 'text'), ('i2i', 'image', 'image'), ('i2t', 'text', 'image'),
         ('t2t', 'text', 'text'))


# ----------------------------------------------------------------------------------------
# A stand-in diffuser for the trainer's arithmetic
# ----------------------------------------------------------------------------------------

class _ToyStream(nn.Module):
    channels: int
    has_global: bool

    def setup(self):
        if self.has_global:
            self.time_embed_0 = nn.Dense(8)
        self.data_blocks_0 = nn.Dense(self.channels)
        self.context_blocks_0 = nn.Dense(8)


class ToyDiffuser(nn.Module):
    """`Diffuser`'s signature and group names: image/{time_embed_0,data_blocks_0,
    context_blocks_0}, text/{data_blocks_0,context_blocks_0}."""

    def setup(self):
        self.image = _ToyStream(4, True)
        self.text = _ToyStream(16, False)

    def __call__(self, x, t, context, xtype='image', ctype='text'):
        temb = self.image.time_embed_0(timestep_embedding(t, 8))
        h = jnp.tanh(temb + getattr(self, ctype).context_blocks_0(context.mean(1)))
        h = h.reshape(h.shape[:1] + (1,) * (x.ndim - 2) + h.shape[1:])
        h = jnp.broadcast_to(h, x.shape[:-1] + (8,))
        return getattr(self, xtype).data_blocks_0(jnp.concatenate([x, h], -1))

    def init_all(self, batch):
        return [self(jnp.zeros((batch, 2, 2, 4) if x == 'image' else (batch, 16)),
                     jnp.zeros((batch,)), jnp.zeros((batch, 3, 6)), x, c) for _, x, c in FLOWS]


def _toy_sc(weights=(1.0, 1.0, 1.0, 1.0), optim=None, microbatches=1):
    return StepConfig(model=ToyDiffuser(),
                      flows=tuple((n, x, c, w) for (n, x, c), w in zip(FLOWS, weights)),
                      schedule=(0.00085, 0.012, 1000),
                      optim=optim or OptimConfig(name='sgd', lr=0.5), ema_decay=0.9,
                      ema_use_num_updates=True, microbatches=microbatches, seed=3)


@pytest.fixture(scope='module')
def toy():
    model = ToyDiffuser()
    params = model.init(jax.random.PRNGKey(0), 2, method=ToyDiffuser.init_all)['params']
    rng = np.random.default_rng(0)
    b = 4
    batch = {'index': jnp.arange(10, 10 + b, dtype=jnp.int32),
             'latent_image': jnp.asarray(rng.standard_normal((b, 2, 2, 4)), jnp.float32),
             'latent_text': jnp.asarray(rng.standard_normal((b, 16)), jnp.float32),
             'context_image': jnp.asarray(rng.standard_normal((b, 5, 6)), jnp.float32),
             'context_text': jnp.asarray(rng.standard_normal((b, 3, 6)), jnp.float32)}
    return model, params, batch


_grads = jax.jit(loss_and_grads, static_argnums=3)
_step = jax.jit(train_step, static_argnums=2)
_new = jax.jit(_new_state, static_argnums=1)


def _ref_flow_loss(model, params, batch, flow, t, eps):
    """The epsilon loss written out independently of the trainer."""
    _, xtype, ctype = flow
    x0 = batch[f'latent_{xtype}']
    ac = make_schedule(beta_linear_start=0.00085, beta_linear_end=0.012,
                       timesteps=1000).alphas_cumprod[t]
    ac = ac.reshape((-1,) + (1,) * (x0.ndim - 1))
    x_t = jnp.sqrt(ac) * x0 + jnp.sqrt(1 - ac) * eps
    pred = model.apply({'params': params}, x_t, t, batch[f'context_{ctype}'], xtype, ctype)
    return jnp.mean((pred - eps) ** 2)


def _tree_close(a, b, rtol=1e-5, atol=1e-7):
    for (pa, va), vb in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(va), np.asarray(vb), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(pa))


@jax.jit
def _ref_grads(params, batch, noise):
    """Per flow, jax.grad of the written-out loss: (losses, grads), 4 of each."""
    model = ToyDiffuser()
    out = [jax.value_and_grad(lambda p, f=f, n=n: _ref_flow_loss(model, p, batch, f, *n))(params)
           for f, n in zip(FLOWS, noise)]
    return [o[0] for o in out], [o[1] for o in out]


@pytest.mark.slow
def test_accumulated_gradient_is_the_weighted_sum_of_single_flow_gradients(toy):
    model, params, batch = toy
    weights = (1.0, 0.5, 2.0, 0.25)
    sc = _toy_sc(weights)
    key = jax.random.PRNGKey(7)
    losses, grads = _grads(params, batch, key, sc)
    # single-flow gradients from an independent reference (same t and eps per record)
    ref_losses, ref_grads = _ref_grads(params, batch, draw_noise(sc, key, batch))
    total = jax.tree.map(jnp.zeros_like, params)
    for (name, _, _), w, loss_f, g in zip(FLOWS, weights, ref_losses, ref_grads):
        np.testing.assert_allclose(losses[f'loss/{name}'], loss_f, rtol=1e-6)
        total = jax.tree.map(lambda a, b, w=w: a + w * b, total, g)
    _tree_close(grads, total)
    # every leaf got gradient from some flow (nothing silently disconnected), and each flow
    # reaches exactly the groups it uses (t2t: global + text data + text context)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)
    used = {group_of(p) for p, g in flatten(ref_grads[3]).items() if np.abs(g).max() > 0}
    assert used == {'global', 'text_data', 'text_context'}


@pytest.mark.slow
def test_microbatches_give_the_full_batch_gradient(toy):
    model, params, batch = toy
    key = jax.random.PRNGKey(1)
    l1, g1 = _grads(params, batch, key, _toy_sc())
    l2, g2 = _grads(params, batch, key, _toy_sc(microbatches=2))
    _tree_close(g1, g2)
    for k in l1:
        np.testing.assert_allclose(l1[k], l2[k], rtol=1e-6)


@pytest.mark.slow
def test_noise_depends_on_the_record_not_its_batch_position(toy):
    _, _, batch = toy
    sc = _toy_sc()
    perm = np.array([2, 0, 3, 1])
    shuffled = {k: v[perm] for k, v in batch.items()}
    for (t1, e1), (t2, e2) in zip(draw_noise(sc, jax.random.PRNGKey(0), batch),
                                  draw_noise(sc, jax.random.PRNGKey(0), shuffled)):
        np.testing.assert_array_equal(np.asarray(t1)[perm], t2)
        np.testing.assert_array_equal(np.asarray(e1)[perm], e2)
    t_image = np.asarray(draw_noise(sc, jax.random.PRNGKey(0), batch)[0][0])
    assert len(set(t_image.tolist())) > 1  # each record its own t


MULTS = {'image_data': 0.25, 'text_context': 0.0, 'global': 3.0}
_SGD_MULT = OptimConfig(name='sgd', lr=0.5, multipliers=tuple(MULTS.items()))


@pytest.mark.slow
def test_group_multiplier_scales_exactly_that_groups_update(toy):
    model, params, batch = toy
    # optimizer level, plain SGD: the update is linear in the gradient, so each group's update
    # must be exactly multiplier x the update without multipliers
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p) + 0.1, params)
    base = make_optimizer(OptimConfig(name='sgd', lr=0.5), params)
    mult = make_optimizer(_SGD_MULT, params)
    u0, _ = base.update(grads, base.init(params), params)
    u1, _ = mult.update(grads, mult.init(params), params)
    for path, a in flatten(u0).items():
        m = MULTS.get(group_of(path), 1.0)
        np.testing.assert_array_equal(np.asarray(flatten(u1)[path]), m * np.asarray(a), err_msg=path)
    # through the jitted train step: p1 - p0 = -lr * multiplier * (accumulated gradient)
    sc = _toy_sc(optim=_SGD_MULT)
    s1, _ = _step(_new(params, sc), batch, sc)
    _, g = _grads(params, batch, jax.random.fold_in(jax.random.PRNGKey(sc.seed), 0), _toy_sc())
    p0, p1, gf = flatten(params), flatten(s1.params), flatten(g)
    for path in p0:
        m = MULTS.get(group_of(path), 1.0)
        if m == 0:
            np.testing.assert_array_equal(p1[path], p0[path], err_msg=path)  # frozen exactly
        else:
            np.testing.assert_allclose(np.asarray(p1[path]) - p0[path], -0.5 * m * gf[path],
                                       rtol=1e-5, atol=1e-6, err_msg=path)
            assert np.abs(gf[path]).max() > 1e-3, path
    # AdamW with weight decay: a zero multiplier still freezes the group exactly
    adam = OptimConfig(name='adamw', lr=1e-2, weight_decay=0.1, multipliers=(('text_context', 0.0),))
    sca = _toy_sc(optim=adam)
    sa, _ = _step(_new(params, sca), batch, sca)
    for path, v in flatten(sa.params).items():
        same = np.array_equal(np.asarray(v), p0[path])
        assert same == (group_of(path) == 'text_context'), path


def test_multiplier_groups_cover_the_real_model_and_reject_unknown_names():
    cfg = load_config('train_tiny:test')
    params = random_params(nn.unbox(abstract_boxed_params(
        StepConfig.from_config(cfg, make_model(cfg)))))
    tree = multiplier_tree(params, {'image_data': 0.5})
    groups = {group_of(p) for p in flatten(params)}
    assert groups == {'global', 'image_data', 'image_context', 'text_data', 'text_context'}
    assert {v for p, v in flatten(tree).items() if group_of(p) == 'image_data'} == {0.5}
    with pytest.raises(ConfigError, match="unknown group.*'image_dta'"):
        multiplier_tree(params, {'image_dta': 0.5})
    with pytest.raises(ConfigError, match='belongs to no group'):
        group_of('image/foo/kernel')


@pytest.mark.slow
def test_ema_and_learning_rate_schedules(toy):
    model, params, batch = toy
    sc = _toy_sc(optim=_SGD_MULT)  # the multiplier test's program
    s1, m = _step(_new(params, sc), batch, sc)
    d = min(0.9, 2 / 11)  # LitEma: min(decay, (1 + n) / (10 + n)) after n = 1 update
    assert float(m['ema_decay']) == pytest.approx(d)
    expect = jax.tree.map(lambda p0, p1: p0 - (1 - d) * (p0 - p1), params, s1.params)
    _tree_close(s1.ema_params, expect, rtol=1e-6)
    cos = OptimConfig(lr=1.0, schedule='cosine', warmup_steps=10, decay_steps=90, end_lr_factor=0.1)
    f = lr_schedule(cos)
    assert [float(f(s)) for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(f(55)) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # half-way down the cosine
    assert float(f(100)) == pytest.approx(0.1)
    lin = lr_schedule(OptimConfig(lr=2.0, schedule='linear', decay_steps=10))
    assert [float(lin(s)) for s in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0])


# ----------------------------------------------------------------------------------------
# The real diffuser: overfitting, resume, divergence, export
# ----------------------------------------------------------------------------------------

def _real_cfg(*extra):
    """train_tiny:test with the settings every real-model test shares (one compiled step)."""
    cfg = load_config('train_tiny:test')
    apply_overrides(cfg, ['noise.fixed=True', 'optimizer.warmup_steps=0', 'optimizer.lr=1e-3',
                          'log_every=1000', 'tensorboard=False', *extra])
    return cfg


@pytest.mark.slow
def test_tiny_four_flow_model_overfits_a_tiny_set(tmp_path):
    # 8 records = one batch; each record keeps its (t, eps) (noise.fixed), so the loss is a
    # deterministic function of the weights and "falls by half" cannot be luck of the draw.
    # Observed: every flow at <15% of its first loss after 20 steps.
    cfg = _real_cfg('total_steps=20', 'data.num_records=8', 'checkpoint.every=1000')
    out = train(cfg, str(tmp_path))
    hist = out['history']
    first, last = hist[1], hist[20]
    for name, _, _ in FLOWS:
        assert last[f'loss/{name}'] < 0.5 * first[f'loss/{name}'], (name, first, last)
    # the EMA export is a checkpoint folder the samplers can load, holding the EMA weights
    exported = out['export']
    assert exported == os.path.join(str(tmp_path), 'export', 'step_20')
    model_cfg = read_config(exported)
    ema = load_part(exported, 'diffuser', expected=nn.unbox(
        abstract_boxed_params(StepConfig.from_config(cfg, make_model(cfg)))))
    _tree_close(ema, out['state'].ema_params, rtol=0, atol=0)
    assert model_cfg.diffuser.to_dict() == cfg.model.diffuser.to_dict()
    lines = load_metrics(str(tmp_path))
    assert sorted(lines) == list(range(1, 21)) and 'loss/t2t' in lines[20]


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    # 24 records, batch 8, shuffled every epoch: the batches after the restart depend on the
    # restored grain iterator state, the draws on (step, record).
    cfg = _real_cfg('total_steps=8', 'data.num_records=24', 'checkpoint.every=4')
    whole = train(cfg, str(tmp_path / 'whole'))

    def sigterm_at_4(step, metrics):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
    first = train(cfg, str(tmp_path / 'split'), hooks=[sigterm_at_4])
    assert first['status'] == 'preempted' and first['step'] == 4 and first['export'] is None
    assert Checkpointer(str(tmp_path / 'split'), 2).all_steps() == [4]
    second = train(cfg, str(tmp_path / 'split'))
    assert second['status'] == 'finished' and sorted(second['history']) == [5, 6, 7, 8]
    a, b = load_metrics(str(tmp_path / 'whole')), load_metrics(str(tmp_path / 'split'))
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in range(1, 9):
        assert a[s] == b[s], s  # bit-for-bit: same batches, same draws, same program
    assert len({round(a[s]['loss'], 6) for s in range(1, 9)}) == 8  # batches really differ
    _tree_close(whole['state'].params, second['state'].params, rtol=0, atol=0)
    _tree_close(whole['state'].ema_params, second['state'].ema_params, rtol=0, atol=0)
    _tree_close(whole['state'].opt_state, second['state'].opt_state, rtol=0, atol=0)
    # `train.py --export`: the EMA of the latest checkpoint, without training
    out = export_from_workdir(cfg, str(tmp_path / 'split'), out=str(tmp_path / 'exported'))
    _tree_close(load_part(out, 'diffuser'), whole['state'].ema_params, rtol=0, atol=0)


@pytest.mark.slow
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # (this run also starts from a "smaller setting": its image stream, through init sources)
    train_helper.write_image_only_source(tmp_path / 'basic', seed=5)
    cfg = _real_cfg('total_steps=10', 'data.num_records=48', 'data.shuffle=False',
                    'checkpoint.every=2', 'checkpoint.keep=2',
                    f'init.sources.smaller.path={tmp_path / "basic"}')
    spec = record_spec(cfg, parse_flows(cfg))
    # record 41 is in the 6th batch (records 40-47, no shuffling): its latents are NaN
    source = SyntheticLatentSource(48, spec, seed=0, nan_records=[41])
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, str(tmp_path / 'run'), data_source=source)
    msg = str(e.value)
    assert 'diverged at step 6' in msg and 'NOT saved' in msg and 'step 4' in msg, msg
    ckpt = Checkpointer(str(tmp_path / 'run'), 2)
    assert ckpt.all_steps() == [2, 4]
    abstract, _ = state_shardings(StepConfig.from_config(cfg, make_model(cfg)),
                                  create_mesh(dict(cfg.mesh)))
    state, meta = ckpt.restore(4, abstract)
    assert int(state.step) == 4 and meta['step'] == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert sorted(load_metrics(str(tmp_path / 'run'))) == [1, 2, 3, 4, 5]  # bad step not logged
    assert not os.path.exists(str(tmp_path / 'run' / 'export'))
    with open(tmp_path / 'run' / 'init_report.json') as f:
        report = json.load(f)
    assert report['groups']['image_data']['from'] == {'smaller': report['groups']['image_data']['params']}
    assert set(report['groups']['text_data']['from']) == {'fresh init'}


@pytest.mark.slow
def test_raw_images_are_encoded_on_device_by_the_frozen_encoders(tmp_path):
    # image-caption records -> tokenized captions on the host -> AutoKL / CLIP / Optimus (random
    # weights here) on device -> the same train step as the synthetic runs (same shapes)
    from vd_jax.data import SyntheticImageSource
    from vd_jax.sharding import global_batch
    cfg = _real_cfg('total_steps=2', 'data.kind=images', 'encoders.ckpt=random',
                    'data.image_size=16', 'export.at_end=False')
    source = SyntheticImageSource(16, [(20, 24), (24, 20)], seed=3)
    run = setup(cfg, str(tmp_path / 'a'), data_source=source)
    host = run.host_prep(next(iter(run.loader)))
    assert sorted(host) == ['image', 'index', 'tokens_bert', 'tokens_clip']
    assert host['tokens_clip'].shape == (8, 77) and host['image'].shape == (8, 16, 16, 3)
    batch = global_batch(host, run.mesh, run.sc.rules)
    assert run.encode_records
    enc = run.frozen(batch, jax.random.PRNGKey(0))
    spec = record_spec(cfg, run.flows)
    assert {k: v.shape[1:] for k, v in enc.items() if k != 'index'} == spec
    again = run.frozen(batch, jax.random.PRNGKey(1))  # another posterior sample, same contexts
    assert not np.array_equal(enc['latent_image'], again['latent_image'])
    for k in ('context_text', 'context_image', 'latent_text'):
        np.testing.assert_array_equal(enc[k], again[k])
    out = train(cfg, str(tmp_path / 'b'), data_source=source)
    assert sorted(out['history']) == [1, 2]
    assert all(np.isfinite(v) for v in out['history'][2].values())
    # the same encoders, once, into a pre-encoded dataset (centre crops) -> data.kind=encoded
    from vd_jax.data import preencode
    from vd_jax.train.inputs import make_encode_fn
    builder = preencode(source, make_encode_fn(run.frozen), str(tmp_path / 'enc'),
                        image_size=16, batch_size=8)
    record = builder.as_data_source()['train'][0]
    assert {k: tuple(record[k].shape) for k in spec} == spec
    enc_cfg = _real_cfg('total_steps=2', 'data.kind=encoded', 'export.at_end=False',
                        f'data.path={tmp_path / "enc"}')
    out = train(enc_cfg, str(tmp_path / 'c'))
    assert sorted(out['history']) == [1, 2]
    assert all(np.isfinite(v) for v in out['history'][2].values())


# ----------------------------------------------------------------------------------------
# Initialisation from other checkpoints (host-side, no compile)
# ----------------------------------------------------------------------------------------

def _abstract(model_cfg):
    from vd_jax.models.init import abstract_params
    from vd_jax.models.unet import Diffuser
    return abstract_params(Diffuser(model_cfg.diffuser))


def _host(tree, seed):
    return jax.tree.map(np.asarray, random_params(tree, seed=seed))


def test_init_from_a_smaller_setting_copies_what_both_have(tmp_path):
    big = load_config('train_tiny:test')
    small_model = train_helper.image_only_model(big.model)  # VD-basic
    small = _host(_abstract(small_model), 1)
    write_checkpoint(str(tmp_path / 'basic'), small_model, {'diffuser': small})
    fresh = _host(_abstract(big.model), 2)
    new, report = apply_init_sources(fresh, [('smaller', str(tmp_path / 'basic'), '*')], big.model)
    fs, fn, ff = flatten(small), flatten(new), flatten(fresh)
    assert set(fs) < set(fn)
    for k in fn:
        np.testing.assert_array_equal(fn[k], fs[k] if k in fs else ff[k], err_msg=k)
    groups = report['groups']
    assert set(groups['image_data']['from']) == {'smaller'}
    assert set(groups['global']['from']) == {'smaller'}
    assert set(groups['image_context']['from']) == {'smaller'}
    assert set(groups['text_data']['from']) == set(groups['text_context']['from']) == {'fresh init'}
    assert report['sources']['smaller']['copied_tensors'] == len(fs)
    assert report['sources']['smaller']['unused_source_tensors'] == 0


@pytest.mark.slow
def test_exact_init_with_sources_initialises_only_the_rest(tmp_path):
    """`initial_state` applies the sources to the abstract tree and initialises only the leaves
    none provides: bitwise what the whole init followed by the sources gives (the whole init
    is the reference: the same program before its other outputs were dropped)."""
    from vd_jax.train.run import initial_state, setup
    from vd_jax.train.step import init_params_sharded
    from vd_jax.sharding import gather
    train_helper.write_image_only_source(tmp_path / 'basic', seed=3)
    cfg = _real_cfg('init.method=exact', f'init.sources.smaller.path={tmp_path / "basic"}')
    run = setup(cfg, str(tmp_path / 'run'))
    got = flatten(gather(initial_state(run).params))
    whole = gather(init_params_sharded(run.sc, run.mesh, run.shardings.params,
                                       jax.random.PRNGKey(cfg.seed)))
    want, report = apply_init_sources(whole, [('smaller', str(tmp_path / 'basic'), '*')],
                                      cfg.model)
    want = flatten(want)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    # both kinds are there: copied leaves and fresh ones (the text stream)
    fresh = [k for k in want if k.startswith('text/')]
    assert fresh and len(fresh) < len(want)
    assert any(not np.array_equal(want[k], flatten(whole)[k]) for k in want if k.startswith('image/'))
    with open(tmp_path / 'run' / 'init_report.json') as f:
        assert json.load(f) == json.loads(json.dumps(report))


def test_init_from_a_diffusers_sd_unet_maps_cross_attention_to_text_context(tmp_path):
    import torch
    from diffusers import UNet2DConditionModel
    from vd_jax.convert import convert_checkpoint
    cfg = load_config('train_tiny:test')
    torch.manual_seed(0)
    # an SD-style UNet shaped like the test model's image stream (one level, mid-block
    # cross-attention to 32-d contexts)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
        block_out_channels=(32,), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=32, down_block_types=('DownBlock2D',),
        up_block_types=('UpBlock2D',))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    unet.save_pretrained(str(tmp_path / 'sd' / 'unet'))  # an SD pipeline folder layout
    fresh = _host(_abstract(cfg.model), 2)
    sources = [('sd', str(tmp_path / 'sd'),
                'image/time_embed->image/time_embed, image/data_blocks->image/data_blocks'),
               ('sd_text', str(tmp_path / 'sd' / 'unet'), ['image/context_blocks->text/context_blocks'])]
    new, report = apply_init_sources(fresh, sources, cfg.model)
    fn, ff = flatten(new), flatten(fresh)
    # reference: the converter run on the state dict directly
    image_only = train_helper.image_only_model(cfg.model)
    ref = flatten(convert_checkpoint({f'image_unet.{k}': v for k, v in unet.state_dict().items()},
                                     image_only, parts=['diffuser'])['diffuser'])
    for k in fn:
        group = group_of(k)
        if group in ('global', 'image_data'):
            np.testing.assert_array_equal(fn[k], ref[k], err_msg=k)
        elif group == 'text_context':
            np.testing.assert_array_equal(fn[k], ref['image/' + k.split('/', 1)[1]], err_msg=k)
        else:  # image-context (SD-variation's job) and text data layers stay fresh
            np.testing.assert_array_equal(fn[k], ff[k], err_msg=k)
    # spot check against torch itself: SD's mid-block cross-attention key projection
    w = unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.weight.detach().numpy()
    np.testing.assert_array_equal(
        fn['text/context_blocks_0/transformer_blocks_0/attn2/to_k/kernel'], w.T)
    assert report['groups']['text_context']['from'] == {'sd_text': report['groups']['text_context']['params']}
    # mistakes are errors, not silent no-ops
    with pytest.raises(ConfigError, match='copied nothing'):
        apply_init_sources(fresh, [('sd', str(tmp_path / 'sd'), 'image/data_blokcs->image/data_blocks')],
                           cfg.model, loaded={'sd': ref})
    with pytest.raises(ConfigError, match='provided by both'):
        apply_init_sources(fresh, [('a', '', '*'), ('b', '', 'image/data_blocks->image/data_blocks')],
                           cfg.model, loaded={'a': ref, 'b': ref})


# ----------------------------------------------------------------------------------------
# Configs and the command line
# ----------------------------------------------------------------------------------------

def test_overrides_are_typed_and_typos_fail():
    cfg = load_config('train_tiny')
    apply_overrides(cfg, ['optimizer.lr=5e-5', '--config.total_steps=7', 'remat=True',
                          "flows=['t2i','i2i']", 'mesh.fsdp=2', 'data.path=/x/y',
                          "logical_axis_rules=[('batch', 'data')]", 'grad_multipliers.global=0.1'])
    assert cfg.optimizer.lr == 5e-5 and cfg.total_steps == 7 and cfg.remat is True
    assert cfg.flows == ['t2i', 'i2i'] and cfg.mesh.fsdp == 2 and cfg.data.path == '/x/y'
    assert cfg.grad_multipliers['global'] == 0.1
    assert [f[0] for f in parse_flows(cfg)] == ['t2i', 'i2i']
    with pytest.raises(ConfigError, match=r"no key 'optimizer.lrr'.*did you mean.*optimizer.lr"):
        apply_overrides(cfg, ['optimizer.lrr=1'])
    with pytest.raises(ConfigError, match="total_steps='abc': cannot parse"):
        apply_overrides(cfg, ['total_steps=abc'])
    with pytest.raises(ConfigError, match="total_steps='1.5': expected a int"):
        apply_overrides(cfg, ['total_steps=1.5'])
    basic = load_config('train_vd_basic:tiny')
    apply_overrides(basic, ["flows=['t2i']"])
    with pytest.raises(ConfigError, match="flow 't2i' needs the context layers of stream 'text'"):
        parse_flows(basic)


@pytest.mark.slow
def test_train_py_rejects_a_mistyped_key(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--config',
                        'configs/train_tiny.py:test', '--workdir', str(tmp_path),
                        'optimizer.learning_rate=1e-4'], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no key 'optimizer.learning_rate'" in r.stderr
    assert not os.path.exists(os.path.join(str(tmp_path), 'checkpoints'))


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    """metrics.jsonl gets one line per step; with tensorboardX installed (the test extra) the
    same scalars land in a TensorBoard event file, read back here record by record."""
    import struct

    from tensorboardX.proto import event_pb2

    from vd_jax.train import MetricWriter
    w = MetricWriter(str(tmp_path), enabled=True, tensorboard=True)
    w.write(1, {'loss/t2i': 0.5, 'lr': 1e-4})
    w.write(2, {'loss/t2i': 0.25, 'lr': 2e-4})
    w.close()
    lines = [json.loads(x) for x in open(tmp_path / 'metrics.jsonl')]
    assert lines == [{'step': 1, 'loss/t2i': 0.5, 'lr': 1e-4}, {'step': 2, 'loss/t2i': 0.25, 'lr': 2e-4}]
    (event_file,) = (tmp_path / 'tensorboard').iterdir()
    data, got = event_file.read_bytes(), []
    while data:  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
        (n,) = struct.unpack('<Q', data[:8])
        ev = event_pb2.Event.FromString(data[12:12 + n])
        data = data[16 + n:]
        got += [(ev.step, v.tag, round(v.simple_value, 8)) for v in ev.summary.value]
    assert sorted(got) == [(1, 'loss/t2i', 0.5), (1, 'lr', 1e-4), (2, 'loss/t2i', 0.25), (2, 'lr', 2e-4)]
    # disabled (a non-main process): nothing is written
    MetricWriter(str(tmp_path / 'other'), enabled=False, tensorboard=True).write(1, {'a': 1.0})
    assert not (tmp_path / 'other').exists()
