"""`vd_jax.export`: vd_jax checkpoints back to PyTorch (v1.0 / legacy files, diffusers folders).

A tiny four-flow checkpoint with random weights (every part) is exported, then
  * converted back with `vd_jax.convert`: the parameters must be BIT-EXACT (fp32) for every
    part in every layout, and fp16 exports must equal the fp16-rounded weights;
  * the diffusers folder is loaded with diffusers' / transformers' own classes and must give
    vd_jax's outputs within 1e-4 (max abs, outputs of magnitude ~1): image UNet with
    image-variation and (with the text-context blocks swapped in by diffusers' own
    text->image pipeline code) text->image contexts, text UNet, VAE decode, CLIP text and
    image contexts. Both sides run fp32; the differences are summation orders (~1e-6), and
    any mis-named or mis-transposed tensor gives errors of order 1e-1.
Bad input: one 'error: ...' line, exit code 2, nothing written.
"""
import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vd_jax.checkpoint import (available_parts, flatten, load_part, load_safetensors,
                               write_checkpoint)
from vd_jax.config import load_config
from vd_jax.convert import convert_checkpoint
from vd_jax.diffusion.schedule import schedule_arrays
from vd_jax.errors import InputError
from vd_jax.export import export_checkpoint
from vd_jax.export.__main__ import main as export_main
from vd_jax.pipeline import VersatileDiffusion

TOL = 1e-4
PARTS = ('diffuser', 'vae_image', 'vae_text', 'ctx_image', 'ctx_text')
PREFIXES = {
    'v1.0': {'diffuser': ('diffuser.',), 'vae_image': ('vae.image.',), 'vae_text': ('vae.text.',),
             'ctx_text': ('ctx.text.model.',), 'ctx_image': ('ctx.image.model.',)},
    'legacy': {'diffuser': ('model.diffusion_model.',), 'vae_image': ('autokl.',),
               'vae_text': ('optimus.',),
               'ctx_text': ('clip.model.text_model.', 'clip.model.text_projection.'),
               'ctx_image': ('clip.model.vision_model.', 'clip.model.visual_projection.')},
}


@pytest.fixture(scope='module')
def ck(tmp_path_factory):
    cfg = load_config('tiny').model
    vd = VersatileDiffusion.random(cfg, seed=3)
    params = {p: jax.tree.map(np.asarray, vd.params[p]) for p in PARTS}
    path = str(tmp_path_factory.mktemp('ck') / 'tiny')
    write_checkpoint(path, cfg, params)
    return dict(path=path, cfg=cfg, params=params, vd=vd, out=tmp_path_factory.mktemp('out'))


def _assert_bit_exact(got, want, what):
    for part in want:
        g, w = flatten(got[part]), flatten(want[part])
        assert g.keys() == w.keys(), (what, part)
        for k in w:
            np.testing.assert_array_equal(np.asarray(g[k]), np.asarray(w[k]), err_msg=f'{what} {part} {k}')


def _read_keys(path):
    if path.endswith('.safetensors'):
        return {k: np.asarray(v) for k, v in load_safetensors(path).items()}
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in torch.load(path, weights_only=True).items()}


@pytest.mark.slow
@pytest.mark.parametrize('layout,name', [('v1.0', 'vd.pth'), ('legacy', 'vd.safetensors')])
def test_file_layouts_round_trip_bit_exact(ck, layout, name):
    out = str(ck['out'] / f'{layout}-{name}')
    export_checkpoint(ck['path'], out, layout)
    sd = _read_keys(out)
    # the original names of the layout, and the DDPM schedule buffers the originals carry
    sched = schedule_arrays(**ck['cfg'].schedule.to_dict())
    for k, v in sched.items():
        np.testing.assert_array_equal(sd.pop(k), v.astype(np.float32))
    for part, pre in PREFIXES[layout].items():
        assert any(k.startswith(pre) for k in sd), (layout, part)
    assert all(k.startswith(sum(PREFIXES[layout].values(), ())) for k in sd)
    if layout == 'v1.0':
        # GPT-2's tied lm_head is written as the original module has it
        np.testing.assert_array_equal(sd['vae.text.decoder.lm_head.weight'],
                                      sd['vae.text.decoder.transformer.wte.weight'])
    back = convert_checkpoint(out, ck['cfg'])
    assert sorted(back) == sorted(PARTS)
    _assert_bit_exact(back, ck['params'], layout)


