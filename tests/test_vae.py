"""The image VAE (`vd_jax.models.vae`) and its converter (`vd_jax.convert.vae_rules`).

Reference: diffusers' `AutoencoderKL` at the tiny config of `configs.common.autokl(tiny=True)`
(block_out_channels (32, 64), layers_per_block 1, 32 groups, 4 latent channels), its norm
affines and biases perturbed so that a permuted or swapped 1-D tensor cannot hide.
Weights reach our module only through the converter (`convert_checkpoint(..., out=None)`).

Tolerance: 1e-4 max abs on moments and decoder outputs of magnitude ~1. Both sides are
fp32; the only differences are summation orders in convolutions, GroupNorm statistics and
the softmax through ~20 layers, measured at ~2e-6. Any mis-mapped tensor (a transposed
kernel, a swapped block, the wrong Downsample padding) gives errors of order 1e-1.
"""
import re

import jax
import jax.numpy as jnp
import listing
import numpy as np
import pytest
import torch

from configs.common import autokl
from vd_jax.checkpoint import flatten
from vd_jax.config import load_config
from vd_jax.convert import convert_checkpoint, export_part, plan_conversion
from vd_jax.convert.parts import LAYOUTS, REGISTRY, detect_layout
from vd_jax.convert.sources import ShapeSource
from vd_jax.convert.vae_rules import autokl_rows
from vd_jax.errors import CheckpointError
from vd_jax.models.init import param_count
from vd_jax.models.vae import (LATENT_SCALE, AutoencoderKL, AutoKLConfig,
                               vae_decode, vae_encode)

TOL = 1e-4


def _nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def _nchw(a):
    return torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())


