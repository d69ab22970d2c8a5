"""Every task end to end on the tiny four-flow model with random weights: output types and
shapes, seeding, degenerate settings equal to the plain flows, no recompiles, clear errors.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vd_jax.diffusion.sampling import _sample_jit
from vd_jax.errors import InputError
from vd_jax.pipeline import VersatileDiffusion

STEPS = 4  # the original uniform DDIM grid: steps must divide T so that t+1 stays < T
IMG = np.random.default_rng(0).uniform(size=(40, 56, 3)).astype(np.float32)  # non-square


@pytest.fixture(scope='module')
def vd():
    return VersatileDiffusion.random('tiny', seed=0)


@pytest.mark.slow
def test_text_to_image_shapes_seeds_and_no_recompile(vd):
    a = vd.text_to_image(['a cat', 'a dog'], n=2, steps=STEPS, seed=0)
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 1
    compiled = _sample_jit._cache_size()
    b = vd.text_to_image(['a bird', 'a car'], n=2, steps=STEPS, seed=0)
    c = vd.text_to_image(['a cat', 'a dog'], n=2, steps=STEPS, seed=7)
    assert _sample_jit._cache_size() == compiled  # new prompts / seeds: same program
    same = vd.text_to_image(['a cat', 'a dog'], n=2, steps=STEPS, seed=0)
    np.testing.assert_array_equal(a, same)
    assert np.abs(a - c).max() > 1e-2 and np.abs(a - b).max() > 1e-2
    # sample i of a batch is seed + i alone (up to batch-size numerics of the network)
    alone = vd.text_to_image(['a dog'], n=1, steps=STEPS, seed=2)
    np.testing.assert_allclose(alone[0], a[2], atol=1e-4)


@pytest.mark.slow
def test_guidance_scale_one_is_the_conditional_run(vd):
    from vd_jax.diffusion.sampling import sample
    a = vd.text_to_image(['a cat'], n=2, steps=STEPS, scale=1.0, seed=3)
    c = vd.components.encode_context('text', ['a cat'] * 2)
    d = vd.components.module('diffuser')
    z = jax.jit(lambda p, c: sample(lambda x, t, ctx: d.apply({'params': p}, x, t, ctx, 'image', 'text'),
                                    vd.schedule, c, guidance_scale=1.0, steps=STEPS,
                                    keys=jnp.asarray([3, 4], jnp.uint32), shape=(2, 16, 16, 4)))(
        vd.params['diffuser'], c)
    np.testing.assert_allclose(a, vd.components.decode_latent('image', z), atol=1e-5)


@pytest.mark.slow
def test_image_variation_options(vd):
    v = vd.image_variation([IMG, IMG[:, ::-1]], n=2, steps=STEPS, seed=1)
    assert v.shape == (4, 32, 32, 3)
    f = vd.image_variation(IMG, n=2, steps=STEPS, seed=1, fidelity=0.5)
    assert f.shape == (2, 32, 32, 3) and np.abs(f - v[:2]).max() > 1e-3
    one = vd.image_variation(IMG, n=2, steps=STEPS, fidelity=1.0)
    assert one.shape == (2, 32, 32, 3)  # fidelity 1 returns the (resized) input
    c = vd.image_variation(IMG, n=2, steps=STEPS, seed=1, color_adjust=True)
    assert c.shape == (2, 32, 32, 3)


@pytest.mark.slow
def test_text_outputs(vd):
    t = vd.image_to_text(IMG, n=3, steps=STEPS, seed=0)
    assert isinstance(t, list) and len(t) == 3 and all(isinstance(s, str) for s in t)
    assert t == vd.image_to_text(IMG, n=3, steps=STEPS, seed=0)
    t2 = vd.text_variation(['a cat', 'a dog'], n=2, steps=STEPS, seed=0, decode='greedy')
    assert len(t2) == 4 and all(isinstance(s, str) for s in t2)


@pytest.mark.slow
def test_mixing_degenerates_to_single_flows(vd):
    """mix 1 (text only) is text->image and mix 0 is image variation, at attention and layer
    level; the level choices all run."""
    kw = dict(n=2, steps=STEPS, seed=5)
    t2i = vd.text_to_image('a cat', **kw)
    i2i = vd.image_variation(IMG, **kw)
    np.testing.assert_allclose(vd.dual_guided('a cat', IMG, mix=1.0, **kw), t2i, atol=1e-5)
    np.testing.assert_allclose(vd.dual_guided('a cat', IMG, mix=0.0, **kw), i2i, atol=1e-5)
    np.testing.assert_allclose(vd.dual_guided('a cat', IMG, mix=1.0, mix_level='layer', **kw), t2i,
                               atol=1e-5)
    np.testing.assert_allclose(vd.dual_guided('a cat', IMG, mix=0.0, mix_level='model', **kw), i2i,
                               atol=1e-5)
    half = vd.dual_guided('a cat', IMG, mix=0.5, mix_level='model', **kw)
    assert np.abs(half - t2i).max() > 1e-3 and np.abs(half - i2i).max() > 1e-3
    txt = vd.dual_guided('a cat', IMG, mix=0.5, output='text', **kw)
    assert len(txt) == 2


@pytest.mark.slow
def test_disentangle_identity_is_plain_variation(vd):
    kw = dict(n=2, steps=STEPS, seed=2)
    i2i = vd.image_variation(IMG, **kw)
    np.testing.assert_array_equal(vd.disentangle(IMG, focus=0.5, **kw), i2i)
    np.testing.assert_array_equal(vd.disentangle(IMG, level=0, **kw), i2i)
    style = vd.disentangle(IMG, focus=1.0, **kw)
    assert style.shape == i2i.shape and np.abs(style - i2i).max() > 1e-3
    assert vd.disentangle(IMG, level=-2, **kw).shape == i2i.shape


@pytest.mark.slow
def test_multi_context_and_i2t2i(vd):
    m = vd.multi_context([IMG, IMG[::-1]], [1.0, 0.5], 'a cat', n=2, steps=STEPS)
    assert m.shape == (2, 32, 32, 3)
    keep_left = np.zeros(IMG.shape[:2], np.float32)
    keep_left[:, :20] = 1
    masked = vd.multi_context([IMG, IMG[::-1]], [1.0, 0.5], 'a cat', n=2, steps=STEPS,
                              masks=[keep_left, None], focus=[0.2, 0.5])
    assert masked.shape == m.shape and np.abs(masked - m).max() > 1e-3
    same = vd.multi_context([IMG, IMG[::-1]], [1.0, 0.5], 'a cat', n=2, steps=STEPS,
                            masks=[np.ones(IMG.shape[:2]), None])
    np.testing.assert_array_equal(same, m)  # an all-ones mask is no mask
    texts, ims = vd.i2t2i(IMG, positive='a dog', negative='a cat', n=2, steps=STEPS)
    assert len(texts) == 2 and ims.shape == (2, 32, 32, 3)


@pytest.mark.slow
def test_errors_name_the_problem(vd, tmp_path):
    with pytest.raises(InputError, match='multiples of 8'):  # tiny: VAE 2 x UNet 4
        vd.text_to_image('a cat', steps=STEPS, height=36)
    with pytest.raises(InputError, match="level must be one of"):
        vd.dual_guided('a', IMG, mix_level='pixel', steps=STEPS)
    with pytest.raises(InputError, match=r'mix \(text strength\) must be in \[0, 1\]'):
        vd.dual_guided('a', IMG, mix=1.5, steps=STEPS)
    with pytest.raises(InputError, match="unknown task"):
        vd.check_task('paint')
    bad = tmp_path / 'not_an_image.png'
    bad.write_text('hello')
    with pytest.raises(ValueError, match='not_an_image.png'):
        vd.image_variation(str(bad), steps=STEPS)
    basic = VersatileDiffusion.random('vd_basic:tiny')
    with pytest.raises(InputError, match="lacks .*ctx_text"):
        basic.text_to_image('a cat', steps=STEPS)
    partial = VersatileDiffusion(vd.config, {'diffuser': vd.params['diffuser']})
    with pytest.raises(InputError, match=r"task 'image_to_text' needs .* lacks \['ctx_image', 'vae_text'\]"):
        partial.image_to_text(IMG, steps=STEPS)


@pytest.mark.slow
def test_sample_py_writes_what_it_promises(tmp_path):
    out = tmp_path / 'out'
    cmd = [sys.executable, 'sample.py', '--model', 'tiny', '--steps', '2', '--n', '2',
           '--out', str(out), '--prompt', 'a cat']
    root = os.path.join(os.path.dirname(__file__), '..')
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'UNTRAINED' in r.stdout
    run = out / 'run-001'
    assert sorted(os.listdir(run)) == ['0000.png', '0001.png', 'grid.png', 'settings.json']
    s = json.loads((run / 'settings.json').read_text())
    assert s['untrained'] and s['task'] == 't2i' and s['steps'] == 2 and 'code_version' in s
    r = subprocess.run(cmd[:-2] + ['--task', 'i2t', '--image', __file__], cwd=root,
                       capture_output=True, text=True)
    assert r.returncode == 2 and 'test_pipeline.py' in r.stderr  # not an image: clear error
    r = subprocess.run(cmd[:-2] + ['--task', 't2t'], cwd=root, capture_output=True, text=True)
    assert r.returncode == 2 and 'needs a prompt' in r.stderr  # no silent default input
    r = subprocess.run(cmd + ['--task', 't2t'], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out / 'run-002')) == ['settings.json', 'texts.json', 'texts.txt']
    assert (run / 'grid.png').exists()  # the earlier run is untouched