@pytest.mark.slow
def test_fp16_export_is_the_rounded_weights(ck):
    out = str(ck['out'] / 'half.safetensors')
    export_checkpoint(ck['path'], out, 'v1.0', dtype='float16')
    st = load_safetensors(out)
    assert st['diffuser.image.time_embed.0.weight'].dtype == np.float16
    assert st['betas'].dtype == np.float32  # schedule buffers stay float32, as released
    back = convert_checkpoint(out, ck['cfg'])
    half = {p: jax.tree.map(lambda a: a.astype(np.float16).astype(np.float32), ck['params'][p])
            for p in PARTS}
    _assert_bit_exact(back, half, 'fp16')


# ----------------------------------------------------------------------------------------
# diffusers folder
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def folder(ck):
    out = str(ck['out'] / 'diffusers')
    export_checkpoint(ck['path'], out, 'diffusers')
    return out


@pytest.mark.slow
def test_diffusers_folder_round_trip_bit_exact(ck, folder):
    assert sorted(os.listdir(folder)) == sorted([
        'image_unet', 'text_unet', 'vae', 'text_encoder', 'image_encoder', 'scheduler',
        'tokenizer', 'image_feature_extractor', 'model_index.json', 'vae_text.safetensors'])
    # the folder converts back whole, text VAE included (written beside the sub-folders)
    back_dir = convert_checkpoint(folder, ck['cfg'], out=str(ck['out'] / 'diffusers_back'))
    back = {p: load_part(back_dir, p) for p in available_parts(back_dir)}
    assert sorted(back) == sorted(PARTS)
    _assert_bit_exact(back, ck['params'], 'diffusers')
    # the text VAE's file alone is a v1.0 file
    alone = convert_checkpoint(os.path.join(folder, 'vae_text.safetensors'), ck['cfg'])
    _assert_bit_exact(alone, {'vae_text': ck['params']['vae_text']}, 'vae_text.safetensors')


@pytest.mark.slow
def test_diffusers_pipeline_loads_the_folder(ck, folder):
    from diffusers import VersatileDiffusionPipeline
    pipe = VersatileDiffusionPipeline.from_pretrained(folder)
    got = {k: type(v).__name__ for k, v in pipe.components.items()}
    assert got['image_unet'] == 'UNet2DConditionModel' and got['text_unet'] == 'UNetFlatConditionModel'
    assert got['vae'] == 'AutoencoderKL' and got['scheduler'] == 'DDIMScheduler'
    # the tokenizer folder is the bundled vocabulary: same ids as vd_jax's CLIP tokenizer
    from vd_jax.tokenizers import clip_tokenizer
    prompts = ['a red bicycle leaning on a wall', 'Émile’s café, 3 cats!']
    ids = pipe.tokenizer(prompts, padding='max_length', max_length=77).input_ids
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(clip_tokenizer()(prompts)))
    # DDIM on VD's schedule (diffusers computes it in float32)
    np.testing.assert_allclose(pipe.scheduler.alphas_cumprod.numpy(),
                               schedule_arrays(**ck['cfg'].schedule.to_dict())['alphas_cumprod'],
                               rtol=1e-5)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)


@pytest.fixture(scope='module')
def inputs():
    g = np.random.default_rng(7)
    return dict(x_img=g.standard_normal((2, 4, 8, 8)).astype(np.float32),
                x_txt=g.standard_normal((2, 16)).astype(np.float32),
                t=np.array([17, 801]),
                c_txt=g.standard_normal((2, 7, 32)).astype(np.float32),
                c_img=g.standard_normal((2, 9, 32)).astype(np.float32),
                z=g.standard_normal((2, 4, 8, 8)).astype(np.float32))


def _ours(ck, x, t, c, xtype, ctype):
    vd = ck['vd']
    y = vd.components.module('diffuser').apply({'params': ck['params']['diffuser']},
                                 jnp.asarray(x.transpose(0, 2, 3, 1) if x.ndim == 4 else x),
                                 jnp.asarray(t), jnp.asarray(c), xtype, ctype)
    y = np.asarray(y)
    return y.transpose(0, 3, 1, 2) if y.ndim == 4 else y