def _diffusers_vae(attn_level1=False, seed=0, groups=32):
    """diffusers AutoencoderKL matching `autokl(tiny=True)` (optionally with attention at
    level 1, i.e. `attn_resolutions=[16]` at resolution 32; `groups`: norm_num_groups)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    torch.manual_seed(seed)
    down = ('DownEncoderBlock2D', 'AttnDownEncoderBlock2D' if attn_level1 else 'DownEncoderBlock2D')
    # diffusers lists decoder levels bottom-up: level 1 comes first
    up = ('AttnUpDecoderBlock2D' if attn_level1 else 'UpDecoderBlock2D', 'UpDecoderBlock2D')
    m = DiffusersAutoencoderKL(in_channels=3, out_channels=3, down_block_types=down,
                               up_block_types=up, block_out_channels=(32, 64), layers_per_block=1,
                               latent_channels=4, norm_num_groups=groups, sample_size=32)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:  # norm affines and biases off their defaults
                p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def _params(p):
    return {k: np.asarray(v) for k, v in flatten(p).items()}


def _assert_same_params(a, b):
    fa, fb = _params(a), _params(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope='module')
def ref():
    m = _diffusers_vae()
    sd = {f'vae.{k}': v for k, v in m.state_dict().items()}
    cfg = load_config('tiny').model
    params = convert_checkpoint(sd, cfg)['vae_image']
    model = AutoencoderKL(cfg.vae.image, latent_scale=cfg.latent_scale_factor.image)
    # eager on purpose: primitives compile once per shape and are shared by every test below,
    # which on this tiny model is cheaper than one jit compile per entry point
    encode = lambda p, x: model.apply({'params': p}, x, method=AutoencoderKL.encode)  # noqa: E731
    decode = lambda p, z: model.apply({'params': p}, z, method=AutoencoderKL.decode)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    return dict(m=m, sd=sd, cfg=cfg, params=params, model=model, encode=encode, decode=decode,
                images01=torch.rand(2, 3, 16, 16, generator=g),
                z=torch.randn(2, 4, 8, 8, generator=g))


# ----------------------------------------------------------------------------------------
# Parity with diffusers
# ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_parity_with_diffusers(ref):
    m, x01 = ref['m'], ref['images01']
    with torch.no_grad():
        post = m.encode(x01 * 2 - 1).latent_dist
        dec = m.decode(ref['z']).sample
    mean, logvar = ref['encode'](ref['params'], _nhwc(x01 * 2 - 1))
    assert mean.shape == (2, 8, 8, 4) and logvar.shape == (2, 8, 8, 4)
    err_mean = float(jnp.abs(mean - _nhwc(post.mean)).max())
    err_logvar = float(jnp.abs(logvar - _nhwc(post.logvar)).max())
    out = ref['decode'](ref['params'], _nhwc(ref['z']))
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
    err_dec = float(jnp.abs(out - _nhwc(dec)).max())
    print(f'max abs error: mean {err_mean:.2e}, logvar {err_logvar:.2e}, decode {err_dec:.2e}')
    assert err_mean < TOL and err_logvar < TOL and err_dec < TOL
    assert float(jnp.abs(_nhwc(dec)).max()) > 0.3  # outputs are not trivially small


@pytest.mark.slow
def test_parity_with_level_attention():
    """`attn_resolutions` adds AttnBlocks after every ResnetBlock of a level (both halves)."""
    m = _diffusers_vae(attn_level1=True, seed=2)
    vcfg = dict(autokl(tiny=True), attn_resolutions=[16])
    params = convert_checkpoint({f'vae.{k}': v for k, v in m.state_dict().items()},
                                {'vae': {'image': vcfg}})['vae_image']
    assert 'attn_0' in params['encoder']['down_1'] and 'attn_1' in params['decoder']['up_1']
    assert 'attn_0' not in params['encoder']['down_0']
    model = AutoencoderKL(vcfg)
    g = torch.Generator().manual_seed(3)
    x, z = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        post, dec = m.encode(x).latent_dist, m.decode(z).sample
    mean, logvar = model.apply({'params': params}, _nhwc(x), method='encode')
    out = model.apply({'params': params}, _nhwc(z), method='decode')
    assert float(jnp.abs(mean - _nhwc(post.mean)).max()) < TOL
    assert float(jnp.abs(logvar - _nhwc(post.logvar)).max()) < TOL
    assert float(jnp.abs(out - _nhwc(dec)).max()) < TOL
    # the LDM names of level attention round-trip too
    ldm = export_part(params, {'vae': {'image': vcfg}}, 'vae_image', 'ldm-autokl')
    assert 'encoder.down.1.attn.0.q.weight' in ldm and ldm['decoder.up.1.attn.1.q.weight'].ndim == 4
    _assert_same_params(convert_checkpoint(ldm, {'vae': {'image': vcfg}})['vae_image'], params)


def test_parity_with_fewer_norm_groups():
    """`norm_groups` (not in the original code; VD-mini's AutoKL uses 8) is diffusers'
    `norm_num_groups`, in every GroupNorm of both halves (8 groups of 4 and 8 channels)."""
    m = _diffusers_vae(attn_level1=True, seed=4, groups=8)
    vcfg = dict(autokl(tiny=True), attn_resolutions=[16], norm_groups=8)
    params = convert_checkpoint({f'vae.{k}': v for k, v in m.state_dict().items()},
                                {'vae': {'image': vcfg}})['vae_image']
    g = torch.Generator().manual_seed(5)
    x, z = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        post, dec = m.encode(x).latent_dist, m.decode(z).sample
    for groups, close in ((8, True), (32, False)):  # the same weights with 32 groups differ
        model = AutoencoderKL(dict(vcfg, norm_groups=groups))
        mean, _ = model.apply({'params': params}, _nhwc(x), method='encode')
        out = model.apply({'params': params}, _nhwc(z), method='decode')
        err = max(float(jnp.abs(mean - _nhwc(post.mean)).max()),
                  float(jnp.abs(out - _nhwc(dec)).max()))
        assert (err < TOL) == close, (groups, err)
    with pytest.raises(ValueError, match='norm_groups=24'):
        AutoKLConfig.from_dict(dict(autokl(tiny=True), norm_groups=24))


# ----------------------------------------------------------------------------------------
# Layouts: LDM (kl-f8.pth), v1.0 four-flow, diffusers legacy names
# ----------------------------------------------------------------------------------------

def _torch_dict(d):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}


@pytest.fixture(scope='module')
def ldm_sd(ref):
    return _torch_dict(export_part(ref['params'], ref['cfg'], 'vae_image', 'ldm-autokl'))


def test_ldm_names_agree_with_diffusers_own_converter(ref, ldm_sd):
    """Our LDM naming, read by diffusers' independent LDM->diffusers VAE converter, gives
    back the diffusers state dict exactly (names, shapes and values)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    assert ldm_sd['encoder.mid.attn_1.q.weight'].shape == (64, 64, 1, 1)
    assert 'encoder.down.1.block.0.nin_shortcut.weight' in ldm_sd
    assert 'decoder.up.1.upsample.conv.weight' in ldm_sd and 'decoder.up.0.upsample.conv.weight' not in ldm_sd
    back = convert_ldm_vae_checkpoint(dict(ldm_sd), ref['m'].config)
    want = ref['m'].state_dict()
    assert set(back) == set(want)
    for k in want:
        assert torch.equal(back[k].reshape(want[k].shape), want[k]), k
        assert back[k].shape == want[k].shape, k


def test_ldm_layouts_convert_to_identical_params(ref, ldm_sd):
    # stand-alone kl-f8.pth, with a training checkpoint's loss weights (ignored)
    src = dict(ldm_sd, **{'loss.logvar': torch.zeros(()),
                          'loss.discriminator.main.0.weight': torch.zeros(8, 3, 4, 4)})
    assert detect_layout(list(src)).name == 'ldm-autokl'
    _assert_same_params(convert_checkpoint(src, ref['cfg'])['vae_image'], ref['params'])
    # inside the v1.0 four-flow checkpoint; the diffuser is left out on purpose
    v1 = {f'vae.image.{k}': v for k, v in ldm_sd.items()}
    v1['diffuser.image.time_embed.0.weight'] = torch.zeros(128, 32)
    assert detect_layout(list(v1)).name == 'vd-v1.0'
    out = convert_checkpoint(v1, ref['cfg'], parts=['vae_image'])
    assert list(out) == ['vae_image']
    _assert_same_params(out['vae_image'], ref['params'])


def test_diffusers_legacy_attention_names_and_raw_file(ref):
    legacy = {}
    for k, v in ref['sd'].items():
        for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'),
                         ('to_out.0', 'proj_attn')):
            k = k.replace(f'attentions.0.{new}.', f'attentions.0.{old}.')
        legacy[k] = v
    assert 'vae.encoder.mid_block.attentions.0.proj_attn.weight' in legacy
    _assert_same_params(convert_checkpoint(legacy, ref['cfg'])['vae_image'], ref['params'])
    # a diffusers weights file opened directly (no `vae.` prefix)
    raw = {k[len('vae.'):]: v for k, v in ref['sd'].items()}
    assert detect_layout(list(raw)).name == 'diffusers-autokl'
    _assert_same_params(convert_checkpoint(raw, ref['cfg'])['vae_image'], ref['params'])
    # both names for one tensor: refused, not silently resolved
    both = dict(ref['sd'], **{'vae.encoder.mid_block.attentions.0.query.weight':
                              ref['sd']['vae.encoder.mid_block.attentions.0.to_q.weight']})
    with pytest.raises(CheckpointError, match='filled twice'):
        convert_checkpoint(both, ref['cfg'])


