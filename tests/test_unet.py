"""The grouped diffuser: structure at full size (no allocation), configs, flows and mixing."""
import json

import jax
import jax.numpy as jnp
import listing
import numpy as np
import pytest

from vd_jax.config import load_config
from vd_jax.models.init import init_params as init_module, random_params
from vd_jax.models.attention import SpatialTransformer
from vd_jax.models.diffuser_config import DiffuserConfig, plan_stream
from vd_jax.models.unet import Diffuser, FCBlock, ResBlock
from vd_jax.models.init import abstract_params



def _count(tree):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def counts():
    return listing.param_counts()


@pytest.mark.slow
def test_four_flow_full_size_parameter_counts(counts):
    p = abstract_params(Diffuser(load_config('vd_four_flow').model.diffuser))
    assert _count(p) == 2_566_318_852 == counts['diffuser (total)']
    img, txt = p['image'], p['text']
    assert _count({k: v for k, v in img.items() if k.startswith('time_embed')}) == 2_050_560
    assert _count({k: v for k, v in img.items() if k.startswith('data_blocks')}) == 590_231_044
    assert _count({k: v for k, v in img.items() if k.startswith('context_blocks')}) == 267_239_360
    assert _count({k: v for k, v in txt.items() if k.startswith('data_blocks')}) == 1_439_558_528
    assert _count({k: v for k, v in txt.items() if k.startswith('context_blocks')}) == 267_239_360
    assert not any(k.startswith('time_embed') for k in txt)  # global_layer_ptr: image
    # spot-check the text stream's shapes against the key listing (tests/data/vd_keys_fourflow.tsv)
    assert img['data_blocks_29']['out_2']['kernel'].shape == (3, 3, 320, 4)
    assert txt['data_blocks_14']['in_layers_2']['kernel'].shape == (10240, 5120)


def test_layer_order_and_block_counts(counts):
    dcfg = DiffuserConfig.from_dict(load_config('vd_four_flow').model.diffuser)
    for s in dcfg.streams:
        plan = plan_stream(s)
        assert plan.order == counts[f'layer_order_{s.name}']
        assert len(plan.data) == counts[f'n_data_blocks_{s.name}'] == 30
        assert len(plan.context) == counts[f'n_context_blocks_{s.name}'] == 16


@pytest.mark.slow
def test_progressive_settings_build_only_their_streams():
    basic = abstract_params(Diffuser(load_config('vd_basic').model.diffuser))
    assert set(basic) == {'image'} and _count(basic) == 859_520_964  # = the SD-v1 UNet
    dc = abstract_params(Diffuser(load_config('vd_dc').model.diffuser))
    assert set(dc['text']) == {f'context_blocks_{i}' for i in range(16)}
    assert _count(dc) == 859_520_964 + 267_239_360


@pytest.mark.slow
def test_other_widths_can_be_written_down():
    """A text latent width other than 768 and a context width other than 768."""
    cfg = load_config('vd_four_flow').model.diffuser.to_dict()
    cfg['streams']['text']['input_channels'] = 512
    cfg['streams']['text']['output_channels'] = 512
    for s in cfg['streams'].values():
        s['context_dim'] = 1024
    p = abstract_params(Diffuser(cfg))
    assert p['text']['data_blocks_0']['linear']['kernel'].shape == (512, 1280)
    assert p['text']['data_blocks_29']['out_2']['kernel'].shape == (1280, 512)
    assert p['image']['context_blocks_0']['transformer_blocks_0']['attn2']['to_k']['kernel'].shape \
        == (1024, 320)


def test_config_errors_name_the_problem():
    base = load_config('vd_four_flow').model.diffuser.to_dict()
    bad = json.loads(json.dumps(base))
    bad['streams']['text']['with_attn'] = [True, True, False, False]
    with pytest.raises(ValueError, match='layer order'):
        DiffuserConfig.from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad['streams']['image']['bogus'] = 1
    with pytest.raises(ValueError, match="unknown argument.*bogus"):
        DiffuserConfig.from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad['global_layer_ptr'] = 'text'
    with pytest.raises(ValueError, match="global_layer_ptr 'text'"):
        DiffuserConfig.from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad['streams']['text']['second_dim'] = [4, 4, 2, 4]
    with pytest.raises(ValueError, match='second_dim'):
        DiffuserConfig.from_dict(bad)


@pytest.fixture(scope='module')
def tiny():
    cfg = load_config('tiny').model
    model = Diffuser(cfg.diffuser)
    # random weights everywhere (the original's zero-init output layers would make every
    # flow output 0)
    return model, random_params(abstract_params(model), seed=0)


def _inputs(key=0):
    ks = jax.random.split(jax.random.PRNGKey(key), 4)
    return dict(x_img=jax.random.normal(ks[0], (2, 16, 16, 4)), x_txt=jax.random.normal(ks[1], (2, 16)),
                c_txt=jax.random.normal(ks[2], (2, 7, 32)), c_img=jax.random.normal(ks[3], (2, 9, 32)),
                t=jnp.array([5, 900]))


