"""The sampling API of every task (tiny model, random weights, one device): initial latents,
an explicit start step, prompts as token ids, ready contexts, negative prompts / images, the
per-step callback, sample.py's previews and mesh flags, tokenizer/model vocabulary checks.

Equalities are between two routes to the same computation (e.g. a prompt vs its token ids),
so they hold exactly or to float32 rounding (1e-6; 1e-5 where the contexts were encoded in
another batch); `seed + i` results taken from a batch agree with
a lone run to 1e-4 (the network's batch-size numerics, as tests/test_pipeline.py).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vd_jax.errors import InputError
from vd_jax.pipeline import VersatileDiffusion
from vd_jax.image_io import load_images

STEPS = 2
IMG = np.random.default_rng(0).uniform(size=(40, 56, 3)).astype(np.float32)
IMG2 = IMG[::-1, ::-1].copy()
# A ready context encoded in another batch (e.g. 1 prompt instead of 2 pairs) differs from the
# task's own by float32 rounding (~1e-7), which 2 guided steps and the VAE grow to ~3e-6
CTX_TOL = 1e-5
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


@pytest.fixture(scope='module')
def vd():
    return VersatileDiffusion.random('tiny', seed=0)


def noise(seed, shape):
    """The x_T a task draws for sample `seed` (`vd_jax.diffusion.sampling`: fold_in(key, 0))."""
    return np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(seed), 0), shape))


def latents_for(seed, b, shape):
    return np.stack([noise(seed + i, shape) for i in range(b)])


@pytest.mark.slow
def test_initial_latents_replace_the_seeded_noise(vd):
    kw = dict(steps=STEPS, seed=5)
    a = vd.text_to_image(['a cat', 'a dog'], **kw)
    x_t = latents_for(5, 2, (16, 16, 4))
    np.testing.assert_allclose(vd.text_to_image(['a cat', 'a dog'], latents=x_t, **kw), a,
                               atol=1e-6)
    assert np.abs(vd.text_to_image(['a cat', 'a dog'], latents=-x_t, **kw) - a).max() > 1e-2
    t = vd.text_variation(['a cat'], n=2, decode='greedy', **kw)
    assert vd.text_variation(['a cat'], n=2, decode='greedy', latents=latents_for(5, 2, (16,)),
                             **kw) == t
    # i2t2i: text_latents for the caption run, latents for the image run (seeds + 1000)
    texts, ims = vd.i2t2i(IMG, 'a dog', 'a cat', n=2, **kw)
    texts2, ims2 = vd.i2t2i(IMG, 'a dog', 'a cat', n=2, text_latents=latents_for(5, 2, (16,)),
                            latents=latents_for(1005, 2, (16, 16, 4)), **kw)
    assert texts2 == texts
    np.testing.assert_allclose(ims2, ims, atol=1e-6)
    # every other task takes them too: a wrong shape is refused by name
    bad = np.zeros((2, 8, 8, 4), np.float32)
    for call in (lambda: vd.image_variation(IMG, n=2, latents=bad, **kw),
                 lambda: vd.image_to_text(IMG, n=2, latents=bad, **kw),
                 lambda: vd.dual_guided('a cat', IMG, n=2, latents=bad, **kw),
                 lambda: vd.multi_context([IMG, IMG2], n=2, latents=bad, **kw),
                 lambda: vd.disentangle(IMG, n=2, focus=1.0, latents=bad, **kw),
                 lambda: vd.disentangle(IMG, n=2, level=1, latents=bad, **kw)):
        with pytest.raises(InputError, match=r'latents must have shape \(2, (16, 16, 4|16)\)'):
            call()


@pytest.mark.slow
def test_start_step_is_the_fidelity_start(vd):
    kw = dict(n=2, steps=4, seed=1)
    f = vd.image_variation(IMG, fidelity=0.5, **kw)
    np.testing.assert_array_equal(vd.image_variation(IMG, start_step=2, **kw), f)  # 4 * 0.5
    assert np.abs(vd.image_variation(IMG, start_step=3, **kw) - f).max() > 1e-3
    with pytest.raises(InputError, match='fidelity or start_step, not both'):
        vd.image_variation(IMG, fidelity=0.5, start_step=2, **kw)
    with pytest.raises(InputError, match=r'k=9 must be in \[0, 4\)'):
        vd.image_variation(IMG, start_step=9, **kw)
    with pytest.raises(InputError, match='exclusive'):
        vd.image_variation(IMG, start_step=2, latents=np.zeros((2, 16, 16, 4)), **kw)
    with pytest.raises(InputError, match='start_step must be an integer'):
        vd.image_variation(IMG, start_step=-1, **kw)


@pytest.mark.slow
def test_prompts_as_token_ids_and_ready_contexts(vd):
    comps = vd.components
    kw = dict(steps=STEPS, seed=2)
    ids = comps.tokenizer('clip')(['a cat', 'a dog'])
    ref = vd.text_to_image(['a cat', 'a dog'], **kw)
    np.testing.assert_array_equal(vd.text_to_image(ids, **kw), ref)
    np.testing.assert_array_equal(vd.text_to_image([list(r) for r in ids], **kw), ref)
    ctx = comps.encode_context('text', ['a cat', 'a dog'])
    np.testing.assert_array_equal(vd.text_to_image(None, context=ctx, **kw), ref)
    with pytest.raises(InputError, match=r'contexts must be \(P, 77, 32\).*got shape \(2, 5, 32\)'):
        vd.text_to_image(None, context=ctx[:, :5], **kw)
    with pytest.raises(InputError, match='strings or CLIP token ids'):
        vd.text_to_image(['a cat', list(ids[0])], **kw)
    # dual-guided: token ids and a ready (text, image) context pair
    dual = vd.dual_guided('a cat', IMG, n=2, **kw)
    np.testing.assert_array_equal(vd.dual_guided(ids[:1], IMG, n=2, **kw), dual)
    # the tasks resize images to the output size (32) before CLIP: so do ready contexts
    ci = comps.encode_context('image', list(load_images([IMG], (32, 32))))
    np.testing.assert_allclose(vd.dual_guided(None, None, n=2, context=(ctx[:1], ci), **kw),
                               dual, atol=CTX_TOL)
    # image tasks: ready CLIP image contexts instead of images (focus still applies)
    np.testing.assert_allclose(vd.image_variation(None, n=2, context=ci, focus=0.8, **kw),
                               vd.image_variation(IMG, n=2, focus=0.8, **kw), atol=CTX_TOL)
    assert vd.image_to_text(None, n=2, context=ci, **kw) == vd.image_to_text(IMG, n=2, **kw)
    both = comps.encode_context('image', list(load_images([IMG, IMG2], (32, 32))))
    np.testing.assert_allclose(
        vd.multi_context(None, [1.0, 0.5], ids[1], n=2, context=both, **kw),
        vd.multi_context([IMG, IMG2], [1.0, 0.5], 'a dog', n=2, **kw), atol=CTX_TOL)
    np.testing.assert_allclose(vd.disentangle(None, n=2, level=1, context=ci, **kw),
                               vd.disentangle(IMG, n=2, level=1, **kw), atol=CTX_TOL)
    t1, i1 = vd.i2t2i(None, 'a dog', n=2, context=ci, **kw)
    t2, i2 = vd.i2t2i(IMG, 'a dog', n=2, **kw)
    assert t1 == t2
    np.testing.assert_allclose(i1, i2, atol=CTX_TOL)
    with pytest.raises(InputError, match='need input images'):
        vd.image_variation(None, n=2, context=ci, fidelity=0.5, **kw)


@pytest.mark.slow
def test_negative_prompts_and_images_per_input(vd):
    kw = dict(steps=STEPS, seed=4)
    # one negative per prompt (lists broadcast like prompts): sample i is seed + i alone
    both = vd.text_to_image(['a cat', 'a dog'], negative_prompt=['red', 'blue'], **kw)
    alone = vd.text_to_image('a dog', negative_prompt='blue', steps=STEPS, seed=5)
    np.testing.assert_allclose(both[1], alone[0], atol=1e-4)
    plain = vd.text_to_image(['a cat', 'a dog'], **kw)
    assert np.abs(both - plain).max() > 1e-3
    ids = vd.components.tokenizer('clip')(['red', 'blue'])
    np.testing.assert_array_equal(vd.text_to_image(['a cat', 'a dog'], negative_prompt=ids, **kw),
                                  both)
    with pytest.raises(InputError, match='3 negative prompts for 2 prompts'):
        vd.text_to_image(['a cat', 'a dog'], negative_prompt=['a', 'b', 'c'], **kw)
    # negative images: one per input image
    var = vd.image_variation([IMG, IMG2], negative_image=[IMG2, IMG], **kw)
    var_alone = vd.image_variation(IMG2, negative_image=IMG, steps=STEPS, seed=5)
    np.testing.assert_allclose(var[1], var_alone[0], atol=1e-4)
    # the mixing tasks take both kinds; each changes the result
    for name, call in (
            ('dual', lambda **k: vd.dual_guided(['a cat', 'a dog'], IMG, **k, **kw)),
            ('dual_text', lambda **k: vd.dual_guided('a cat', IMG, output='text', decode='greedy',
                                                     **k, **kw)),
            ('multi', lambda **k: vd.multi_context([IMG, IMG2], [1.0, 0.5], 'a cat', **k, **kw)),
            ('i2t2i', lambda **k: vd.i2t2i(IMG, 'a dog', 'a cat', **k, **kw)[1])):
        base = call()
        for neg in (dict(negative_prompt='blurry'), dict(negative_image=IMG2)):
            out = call(**neg)
            if isinstance(base, list):
                assert len(out) == len(base), (name, neg)
            else:
                assert np.abs(out - base).max() > 1e-4, (name, neg)
    texts = vd.dual_guided('a cat', IMG, output='text', decode='greedy', **kw)
    assert vd.dual_guided('a cat', IMG, output='text', decode='greedy',
                          negative_image=IMG2, negative_prompt='blurry', **kw) != texts
    # one negative image per pair of dual-guided inputs
    with pytest.raises(InputError, match='3 negative images for 2 prompts/inputs'):
        vd.dual_guided(['a cat', 'a dog'], IMG, negative_image=[IMG, IMG, IMG], **kw)


@pytest.mark.slow
def test_callback_once_per_step_with_the_latents(vd):
    seen = []
    out = vd.text_to_image(['a cat', 'a dog', 'a bird'], steps=4, seed=0,
                           callback=lambda i, z: seen.append((i, z.shape, np.asarray(z))))
    assert [(i, s) for i, s, _ in seen] == [(i, (3, 16, 16, 4)) for i in range(4)]
    np.testing.assert_allclose(vd.components.decode_latent('image', seen[-1][2]), out, atol=1e-6)
    seen.clear()  # a fidelity start runs (and reports) only the steps below its start
    vd.image_variation(IMG, n=2, steps=4, fidelity=0.5, callback=lambda i, z: seen.append((i, z.shape)))
    assert seen == [(2, (2, 16, 16, 4)), (3, (2, 16, 16, 4))]
    seen.clear()
    vd.text_variation('a cat', n=2, steps=2, callback=lambda i, z: seen.append((i, z.shape)))
    assert seen == [(0, (2, 16)), (1, (2, 16))]


def test_vocabulary_mismatch_is_a_clear_error(tiny_config):
    import copy
    cfg = copy.deepcopy(tiny_config)
    cfg.model.ctx.text.vocab_size = 1000
    small = VersatileDiffusion(cfg, {})
    with pytest.raises(ValueError, match="CLIP tokenizer has 49408 tokens but the model's text "
                                         'encoder has a 1000-token vocabulary'):
        small.components.tokenizer('clip')
    with pytest.raises(InputError, match="task 'text_to_image': the CLIP tokenizer has 49408"):
        _check_tokenizers(small, 'text_to_image')
    cfg = copy.deepcopy(tiny_config)
    cfg.model.vae.text.encoder.vocab_size = 20000
    with pytest.raises(ValueError, match=r'BERT \(encoder\) tokenizer has 28996 tokens but the '
                                         "Optimus model's vocabulary has 20000"):
        VersatileDiffusion(cfg, {}).components.tokenizer('bert')


def _check_tokenizers(vd, task):
    """check_task's tokenizer step without the parts check (these models have no weights)."""
    vd.components.params.update({p: {} for p in ('diffuser', 'ctx_text', 'vae_image')})
    return vd.check_task(task)


