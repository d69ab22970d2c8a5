"""LoRA adapters of the diffuser (vd_jax.lora): the formula, merged vs on the fly, several
adapters, scales, files, and loading into the pipeline without recompiles.

Reference: W' = W + scale * (alpha / r) * down @ up computed in float64 numpy and written into
the kernels directly; the tiny config's diffuser with random weights.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vd_jax.checkpoint import flatten, unflatten
from vd_jax.errors import CheckpointError, ConfigError
from vd_jax.lora.adapters import (Adapter, LoraSpec, check_save_dtype, init_tree, merge, read_adapter,
                                  sampling_weights, save_adapter, select_targets)
from vd_jax.lora.apply import LoraDiffuser, TrainableLora
from vd_jax.models.unet import Diffuser


@pytest.fixture(scope='module')
def model(tiny_config):
    from vd_jax.models.init import abstract_params, random_params
    d = Diffuser(tiny_config.model.diffuser)
    return d, random_params(abstract_params(d), 0)


def _inputs(d, xtype='image', b=2):
    rng = np.random.default_rng(0)
    s = d.config.stream(xtype)
    shape = (b, 8, 8, s.in_channels) if s.kind == '2d' else (b, s.in_channels)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(b, 5, d.config.stream('text').context_dim)), jnp.float32)
    return x, jnp.asarray([3, 500]), ctx


def _adapter(params, spec=None, seed=1, zero_up=False):
    """A random adapter on the spec's targets with a non-zero `up` (unless zero_up)."""
    spec = spec or LoraSpec()
    tree = init_tree(select_targets(params, spec), spec, seed)
    rng = np.random.default_rng(seed + 100)
    flat = {k: (v if k.endswith('lora_down') or zero_up else
                rng.normal(0, 0.05, v.shape).astype(np.float32)) for k, v in flatten(tree).items()}
    return Adapter.from_tree(unflatten(flat), spec, {'made_by': 'test'})


def _reference(params, adapters_scales):
    """Kernels + sum scale * (alpha/r) down @ up, in float64 numpy."""
    flat = {k: np.asarray(v, np.float64) for k, v in flatten(params).items()}
    for a, s in adapters_scales:
        for m in a.weights:
            k = f'{m}/kernel'
            flat[k] = flat[k] + s * a.delta(m).reshape(flat[k].shape)
    return unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


_JIT = {}


def _jitted(d, flow, fly: bool):
    """One compiled program per (flow, base | on the fly): the tests reuse them."""
    key = (d, flow, fly)
    if key not in _JIT:
        if fly:
            _JIT[key] = jax.jit(lambda p, lo, x, t, c: LoraDiffuser(d).apply(
                {'params': {'base': p, 'lora': lo}}, x, t, c, *flow))
        else:
            _JIT[key] = jax.jit(lambda p, x, t, c: d.apply({'params': p}, x, t, c, *flow))
    return _JIT[key]


def _run(d, params, flow=('image', 'text')):
    return np.asarray(_jitted(d, flow, False)(params, *_inputs(d, flow[0])))


def _fly(d, params, adapters_scales, flow=('image', 'text')):
    lora = {'weights': [sampling_weights(a) for a, _ in adapters_scales],
            'scales': jnp.asarray([s for _, s in adapters_scales], jnp.float32)}
    return np.asarray(_jitted(d, flow, True)(params, lora, *_inputs(d, flow[0])))


@pytest.mark.slow
def test_default_targets_are_the_attention_projections(model):
    _, params = model
    targets = select_targets(params, LoraSpec())
    assert targets and all('/context_blocks_' in k and '/attn' in k for k in targets)
    names = {k.split('/')[-2] for k in targets}
    assert names == {'to_q', 'to_k', 'to_v', 'to_out_0'}
    assert {k.split('/')[0] for k in targets} == {'image', 'text'}
    assert {k.split('/')[-3] for k in targets} == {'attn1', 'attn2'}


@pytest.mark.slow
def test_zero_up_is_the_base_model(model):
    d, params = model
    a = _adapter(params, zero_up=True)
    base = _run(d, params)
    np.testing.assert_array_equal(_fly(d, params, [(a, 1.0)]), base)
    merged = jax.jit(merge)(params, [sampling_weights(a)], jnp.ones((1,)))
    np.testing.assert_array_equal(_run(d, merged), base)