@pytest.mark.slow
def test_export_round_trip(ref):
    for layout in ('diffusers', 'vd-v1.0'):
        sd = export_part(ref['params'], ref['cfg'], 'vae_image', layout)
        if layout == 'diffusers':
            assert set(sd) == set(ref['sd'])
        else:
            sd['diffuser.x'] = np.zeros(1)
        got = convert_checkpoint(sd, ref['cfg'], parts=['vae_image'])['vae_image']
        _assert_same_params(got, ref['params'])


def test_stand_alone_detection_is_specific():
    ldm = ['encoder.conv_in.weight', 'encoder.mid.block_1.conv1.weight', 'decoder.conv_out.weight',
           'quant_conv.weight']
    assert detect_layout(ldm).name == 'ldm-autokl'
    stand_alone = [l for l in LAYOUTS if l.name in ('ldm-autokl', 'diffusers-autokl')]
    assert len(stand_alone) == 2
    # Optimus' stand-alone file also has `encoder.` / `decoder.` keys
    optimus = ['encoder.embeddings.word_embeddings.weight', 'encoder.encoder.layer.0.output.dense.weight',
               'encoder.linear.weight', 'decoder.transformer.wte.weight', 'decoder.lm_head.weight']
    for keys in (optimus, ldm + ['diffuser.image.time_embed.0.weight'],
                 ldm + ['model.diffusion_model.time_embed.0.weight'],
                 ['vae.' + k for k in ldm]):
        assert not any(l.detect(keys) for l in stand_alone), keys
    assert {'vd-v1.0', 'diffusers'} <= set(REGISTRY['vae_image'].claims)