def _sample(args, **env):
    cmd = [sys.executable, 'sample.py', '--model', 'tiny', '--steps', '2', *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu', **env))


@pytest.mark.slow
def test_sample_py_previews_and_flags(tmp_path):
    r = _sample(['--n', '2', '--out', str(tmp_path), '--prompt', 'a cat', '--preview-every', '1'])
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / 'run-001'
    assert sorted(os.listdir(run)) == ['0000.png', '0001.png', 'grid.png', 'preview_step_001.png',
                                       'preview_step_002.png', 'settings.json']
    from PIL import Image
    # the last preview is the decoded final latents: the grid itself
    np.testing.assert_array_equal(np.asarray(Image.open(run / 'preview_step_002.png')),
                                  np.asarray(Image.open(run / 'grid.png')))
    s = json.loads((run / 'settings.json').read_text())
    assert [os.path.basename(p) for p in s['outputs']['previews']] == \
        ['preview_step_001.png', 'preview_step_002.png']
    assert s['mesh'] is None and s['processes'] == 1 and s['compile_cache']
    # usage errors before any model loads (exit 2, one line naming the flag)
    for args, msg in ((['--mesh', 'data=2,tensor=4'], "--mesh: mesh 'data=2,tensor=4'"),
                      (['--mesh', 'data=x'], 'size of data must be an integer'),
                      (['--coordinator', 'localhost:1'], '--coordinator needs --distributed'),
                      (['--preview-every', '0'], '--preview-every 0 must be >= 1'),
                      (['--task', 'i2i', '--image', str(run / '0000.png'), '--fidelity', '0.5',
                        '--start-step', '1'], 'give --fidelity or --start-step, not both'),
                      (['--mesh', 'data=3'], 'data=3')):  # one device: 3 do not multiply to 1
        r = _sample(['--out', str(tmp_path), '--prompt', 'a cat'] + args)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr[-2000:])
    assert sorted(os.listdir(tmp_path)) == ['run-001']  # no run folder for failed runs
    # --start-step reaches image_variation
    from vd_jax.sample_cli import TASKS, build_parser
    a = build_parser().parse_args(['--task', 'i2i', '--start-step', '3'])
    assert TASKS['i2i'].kwargs(a)['start_step'] == 3