@pytest.mark.slow
def test_merge_matches_the_formula_and_on_the_fly(model):
    d, params = model
    spec = LoraSpec(ranks=(('image', 2), ('text', 3)), alphas=(('image', 4.0), ('text', 1.5)))
    a = _adapter(params, spec)
    ref = _run(d, _reference(params, [(a, 0.7)]))
    merged = _run(d, jax.jit(merge)(params, [sampling_weights(a)], jnp.asarray([0.7])))
    fly = _fly(d, params, [(a, 0.7)])
    assert np.abs(ref - _run(d, params)).max() > 1e-2   # the adapter does something
    np.testing.assert_allclose(merged, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fly, merged, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_on_the_fly_matches_the_formula_in_every_flow(model):
    d, params = model
    a = _adapter(params, LoraSpec(ranks=(('image', 2), ('text', 3))))
    for flow in (('text', 'text'), ('image', 'image'), ('text', 'image')):
        ref_f = _run(d, _reference(params, [(a, 0.7)]), flow)
        np.testing.assert_allclose(_fly(d, params, [(a, 0.7)], flow), ref_f, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_adapters_add_and_scale_zero_is_the_base(model):
    d, params = model
    a, b = _adapter(params, seed=1), _adapter(params, seed=2)
    ref = _run(d, _reference(params, [(a, 1.0), (b, -0.5)]))
    np.testing.assert_allclose(_fly(d, params, [(a, 1.0), (b, -0.5)]), ref, atol=1e-5)
    both = jax.jit(merge)(params, [sampling_weights(a), sampling_weights(b)],
                          jnp.asarray([1.0, -0.5]))
    np.testing.assert_allclose(_run(d, both), ref, atol=1e-5)
    np.testing.assert_allclose(_fly(d, params, [(a, 0.0), (b, 0.0)]), _run(d, params), atol=1e-6)


@pytest.mark.slow
def test_conv_and_dense_targets_by_pattern(model):
    """Any kernel by pattern: 3x3 convs and the text stream's flat dense layers too."""
    d, params = model
    spec = LoraSpec(targets=('image/data_blocks_1/in_layers_2/kernel', 'image/data_blocks_2/op/kernel',
                             'text/data_blocks_1/in_layers_2/kernel'), ranks=(('*', 2),),
                    alphas=(('*', 2.0),))
    a = _adapter(params, spec)
    for flow in (('image', 'text'), ('text', 'text')):
        ref = _run(d, _reference(params, [(a, 1.3)]), flow)
        assert np.abs(ref - _run(d, params, flow)).max() > 1e-3
        np.testing.assert_allclose(_fly(d, params, [(a, 1.3)], flow), ref, atol=1e-5)


def test_bad_patterns_are_named(model):
    _, params = model
    with pytest.raises(ConfigError, match='matches no diffuser parameter'):
        select_targets(params, LoraSpec(targets=('*/to_qq/kernel',)))
    with pytest.raises(ConfigError, match='Dense kernels'):
        select_targets(params, LoraSpec(targets=('*/norm1/scale',)))
    with pytest.raises(ConfigError, match="rank.bad"):
        LoraSpec.from_config({'rank': {'bad': -1}})


def test_save_load_round_trip(model, tmp_path):
    d, params = model
    spec = LoraSpec(ranks=(('image', 2), ('text', 3)), alphas=(('image', 4.0), ('text', 1.5)))
    a = _adapter(params, spec)
    path = save_adapter(str(tmp_path / 'a.safetensors'), a)
    b = read_adapter(path)
    assert b.info['made_by'] == 'test' and b.info['rank'] == {'image': [2], 'text': [3]}
    assert b.alphas == a.alphas and sorted(b.weights) == sorted(a.weights)
    for m in a.weights:
        for x, y in zip(a.weights[m], b.weights[m]):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(_fly(d, params, [(b, 0.7)]), _fly(d, params, [(a, 0.7)]))


def test_float16_files_are_half_the_size_and_read_back_rounded(model, tmp_path):
    _, params = model
    a = _adapter(params, LoraSpec(ranks=(('image', 4), ('text', 4))))
    p32 = save_adapter(str(tmp_path / 'a32.safetensors'), a)
    p16 = save_adapter(str(tmp_path / 'a16.safetensors'), a, dtype='float16')
    tensor_bytes = sum(x.nbytes for w in a.weights.values() for x in w)
    assert os.path.getsize(p32) - os.path.getsize(p16) >= 0.49 * tensor_bytes
    b = read_adapter(p16)
    assert b.alphas == a.alphas and b.info['rank'] == {'image': [4], 'text': [4]}
    for m in a.weights:
        for x, y in zip(a.weights[m], b.weights[m]):
            assert y.dtype == np.float32   # computed in float32 whatever the storage
            np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    with pytest.raises(ConfigError, match='dtype'):
        save_adapter(str(tmp_path / 'bad.safetensors'), a, dtype='int8')
    with pytest.raises(ConfigError, match=r'lora\.save_dtype'):
        check_save_dtype('bfloat16')


@pytest.mark.slow
def test_trainable_form_equals_on_the_fly_and_has_gradients(model):
    d, params = model
    spec = LoraSpec()
    a = _adapter(params, spec)
    x, t, ctx = _inputs(d, 'image')
    tl = TrainableLora(d, (('image', 4.0), ('text', 4.0)))
    tree = a.as_tree()

    def loss(p, base):
        out = tl.bind(base).apply({'params': p}, x, t, ctx, 'image', 'text')
        return jnp.sum(out ** 2), out
    (_, out), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(tree, params)
    np.testing.assert_allclose(np.asarray(out), _fly(d, params, [(a, 1.0)]), atol=1e-5)
    gl = flatten(g)
    # only the text stream's context adapters are on the t2i path
    assert all(np.abs(v).max() > 0 for k, v in gl.items() if k.startswith('text/'))
    assert all(np.abs(v).max() == 0 for k, v in gl.items() if k.startswith('image/'))
    assert hash(tl) == hash(tl.bind(params))   # the static form is what jit hashes


# ------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def vd():
    from vd_jax.pipeline import VersatileDiffusion
    return VersatileDiffusion.random('tiny', seed=0)


def _t2i(vd, **kw):
    return vd.text_to_image(['a red circle'], n=2, steps=3, seed=0, scale=3.0, **kw)


@pytest.mark.slow
def test_pipeline_load_scale_unload_without_recompiles(vd, tmp_path):
    from vd_jax.diffusion.sampling import _sample_jit
    a = _adapter(vd.params['diffuser'], seed=5)
    b = _adapter(vd.params['diffuser'], seed=6)
    pa, pb = (save_adapter(str(tmp_path / f'{n}.safetensors'), x) for n, x in (('a', a), ('b', b)))
    base = _t2i(vd)
    assert vd.load_lora(pa) == 'a' and vd.loras == {'a': 1.0}
    with_a = _t2i(vd)
    assert np.abs(with_a - base).max() > 1e-3
    # merged and on the fly agree; changing a scale recompiles nothing (either mode)
    vd.lora_mode = 'on_the_fly'
    np.testing.assert_allclose(_t2i(vd), with_a, atol=1e-4)
    vd.load_lora(pb, scale=0.5, name='second')
    n_compiled = _sample_jit._cache_size()
    for mode in ('on_the_fly', 'merge'):
        vd.lora_mode = mode
        vd.set_lora_scale('a', 0.0)
        vd.set_lora_scale('second', 0.0)
        off = _t2i(vd)
        np.testing.assert_allclose(off, base, atol=1e-5)
        vd.set_lora_scale('a', 1.0)
        vd.set_lora_scale('second', 0.5)
        _t2i(vd)
    assert _sample_jit._cache_size() <= n_compiled + 1   # merge mode: the base's program
    vd.unload_lora('a')
    assert vd.loras == {'second': 0.5}
    vd.unload_lora()
    np.testing.assert_array_equal(_t2i(vd), base)
    with pytest.raises(ConfigError, match="no LoRA named 'zzz'"):
        vd.unload_lora('zzz')


@pytest.mark.slow
def test_pipeline_refuses_what_does_not_fit(vd, tmp_path):
    a = _adapter(vd.params['diffuser'])
    wrong = 'image/context_blocks_0/transformer_blocks_0/attn1/to_zz'
    bad = Adapter({wrong: next(iter(a.weights.values()))}, {wrong: 1.0})
    p = save_adapter(str(tmp_path / 'bad.safetensors'), bad)
    with pytest.raises(CheckpointError, match='to_zz/kernel'):
        vd.load_lora(p)
    with pytest.raises(CheckpointError, match='does not exist'):
        vd.load_lora(str(tmp_path / 'nothing.safetensors'))
    good = save_adapter(str(tmp_path / 'g.safetensors'), a)
    vd.load_lora(good)
    with pytest.raises(ConfigError, match='already loaded'):
        vd.load_lora(good)
    with pytest.raises(ConfigError, match='scale must be finite'):
        vd.set_lora_scale('g', float('nan'))
    vd.unload_lora()
    assert not os.path.exists(str(tmp_path / 'g.safetensors.tmp'))
