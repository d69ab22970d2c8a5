"""The modality registry and the component layer: what is derived from the records, the
unconditional contexts of each convention, and a toy third modality that is only one new
record plus its networks (sampling and training run on it without edits elsewhere)."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import flax.linen as nn

from vd_jax import modalities as M
from vd_jax.checkpoint import available_parts
from vd_jax.components import Components
from vd_jax.config import load_config
from vd_jax.models import FAMILIES, Family, register_family
from vd_jax.models.init import random_params


def test_flows_parts_and_tables_are_derived_from_the_records():
    assert {f: (M.FLOWS[f].ctype, M.FLOWS[f].xtype) for f in ('t2i', 'i2i', 'i2t', 't2t')} == {
        't2i': ('text', 'image'), 'i2i': ('image', 'image'), 'i2t': ('image', 'text'),
        't2t': ('text', 'text')}
    assert M.PARTS == ('diffuser', 'vae_image', 'vae_text', 'ctx_image', 'ctx_text')
    assert M.flow('t2i').parts == ('diffuser', 'ctx_text', 'vae_image')
    assert M.parts_of(['i2t', 't2i']) == ('diffuser', 'vae_image', 'vae_text', 'ctx_image',
                                          'ctx_text')
    basic = load_config('vd_basic:tiny').model
    assert [f.name for f in M.model_flows(basic)] == ['i2i']
    assert M.config_parts(basic) == ('diffuser', 'vae_image', 'ctx_image')
    dc = load_config('vd_dc:tiny').model
    assert sorted(f.name for f in M.model_flows(dc)) == ['i2i', 't2i']
    from vd_jax.tasks import TASKS
    assert TASKS['image_to_text'].parts == ('diffuser', 'vae_text', 'ctx_image')
    from vd_jax.train.settings import needed_fields
    assert needed_fields([('i2t', 'text', 'image', 1.0)]) == ('index', 'latent_text',
                                                              'context_image')


@pytest.fixture(scope='module')
def comps():
    from vd_jax.pipeline import VersatileDiffusion
    return VersatileDiffusion.random('tiny', seed=0).components


@pytest.mark.slow
def test_unconditional_contexts_of_each_convention(comps):
    like_i = jnp.ones((3, 257, 32))
    like_t = jnp.ones((2, 77, 32))
    # v1.0: zeros for image contexts of image outputs, the black image for image->text
    np.testing.assert_array_equal(comps.uncond_context('image', 'image', 'v1.0', like_i),
                                  np.zeros((3, 257, 32)))
    black = comps.encode_context('image', [np.zeros((64, 48, 3), np.float32)])
    np.testing.assert_allclose(comps.uncond_context('image', 'text', 'v1.0', like_i),
                               np.repeat(black, 3, 0), atol=1e-6)
    gray = comps.encode_context('image', [np.full((20, 20, 3), 0.5, np.float32)])
    for conv in ('legacy', 'diffusers'):
        for out in ('image', 'text'):
            np.testing.assert_allclose(comps.uncond_context('image', out, conv, like_i),
                                       np.repeat(gray, 3, 0), atol=1e-6)
    empty = comps.encode_context('text', [''])
    for conv in M.CONVENTIONS:
        np.testing.assert_allclose(comps.uncond_context('text', 'image', conv, like_t),
                                   np.repeat(empty, 2, 0), atol=1e-6)
    # multi-image contexts concatenate tokens: the unconditional one is tiled
    two = comps.uncond_context('image', 'text', 'v1.0', jnp.ones((1, 514, 32)))
    np.testing.assert_array_equal(two[:, :257], two[:, 257:])
    with pytest.raises(ValueError, match='uncond convention'):
        comps.uncond_context('text', 'image', 'v2', like_t)


@pytest.mark.slow
def test_components_encode_and_decode_every_modality(comps):
    ids = comps.tokenizer('clip')(['a cat', 'a dog'])
    np.testing.assert_array_equal(comps.encode_context('text', ids),
                                  comps.encode_context('text', ['a cat', 'a dog']))
    with pytest.raises(ValueError, match=r'CLIP token ids must lie in \[0, 49408\)'):
        comps.encode_context('text', np.full((1, 77), 50000))
    img = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    z = comps.encode_latent('image', img)
    assert z.shape == comps.latent_shape('image', 2, (32, 32)) == (2, 16, 16, 4)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))
    z1 = comps.encode_latent('image', img, keys)
    z2 = comps.encode_latent('image', img[1:], keys[1:])
    np.testing.assert_allclose(z1[1:], z2, atol=1e-5)  # one draw per input, not per batch
    assert comps.decode_latent('image', z).shape == (2, 32, 32, 3)
    zt = comps.encode_latent('text', ['a cat'])
    assert zt.shape == comps.latent_shape('text', 1) == (1, 16)
    assert isinstance(comps.decode_latent('text', zt, method='greedy')[0], str)


# ------------------------------------------------------------------------------------------------
# A toy third modality: one record + its networks
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ToyConfig:
    width: int = 8        # raw signal length
    latent: int = 16      # latent width (= the diffuser stream's input_channels)
    tokens: int = 3       # context tokens
    dim: int = 32         # context width

    @classmethod
    def from_dict(cls, d):
        return cls(**dict(d))


class ToyCodec(nn.Module):
    """A 'tone' VAE (linear encoder / decoder) and context encoder in one module."""
    config: ToyConfig
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    def setup(self):
        c = self.config
        self.enc = nn.Dense(c.latent)
        self.dec = nn.Dense(c.width)
        self.ctx = nn.Dense(c.tokens * c.dim)

    def __call__(self, x):
        return self.dec(self.enc(x)), self.context(x)

    def context(self, x):
        return self.ctx(x).reshape(x.shape[0], self.config.tokens, self.config.dim)

    def init_all(self, batch=1):
        return self(*toy_inputs(self.config, batch))


def toy_inputs(config, batch=1):
    return (jnp.zeros((batch, config.width)),)


class ToneModality(M.Modality):
    name, letter, kind = 'tone', 'a', '0d'
    vae_family, ctx_family, raw_field = 'toy_codec', 'toy_codec', 'tone'

    def latent_shape(self, model_cfg, batch, hw=None):
        return (batch, int(model_cfg['vae']['tone']['latent']))

    def context_length(self, model_cfg):
        return int(model_cfg['ctx']['tone']['tokens'])

    def context_inputs(self, comps, raw, **kw):
        return {'x': np.asarray(raw, np.float32)}

    def context(self, module, params, inputs):
        return module.apply({'params': params}, inputs['x'], method='context')

    def latent_inputs(self, comps, raw):
        return {'x': np.asarray(raw, np.float32)}

    def encode(self, module, params, inputs, key=None):
        return module.apply({'params': params}, inputs['x'], method=lambda m, x: m.enc(x))

    def decode(self, comps, latents, **kw):
        m = comps.module(self.vae_part)
        return np.asarray(m.apply({'params': comps.params[self.vae_part]}, latents,
                                  method=lambda mod, z: mod.dec(z)))

    def uncond(self, convention, output):
        return M.Uncond(zeros=True)


@pytest.fixture
def tone():
    register_family(Family('toy_codec', ToyConfig, ToyCodec, toy_inputs))
    m = M.register(ToneModality())
    yield m
    M.unregister('tone')
    del FAMILIES['toy_codec']


def _tone_model():
    from configs import common
    cfg = common.model_config(dict(image=common.tiny_image_stream()), tiny=True, name='toy')
    text = common.tiny_text_stream()  # a '0d' stream of width 16 for the new modality
    cfg.diffuser.streams = dict(cfg.diffuser.streams.to_dict(), tone=text)
    cfg.vae.tone = dict(width=8, latent=16, tokens=3, dim=32)
    cfg.ctx.tone = dict(width=8, latent=16, tokens=3, dim=32)
    return cfg


@pytest.mark.slow
def test_a_third_modality_is_one_record_plus_its_networks(tone, tmp_path):
    assert {'a2i', 'i2a', 'a2a'} <= set(M.FLOWS) and 'vae_tone' in M.PARTS
    cfg = _tone_model()
    assert {'a2i', 'i2a', 'a2a', 'i2i'} == {f.name for f in M.model_flows(cfg)}
    comps = Components(cfg, {})
    for part, tree in sorted(comps.abstract_params().items()):
        comps.set_params(part, random_params(tree, 1))
    raw = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    c = comps.encode_context('tone', raw)
    assert c.shape == (2, 3, 32)
    # sample tone -> image and image -> tone with the shared machinery of every task
    from vd_jax.diffusion.conditioning import Single
    from vd_jax.tasks.common import SamplingOptions, denoise
    opts = SamplingOptions(steps=4, scale=3.0)
    d = comps.module('diffuser')
    u = comps.uncond_context('tone', 'image', 'v1.0', c)
    z = denoise(comps, Single(d, 'image', 'tone'), c, u, opts,
                shape=comps.latent_shape('image', 2, (32, 32)))
    assert comps.decode_latent('image', z).shape == (2, 32, 32, 3)
    ci = comps.encode_context('image', list(np.random.default_rng(1).uniform(
        size=(2, 32, 32, 3)).astype(np.float32)))
    zt = denoise(comps, Single(d, 'tone', 'image'), ci,
                 comps.uncond_context('image', 'tone', 'v1.0', ci), opts,
                 shape=comps.latent_shape('tone', 2))
    assert comps.decode_latent('tone', zt).shape == (2, 8)
    # and train it (synthetic latents) with the unchanged trainer, then export
    from configs import train_common
    tcfg = train_common.train_config(ml_collections.ConfigDict({'model': cfg, 'variant': 'toy'}),
                                     ['a2i', 'i2a'])
    tcfg.total_steps, tcfg.batch_size, tcfg.log_every = 2, 2, 1
    tcfg.data.num_records, tcfg.data.latent_size = 4, 8
    tcfg.data.context_len = {'image': 257, 'tone': 3}
    tcfg.init.method, tcfg.tensorboard = 'random', False
    tcfg.optimizer.warmup_steps = 0
    from vd_jax.train import train
    out = train(tcfg, str(tmp_path))
    assert sorted(out['history']) == [1, 2]
    assert np.isfinite(out['history'][2]['loss/a2i']) and np.isfinite(out['history'][2]['loss/i2a'])
    assert set(available_parts(out['export'])) == {'diffuser', 'vae_image', 'vae_tone',
                                                   'ctx_image', 'ctx_tone'}