def _max(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.slow
def test_diffusers_unets_match(ck, folder, inputs):
    from types import SimpleNamespace
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import \
        UNetFlatConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.pipeline_versatile_diffusion_text_to_image \
        import VersatileDiffusionTextToImagePipeline
    image_unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, 'image_unet')).eval()
    text_unet = UNetFlatConditionModel.from_pretrained(os.path.join(folder, 'text_unet')).eval()
    i = inputs
    t = torch.from_numpy(i['t'])
    with torch.no_grad():
        # image UNet as stored: image data layers + image-context layers (image variation)
        ref = image_unet(torch.from_numpy(i['x_img']), t,
                         encoder_hidden_states=torch.from_numpy(i['c_img'])).sample.numpy()
        assert _max(ref, _ours(ck, i['x_img'], i['t'], i['c_img'], 'image', 'image')) < TOL
        # text UNet: text data layers + text-context layers (text variation)
        ref = text_unet(torch.from_numpy(i['x_txt'])[:, :, None, None], t,
                        encoder_hidden_states=torch.from_numpy(i['c_txt'])).sample[:, :, 0, 0].numpy()
        assert _max(ref, _ours(ck, i['x_txt'], i['t'], i['c_txt'], 'text', 'text')) < TOL
        # text->image: diffusers' own pipeline swaps the text-context blocks into image_unet
        ns = SimpleNamespace(image_unet=copy.deepcopy(image_unet), text_unet=copy.deepcopy(text_unet))
        VersatileDiffusionTextToImagePipeline._swap_unet_attention_blocks(ns)
        ref = ns.image_unet(torch.from_numpy(i['x_img']), t,
                            encoder_hidden_states=torch.from_numpy(i['c_txt'])).sample.numpy()
        assert _max(ref, _ours(ck, i['x_img'], i['t'], i['c_txt'], 'image', 'text')) < TOL
        assert float(np.abs(ref).mean()) > 0.1  # a non-trivial output


@pytest.mark.slow
def test_diffusers_vae_decode_matches(ck, folder, inputs):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from vd_jax.models.vae import AutoencoderKL
    m = DiffusersAutoencoderKL.from_pretrained(os.path.join(folder, 'vae')).eval()
    z = inputs['z']
    with torch.no_grad():
        ref = m.decode(torch.from_numpy(z)).sample.numpy()
    ours = AutoencoderKL(ck['cfg'].vae.image).apply(
        {'params': ck['params']['vae_image']}, jnp.asarray(z.transpose(0, 2, 3, 1)), method='decode')
    assert _max(ref, np.asarray(ours).transpose(0, 3, 1, 2)) < TOL


@pytest.mark.slow
def test_diffusers_clip_contexts_match(ck, folder):
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
    from vd_jax.models import family
    from vd_jax.tokenizers import clip_tokenizer
    cfg = ck['cfg']
    ids = np.asarray(clip_tokenizer()(['a red bicycle', 'two cats on a sofa at night']))
    tm = CLIPTextModelWithProjection.from_pretrained(os.path.join(folder, 'text_encoder')).eval()
    with torch.no_grad():
        o = tm(input_ids=torch.from_numpy(ids).long())
        # VD's context: every token projected, divided by the norm of the pooled embedding
        ref = (tm.text_projection(o.last_hidden_state) / o.text_embeds.norm(dim=-1)[:, None, None]).numpy()
    ours, _ = family('clip_text').build(cfg.ctx.text).apply({'params': ck['params']['ctx_text']},
                                                            jnp.asarray(ids))
    assert _max(ref, ours) < TOL
    vm = CLIPVisionModelWithProjection.from_pretrained(os.path.join(folder, 'image_encoder')).eval()
    s = cfg.ctx.image.image_size
    px = np.random.default_rng(5).standard_normal((2, 3, s, s)).astype(np.float32)
    with torch.no_grad():
        o = vm(pixel_values=torch.from_numpy(px))
        proj = vm.visual_projection(vm.vision_model.post_layernorm(o.last_hidden_state))
        ref = (proj / o.image_embeds.norm(dim=-1)[:, None, None]).numpy()
    ours, _ = family('clip_vision').build(cfg.ctx.image).apply({'params': ck['params']['ctx_image']},
                                                 jnp.asarray(px.transpose(0, 2, 3, 1)))
    assert _max(ref, ours) < TOL


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------