# ----------------------------------------------------------------------------------------
# VD's conventions
# ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_vd_encode_conventions(ref):
    model, params, m = ref['model'], ref['params'], ref['m']
    assert model.latent_scale == ref['cfg'].latent_scale_factor['image'] == LATENT_SCALE == 0.18215
    x01 = _nhwc(ref['images01'])
    with torch.no_grad():
        post = m.encode(ref['images01'] * 2 - 1).latent_dist
    # the mean: diffusers' encode of x*2-1, times 0.18215
    lat = vae_encode(model, params, x01, sample=False)
    assert float(jnp.abs(lat - 0.18215 * _nhwc(post.mean)).max()) < TOL * 0.18215
    # a sample: deterministic per key (also under jit), different between keys,
    # = mean + std * N(0, 1)(key)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    s1, s2 = vae_encode(model, params, x01, k1), vae_encode(model, params, x01, k2)
    s1b = jax.jit(lambda p, x, k: vae_encode(model, p, x, k))(params, x01, k1)
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s1b), atol=1e-6)
    assert float(jnp.abs(s1 - s2).min()) > 0
    eps = (s1 / 0.18215 - _nhwc(post.mean)) / _nhwc(post.std)
    np.testing.assert_allclose(np.asarray(eps), np.asarray(jax.random.normal(k1, lat.shape)),
                               atol=1e-3)
    with pytest.raises(ValueError, match='needs a PRNG key'):
        vae_encode(model, params, x01)


def test_vd_decode_conventions(ref):
    model, params, m = ref['model'], ref['params'], ref['m']
    # large latents push the raw decoder output past [-1, 1] so that the clamp is exercised
    latents = 4.0 * ref['z']
    out = np.asarray(vae_decode(model, params, _nhwc(latents)))
    with torch.no_grad():
        raw = _nhwc(m.decode(latents / 0.18215).sample)
    want = np.clip((np.asarray(raw) + 1) / 2, 0, 1)
    assert out.shape == (2, 16, 16, 3)
    assert float(np.abs(out - want).max()) < TOL
    assert out.min() >= 0 and out.max() <= 1
    assert (np.asarray(raw) > 1).any() and (np.asarray(raw) < -1).any()


# ----------------------------------------------------------------------------------------
# Full size (shapes only)
# ----------------------------------------------------------------------------------------

def test_full_size_param_count():
    assert param_count(AutoencoderKL(autokl())) == 83_653_863
    assert AutoKLConfig.from_dict(autokl()).downsample_factor == 8


