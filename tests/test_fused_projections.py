"""Fused attention projections (`vd_jax.models.attention.fuse_projections`): the samplers'
CPU form of the diffuser params, one (C, 3 inner) q/k/v product per self-attention and one
(D, 2 inner) k/v product per cross-attention.

  * the tree: every attn1 gets `to_qkv`, every attn2 `to_kv`, with the original kernels side
    by side on the output axis; `unfuse_projections` gives the original tree back bit for
    bit; fusing a fused tree changes nothing; every other leaf is the same array;
  * the diffuser on the tiny config, every flow: fused params give the original's outputs
    within 1e-5 (float32; only the GEMM's blocking differs);
  * the pipeline samples with the fused form on CPU (computed once per weights) and gives
    the images of the original projections within 1e-5; on other backends it keeps them.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vd_jax.checkpoint import flatten
from vd_jax.models import attention
from vd_jax.models.attention import (FUSED_KV, FUSED_QKV, fuse_projections,
                                     unfuse_projections)

TOL = 1e-5


@pytest.fixture(scope='module')
def model(tiny_config):
    from vd_jax.models.init import abstract_params, random_params
    from vd_jax.models.unet import Diffuser
    d = Diffuser(tiny_config.model.diffuser)
    return d, random_params(abstract_params(d), 0)


def _modules(flat, name):
    return sorted(k[:-len(f'/{name}/kernel')] for k in flat if k.endswith(f'/{name}/kernel'))


def test_tree_has_one_fused_kernel_per_attention(model):
    _, params = model
    flat, fused = flatten(params), flatten(fuse_projections(params))
    attn1 = [m for m in _modules(flat, 'to_q') if m.endswith('/attn1')]
    attn2 = [m for m in _modules(flat, 'to_q') if m.endswith('/attn2')]
    assert attn1 and len(attn1) == len(attn2)
    assert _modules(fused, FUSED_QKV) == attn1
    assert _modules(fused, FUSED_KV) == attn2
    assert _modules(fused, 'to_q') == attn2          # cross-attention keeps its own q
    assert not _modules(fused, 'to_k') and not _modules(fused, 'to_v')
    for m in attn1:
        np.testing.assert_array_equal(
            fused[f'{m}/{FUSED_QKV}/kernel'],
            np.concatenate([flat[f'{m}/to_{p}/kernel'] for p in 'qkv'], -1))
    for m in attn2:
        np.testing.assert_array_equal(
            fused[f'{m}/{FUSED_KV}/kernel'],
            np.concatenate([flat[f'{m}/to_{p}/kernel'] for p in 'kv'], -1))
    untouched = [k for k in flat if '/to_q/' not in k and '/to_k/' not in k and '/to_v/' not in k]
    assert untouched and all(fused[k] is flat[k] for k in untouched)


def test_unfuse_is_the_inverse_and_fusing_twice_changes_nothing(model):
    _, params = model
    fused = fuse_projections(params)
    back = flatten(unfuse_projections(fused))
    assert sorted(back) == sorted(flatten(params))
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(back[k], v)
    twice = flatten(fuse_projections(fused))
    assert sorted(twice) == sorted(flatten(fused))
    assert all(twice[k] is v for k, v in flatten(fused).items())


def _inputs(d, xtype, b=2):
    rng = np.random.default_rng(3)
    s = d.config.stream(xtype)
    shape = (b, 8, 8, s.in_channels) if s.kind == '2d' else (b, s.in_channels)
    ctx = rng.normal(size=(b, 5, d.config.stream('text').context_dim))
    return (jnp.asarray(rng.normal(size=shape), jnp.float32), jnp.asarray([3, 500]),
            jnp.asarray(ctx, jnp.float32))


@pytest.mark.parametrize('flow', [('image', 'text'), ('image', 'image'), ('text', 'text'),
                                  ('text', 'image')])
def test_diffuser_gives_the_same_outputs(model, flow):
    d, params = model
    fused = fuse_projections(params)
    run = jax.jit(lambda p, x, t, c: d.apply({'params': p}, x, t, c, *flow))
    x, t, c = _inputs(d, flow[0])
    if flow[1] == 'image':
        c = c[..., :d.config.stream('image').context_dim]
    ref, out = run(params, x, t, c), run(fused, x, t, c)
    assert float(jnp.abs(ref).max()) > 1e-2
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL, rtol=0)


@pytest.fixture(scope='module')
def vd():
    from vd_jax.pipeline import VersatileDiffusion
    return VersatileDiffusion.random('tiny', seed=0)


def _t2i(vd):
    return vd.text_to_image(['a red circle'], n=2, steps=3, seed=0, scale=3.0)


@pytest.mark.slow
def test_pipeline_samples_fused_on_cpu(vd, monkeypatch):
    comps = vd.components
    fused_params = comps.sampling_params()
    assert any(k.endswith(f'/{FUSED_QKV}/kernel') for k in flatten(fused_params))
    assert comps.sampling_params() is fused_params          # computed once per weights
    fused = _t2i(vd)
    monkeypatch.setattr(attention, 'FUSE_BACKENDS', ())     # as on a GPU/TPU backend
    assert comps.sampling_params() is comps.params['diffuser']
    original = _t2i(vd)
    np.testing.assert_allclose(fused, original, atol=2, rtol=0)   # uint8 images
    assert np.abs(fused.astype(int) - original.astype(int)).mean() < 0.05


@pytest.mark.slow
def test_new_weights_are_fused_again(vd):
    comps = vd.components
    old = comps.sampling_params()
    new = jax.tree.map(lambda a: a * 1.0, comps.params['diffuser'])
    comps.set_params('diffuser', new)
    fresh = comps.sampling_params()
    assert fresh is not old
    k = next(k for k in flatten(fresh) if k.endswith(f'/{FUSED_QKV}/kernel'))
    m = k[:-len(f'/{FUSED_QKV}/kernel')]
    np.testing.assert_array_equal(
        flatten(fresh)[k], np.concatenate([flatten(new)[f'{m}/to_{p}/kernel'] for p in 'qkv'], -1))