def _fails(capsys, args, *needles):
    where = os.path.dirname(args[1])
    before = sorted(os.listdir(where))
    assert export_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err, err
    for n in needles:
        assert n in err, err
    assert sorted(os.listdir(where)) == before  # nothing written, no temporary left


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2_nothing_written(ck, tmp_path, capsys):
    ckpt, out = ck['path'], str(tmp_path / 'x.pth')
    _fails(capsys, [str(tmp_path / 'nope'), out], 'nope', 'does not exist')
    empty = tmp_path / 'empty'
    empty.mkdir()
    _fails(capsys, [str(empty), out], 'config.json')
    _fails(capsys, [ckpt, out, '--layout', 'v2'], "unknown layout 'v2'", 'v1.0, legacy, diffusers')
    _fails(capsys, [ckpt, out, '--dtype', 'int8'], "unknown dtype 'int8'")
    _fails(capsys, [ckpt, str(tmp_path / 'x.txt')], '.safetensors', '.pth')
    (tmp_path / 'taken.pth').write_bytes(b'user data')
    _fails(capsys, [ckpt, str(tmp_path / 'taken.pth')], 'already exists', '--overwrite')
    assert (tmp_path / 'taken.pth').read_bytes() == b'user data'
    # a truncated part file is named
    bad = tmp_path / 'bad'
    bad.mkdir()
    for f in os.listdir(ckpt):
        data = open(os.path.join(ckpt, f), 'rb').read()
        (bad / f).write_bytes(data[:len(data) // 2] if f == 'vae_image.safetensors' else data)
    _fails(capsys, [str(bad), out], 'vae_image', 'truncated')
    # weights that do not match the checkpoint's config
    cfg = json.load(open(os.path.join(ckpt, 'config.json')))
    cfg['ctx']['text']['hidden_size'] = 64
    json.dump(cfg, open(bad / 'config.json', 'w'))
    with open(os.path.join(ckpt, 'vae_image.safetensors'), 'rb') as f:
        (bad / 'vae_image.safetensors').write_bytes(f.read())
    _fails(capsys, [str(bad), out], 'ctx_text', 'wrong shape')
    # a stream diffusers cannot express (VD-DC's context-only text stream)
    dc = load_config('vd_dc:tiny').model
    dc_params = {'diffuser': VersatileDiffusion.random(dc).params['diffuser']}
    write_checkpoint(str(tmp_path / 'dc'), dc, jax.tree.map(np.asarray, dc_params))
    _fails(capsys, [str(tmp_path / 'dc'), str(tmp_path / 'dcout'), '--layout', 'diffusers'],
           "stream 'text'", "['context']")
    # an AutoKL with fewer GroupNorm groups (VD-mini's): the original code hard-codes 32, so
    # only the diffusers layout (norm_num_groups) may carry it
    g8 = tmp_path / 'g8'
    g8.mkdir()
    for f in os.listdir(ckpt):
        (g8 / f).write_bytes(open(os.path.join(ckpt, f), 'rb').read())
    cfg = json.load(open(os.path.join(ckpt, 'config.json')))
    cfg['vae']['image']['norm_groups'] = 8
    json.dump(cfg, open(g8 / 'config.json', 'w'))
    _fails(capsys, [str(g8), str(tmp_path / 'g8.pth')], 'norm_groups=8', '--layout diffusers')
    export_checkpoint(str(g8), str(tmp_path / 'g8_diffusers'), layout='diffusers')
    vae_cfg = json.load(open(tmp_path / 'g8_diffusers' / 'vae' / 'config.json'))
    assert vae_cfg['norm_num_groups'] == 8
    with pytest.raises(InputError, match='already exists'):
        export_checkpoint(ckpt, str(tmp_path / 'taken.pth'))
    export_checkpoint(ckpt, str(tmp_path / 'taken.pth'), overwrite=True)
    assert len(torch.load(str(tmp_path / 'taken.pth'), weights_only=True)) > 100


@pytest.mark.slow
def test_cli_writes_and_refuses_to_overwrite(ck, tmp_path):
    out = tmp_path / 'vd.safetensors'
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    cmd = [sys.executable, '-m', 'vd_jax.export', ck['path'], str(out), '--layout', 'legacy']
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert 'model.diffusion_model.time_embed.0.weight' in load_safetensors(str(out))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and 'already exists' in r.stderr