@pytest.mark.slow
def test_initialisers_match_original():
    """zero_module in the original: the last layer of each block and of the network; other
    layers U(+-1/sqrt(fan_in)) as PyTorch's defaults."""
    key = jax.random.PRNGKey(0)
    p = init_module(ResBlock(32, 64), key, jnp.zeros((1, 4, 4, 32)), jnp.zeros((1, 128)))
    assert float(jnp.abs(p['out_layers_3']['kernel']).max()) == 0
    k = np.asarray(p['in_layers_2']['kernel'])
    assert 0.9 / np.sqrt(9 * 32) < np.abs(k).max() <= 1 / np.sqrt(9 * 32)
    p = init_module(FCBlock(32, 32, 4), key, jnp.zeros((1, 4, 1, 32)), jnp.zeros((1, 128)))
    assert float(jnp.abs(p['out_layers_3']['kernel']).max()) == 0
    p = init_module(SpatialTransformer(32, 2, 16), key, jnp.zeros((1, 2, 2, 32)), jnp.zeros((1, 3, 8)))
    assert float(jnp.abs(p['proj_out']['kernel']).max()) == 0
    assert float(jnp.abs(p['proj_in']['kernel']).max()) > 0


@pytest.mark.slow
def test_every_flow_runs_and_mixing_degenerates_to_single_flows(tiny):
    model, params = tiny
    i = _inputs()
    f = lambda *a, **k: model.apply({'params': params}, *a, **k)
    outs = {}
    for xt, x in (('image', i['x_img']), ('text', i['x_txt'])):
        for ct, c in (('image', i['c_img']), ('text', i['c_txt'])):
            outs[xt, ct] = f(x, i['t'], c, xt, ct)
            assert outs[xt, ct].shape == x.shape and outs[xt, ct].dtype == jnp.float32
            assert bool(jnp.all(jnp.isfinite(outs[xt, ct])))
        # ratio 1/0 is the single-context flow, exactly (for image and text outputs)
        m = f(x, i['t'], [i['c_txt'], i['c_img']], ['text', 'image'], [1.0, 0.0], xt, method='mix')
        np.testing.assert_array_equal(np.asarray(m), np.asarray(outs[xt, 'text']))
        m = f(x, i['t'], [i['c_txt'], i['c_img']], ['text', 'image'], [0.0, 3.0], xt, method='mix')
        np.testing.assert_array_equal(np.asarray(m), np.asarray(outs[xt, 'image']))
        # ratios are normalised
        a = f(x, i['t'], [i['c_txt'], i['c_img']], ['text', 'image'], [1.0, 1.0], xt, method='mix')
        b = f(x, i['t'], [i['c_txt'], i['c_img']], ['text', 'image'], [3.0, 3.0], xt, method='mix')
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        # layer mixing with every layer on one context is that flow
        m = f(x, i['t'], [i['c_txt'], i['c_img']], ['text', 'image'], [0.5, 0.5], xt, 'layer',
              layer_choices=[1] * 7, method='mix')
        np.testing.assert_array_equal(np.asarray(m), np.asarray(outs[xt, 'image']))
    assert float(jnp.abs(outs['image', 'image'] - outs['image', 'text']).max()) > 1e-3


@pytest.mark.slow
def test_contexts_in_groups_share_x_like_repeating_it(tiny):
    """context (G*B, L, D) with x (B, ...): x is shared by G context groups (the CFG halves)
    and the result is the call with x and t repeated G times, for every flow; the shared
    prefix runs once (fewer FLOPs)."""
    model, params = tiny
    i = _inputs()
    f = lambda *a: model.apply({'params': params}, *a)
    for xt, x in (('image', i['x_img']), ('text', i['x_txt'])):
        for ct, c in (('image', i['c_img']), ('text', i['c_txt'])):
            c3 = jnp.concatenate([c, c[::-1], 2 * c])            # three groups of B = 2
            want = f(jnp.concatenate([x] * 3), jnp.concatenate([i['t']] * 3), c3, xt, ct)
            got = f(x, i['t'], c3, xt, ct)
            assert got.shape == want.shape == (6,) + x.shape[1:]
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, err_msg=(xt, ct))
    flops = lambda *a: jax.jit(f, static_argnums=(3, 4)).lower(*a).compile().cost_analysis()['flops']
    c2 = jnp.concatenate([i['c_txt']] * 2)
    assert flops(i['x_img'], i['t'], c2, 'image', 'text') < flops(
        jnp.concatenate([i['x_img']] * 2), jnp.concatenate([i['t']] * 2), c2, 'image', 'text')
    with pytest.raises(ValueError, match='a multiple of B=2'):
        f(i['x_img'], i['t'], i['c_txt'][:1], 'image', 'text')