def test_fourflow_keys_map_onto_the_model():
    shapes = listing.shapes()
    vae = {k for k in shapes if k.startswith('vae.image.')}
    assert len(vae) == 248
    src = ShapeSource(shapes, 'vd_keys_fourflow.tsv')
    layout, plans, targets, _ = plan_conversion(src, load_config('vd_four_flow'), parts=['vae_image'])
    assert layout.name == 'vd-v1.0'
    plan = plans['vae_image']
    assert {e.source_key for e in plan.entries} == vae
    assert len(targets['vae_image']) == 248
    assert sum(int(np.prod(s)) for s in targets['vae_image'].values()) == 83_653_863
    path = {e.source_key[len('vae.image.'):]: e.path for e in plan.entries}
    assert path['encoder.down.0.block.1.norm1.weight'] == 'encoder/down_0/block_1/norm1/scale'
    assert path['encoder.mid.attn_1.q.weight'] == 'encoder/mid/attn_1/q/kernel'
    assert path['decoder.up.3.block.0.conv1.weight'] == 'decoder/up_3/block_0/conv1/kernel'
    assert len(autokl_rows(autokl())) == 248


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------

def test_bad_checkpoints(ref, ldm_sd):
    cfg = ref['cfg']
    bad = dict(ldm_sd)
    key = 'encoder.down.1.block.0.conv1.weight'
    bad[key] = bad[key].transpose(0, 1)
    with pytest.raises(CheckpointError, match=re.escape(f'{key}: shape (32, 64, 3, 3)')):
        convert_checkpoint(bad, cfg)
    missing = {k: v for k, v in ldm_sd.items() if k != 'decoder.mid.attn_1.k.weight'}
    with pytest.raises(CheckpointError, match='missing from the source:\n.*decoder/mid/attn_1/k/kernel'):
        convert_checkpoint(missing, cfg)
    extra = dict(ldm_sd, **{'encoder.down.0.block.5.conv1.weight': torch.zeros(32, 32, 3, 3)})
    with pytest.raises(CheckpointError, match=r'encoder\.down\.0\.block\.5\.conv1\.weight'):
        convert_checkpoint(extra, cfg)
    # a diffusers file whose attention weights are 4-D would be read with the wrong transform
    bad_attn = dict(ref['sd'])
    bad_attn['vae.decoder.mid_block.attentions.0.to_v.weight'] = \
        bad_attn['vae.decoder.mid_block.attentions.0.to_v.weight'][:, :, None, None]
    with pytest.raises(CheckpointError, match=r'attentions\.0\.to_v\.weight: shape \(64, 64, 1, 1\)'):
        convert_checkpoint(bad_attn, cfg)


def test_bad_images_and_configs(ref):
    model, params = ref['model'], ref['params']
    x01 = _nhwc(ref['images01'])
    with pytest.raises(ValueError, match=r'channels-last batch \(B, H, W, 3\).*\(16, 16, 3\)'):
        vae_encode(model, params, x01[0], sample=False)
    with pytest.raises(ValueError, match='channels-first'):
        vae_encode(model, params, x01.transpose(0, 3, 1, 2), sample=False)
    with pytest.raises(ValueError, match='uint8'):
        vae_encode(model, params, (x01 * 255).astype(jnp.uint8), sample=False)
    with pytest.raises(ValueError, match=r'\(B, h, w, 4\).*\(2, 2, 2, 3\)'):
        vae_decode(model, params, jnp.zeros((2, 2, 2, 3)))
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['z_chanels'\]"):
        AutoKLConfig.from_dict(dict(autokl(tiny=True), z_chanels=4))
    with pytest.raises(ValueError, match='dropout=0.1 is not supported'):
        AutoencoderKL(dict(autokl(tiny=True), dropout=0.1))
    # the original yaml arguments are accepted as well
    orig = dict(embed_dim=4, lossconfig=None, ddconfig={k: v for k, v in autokl(tiny=True).items()
                                                        if k != 'embed_dim'})
    assert AutoKLConfig.from_dict(orig) == AutoKLConfig.from_dict(autokl(tiny=True))