def test_guidance_passes_x_once_to_a_model_that_shares_it():
    """cfg_denoise calls a denoise_fn marked SHARES_X with x once and both halves' contexts,
    and the guided result equals the repeated-x call's."""
    from vd_jax.diffusion.guidance import SHARES_X, cfg_denoise
    seen = []

    def model(x, t, c):       # a model whose output depends on x, t and the context
        seen.append(x.shape[0])
        reps = c.shape[0] // x.shape[0]
        x, t = jnp.concatenate([x] * reps), jnp.concatenate([t] * reps)
        return x * c.mean((1, 2))[:, None] + t[:, None] * 0.01

    def plain(x, t, c):
        return model(x, t, c)
    setattr(model, SHARES_X, True)
    x, t = jnp.arange(6.0).reshape(2, 3), jnp.array([3, 4])
    c, u = jnp.ones((2, 4, 5)), jnp.zeros((2, 4, 5)) + 0.5
    a = cfg_denoise(model, 7.5)(x, t, c, u)
    assert seen == [2]
    b = cfg_denoise(plain, 7.5)(x, t, c, u)
    assert seen[-1] == 4
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    # the pipeline's single-flow conditioning is marked (its attribute spells SHARES_X)
    from vd_jax.diffusion.conditioning import Single
    from vd_jax.diffusion.guidance import shares_x
    assert shares_x(Single)


@pytest.mark.slow
def test_layer_mixing_from_a_key_is_the_drawn_choice(tiny):
    model, params = tiny
    i = _inputs()
    key = jax.random.PRNGKey(7)
    r = jnp.array([0.3, 0.7])
    drawn = np.asarray(jax.random.choice(key, 2, shape=(7,), p=r / r.sum()))
    f = lambda **k: model.apply({'params': params}, i['x_txt'], i['t'], [i['c_txt'], i['c_img']],
                                ['text', 'image'], r, 'text', 'layer', method='mix', **k)
    np.testing.assert_allclose(np.asarray(f(rng=key)), np.asarray(f(layer_choices=list(drawn))),
                               atol=1e-6)


@pytest.mark.slow
def test_bad_calls_name_the_problem(tiny):
    model, params = tiny
    i = _inputs()
    f = lambda *a, **k: model.apply({'params': params}, *a, **k)
    with pytest.raises(ValueError, match="xtype 'audio'"):
        f(i['x_img'], i['t'], i['c_txt'], 'audio', 'text')
    with pytest.raises(ValueError, match='divisible by 4'):
        f(i['x_img'][:, :10, :10], i['t'], i['c_txt'], 'image', 'text')
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        f(i['x_img'], i['t'], i['c_txt'], 'text', 'text')
    with pytest.raises(ValueError, match="context for 'text'"):
        f(i['x_img'], i['t'], i['c_txt'][..., :8], 'image', 'text')
    with pytest.raises(ValueError, match="mixing must be"):
        f(i['x_img'], i['t'], [i['c_txt']], ['text'], [1.0], 'image', 'model', method='mix')
    with pytest.raises(ValueError, match='layer_choices'):
        f(i['x_img'], i['t'], [i['c_txt']], ['text'], [1.0], 'image', 'layer', layer_choices=[3] * 7,
          method='mix')


@pytest.mark.slow
def test_bf16_compute_and_remat(tiny):
    model, params = tiny
    i = _inputs()
    cfg = load_config('tiny').model.diffuser

    # each program compiled whole (op by op, this test took 40-200 s)
    def t2i(m):
        return jax.jit(lambda p: m.apply({'params': p}, i['x_img'], i['t'], i['c_txt'], 'image',
                                         'text'))(params)
    ref = t2i(model)
    bf = t2i(Diffuser(cfg, dtype=jnp.bfloat16))
    assert bf.dtype == jnp.float32
    rel = float(jnp.abs(bf - ref).max() / jnp.abs(ref).max())
    assert 0 < rel < 0.1  # bf16 has ~3 significant digits through ~20 layers

    def grad(m):
        def loss(p):
            return jnp.mean(m.apply({'params': p}, i['x_txt'], i['t'], i['c_img'], 'text',
                                    'image') ** 2)
        return jax.jit(jax.grad(loss))(params)
    g0 = grad(model)
    g1 = grad(Diffuser(cfg, remat=True))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_attention_implementations_agree(tiny):
    """The diffuser's `attention` switch changes how, not what: dense and blockwise give the
    same flow outputs (fp32, atol 1e-5), and a bad value names itself."""
    model, params = tiny
    i = _inputs()
    outs = {}
    for impl in ('dense', 'blockwise', 'auto'):
        m = Diffuser(model.config, attention=impl)
        outs[impl] = np.asarray(m.apply({'params': params}, i['x_img'], i['t'], i['c_txt'],
                                        'image', 'text'))
    np.testing.assert_allclose(outs['blockwise'], outs['dense'], atol=1e-5)
    np.testing.assert_array_equal(outs['auto'], outs['dense'])  # 64 tokens: below the switch
    with pytest.raises(ValueError, match="'flash'"):
        Diffuser(model.config, attention='flash').apply({'params': params}, i['x_img'], i['t'],
                                                        i['c_txt'], 'image', 'text')
