"""The diffuser converted from PyTorch equals the PyTorch references.

References are diffusers' own classes at the tiny config (both streams 32 channels,
channel_mult [1,2,2], one res block per level, context layers at levels 2 and 3, 2 heads,
context width 32, text latent width 16): `UNet2DConditionModel` (VD `image_unet`),
`UNetFlatConditionModel` (VD `text_unet`), the text->image pipeline's own attention-block
swap, and `DualTransformer2DModel` (the dual-guided pipeline's own conversion).

Tolerance: 1e-4 max abs on outputs of magnitude ~1. Both sides are fp32; the only
differences are summation orders in convolutions, matmuls and softmax through ~40 layers,
which measure at ~2e-6 here. 1e-4 is 50x that, and any mis-mapped tensor (a transpose, a
swapped layer, a permutation of the text state) gives errors of order 1e-1 or more.
"""
import copy
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import listing
import numpy as np
import pytest
import torch

from vd_jax.checkpoint import flatten, load_part, read_config
from vd_jax.config import load_config
from vd_jax.convert import convert_checkpoint, export_part, plan_conversion
from vd_jax.convert.sources import ShapeSource
from vd_jax.errors import CheckpointError
from vd_jax.models.unet import Diffuser

TOL = 1e-4


def _tiny_references():
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import \
        UNetFlatConditionModel
    torch.manual_seed(0)
    common = dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=2, norm_num_groups=32)
    image_unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
        up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'), **common)
    text_unet = UNetFlatConditionModel(
        sample_size=None, in_channels=(16, 1, 1), out_channels=(16, 1, 1), flip_sin_to_cos=True,
        freq_shift=0, down_block_types=('DownBlockFlat', 'CrossAttnDownBlockFlat', 'CrossAttnDownBlockFlat'),
        up_block_types=('CrossAttnUpBlockFlat', 'CrossAttnUpBlockFlat', 'UpBlockFlat'), **common)
    with torch.no_grad():
        for m in (image_unet, text_unet):
            for p in m.parameters():
                if p.ndim == 1:  # norm affines/biases off their defaults: permutations can't hide
                    p.add_(0.2 * torch.randn_like(p))
            # the released zero-inits would make outputs trivial; give them weights
            for name, p in m.named_parameters():
                if p.abs().max() == 0:
                    p.normal_(0, 0.05)
        # VD has one time MLP (the image stream's); diffusers stores a copy in each UNet
        text_unet.time_embedding.load_state_dict(image_unet.time_embedding.state_dict())
    return image_unet.eval(), text_unet.eval()


@pytest.fixture(scope='module')
def refs():
    image_unet, text_unet = _tiny_references()
    sd = {f'image_unet.{k}': v for k, v in image_unet.state_dict().items()}
    sd.update({f'text_unet.{k}': v for k, v in text_unet.state_dict().items()})
    cfg = load_config('tiny').model
    params = convert_checkpoint(sd, cfg)['diffuser']
    model = Diffuser(cfg.diffuser)
    return dict(image_unet=image_unet, text_unet=text_unet, sd=sd, cfg=cfg, params=params,
                model=model)


@pytest.fixture(scope='module')
def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(x_img=torch.randn(2, 4, 16, 16, generator=g),
                x_txt=torch.randn(2, 16, generator=g),
                t=torch.tensor([17, 801]),
                c_txt=torch.randn(2, 7, 32, generator=g),
                c_img=torch.randn(2, 9, 32, generator=g))


@pytest.fixture(scope='module')
def run(refs):
    model = refs['model']
    flow = jax.jit(lambda p, x, t, c, xt, ct: model.apply({'params': p}, x, t, c, xt, ct),
                   static_argnums=(4, 5))

    def go(x, t, c, xtype, ctype, params=None):
        x = x.numpy()
        x = x.transpose(0, 2, 3, 1) if x.ndim == 4 else x
        y = np.asarray(flow(params if params is not None else refs['params'], jnp.asarray(x),
                            jnp.asarray(t.numpy()), jnp.asarray(c.numpy()), xtype, ctype))
        return y.transpose(0, 3, 1, 2) if y.ndim == 4 else y
    return go


def _torch(unet, x, t, c):
    with torch.no_grad():
        if x.ndim == 2:
            return unet(x[:, :, None, None], t, encoder_hidden_states=c).sample[:, :, 0, 0].numpy()
        return unet(x, t, encoder_hidden_states=c).sample.numpy()


def _swapped(refs):
    """Image unet with text-context blocks and text unet with image-context blocks, swapped
    by diffusers' own text->image pipeline code."""
    from types import SimpleNamespace
    from diffusers.pipelines.deprecated.versatile_diffusion.pipeline_versatile_diffusion_text_to_image \
        import VersatileDiffusionTextToImagePipeline
    ns = SimpleNamespace(image_unet=copy.deepcopy(refs['image_unet']),
                         text_unet=copy.deepcopy(refs['text_unet']))
    VersatileDiffusionTextToImagePipeline._swap_unet_attention_blocks(ns)
    return ns.image_unet, ns.text_unet


@pytest.mark.slow
def test_image_variation_flow_matches_unet2d(refs, inputs, run):
    i = inputs
    ref = _torch(refs['image_unet'], i['x_img'], i['t'], i['c_img'])
    ours = run(i['x_img'], i['t'], i['c_img'], 'image', 'image')
    assert ours.shape == ref.shape == (2, 4, 16, 16)
    assert np.abs(ref).max() > 0.1
    assert np.abs(ours - ref).max() < TOL


@pytest.mark.slow
def test_text_variation_flow_matches_unetflat(refs, inputs, run):
    i = inputs
    ref = _torch(refs['text_unet'], i['x_txt'], i['t'], i['c_txt'])
    ours = run(i['x_txt'], i['t'], i['c_txt'], 'text', 'text')
    assert ours.shape == ref.shape == (2, 16)
    assert np.abs(ref).max() > 0.1
    assert np.abs(ours - ref).max() < TOL


@pytest.mark.slow
def test_cross_flows_match_swapped_unets(refs, inputs, run):
    """text->image = image data layers + text context layers; image->text the reverse."""
    i = inputs
    img_unet_t2i, txt_unet_i2t = _swapped(refs)
    ref = _torch(img_unet_t2i, i['x_img'], i['t'], i['c_txt'])
    assert np.abs(run(i['x_img'], i['t'], i['c_txt'], 'image', 'text') - ref).max() < TOL
    ref = _torch(txt_unet_i2t, i['x_txt'], i['t'], i['c_img'])
    assert np.abs(run(i['x_txt'], i['t'], i['c_img'], 'text', 'image') - ref).max() < TOL
    # and the flows really differ (the swap matters)
    assert np.abs(run(i['x_img'], i['t'], i['c_txt'], 'image', 'text') -
                  run(i['x_img'], i['t'], i['c_txt'], 'image', 'image')).max() > 1e-2


def _dual(unet, other, text_index_first=True):
    """Replace unet's transformers by DualTransformer2DModel([image block, text block])."""
    from diffusers.models import DualTransformer2DModel
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    unet, other = copy.deepcopy(unet), copy.deepcopy(other)
    duals = []
    for name, module in list(unet.named_modules()):
        if isinstance(module, Transformer2DModel):
            parent, idx = name.rsplit('.', 1)
            c = module.config
            dual = DualTransformer2DModel(num_attention_heads=c.num_attention_heads,
                                          attention_head_dim=c.attention_head_dim,
                                          in_channels=c.in_channels, norm_num_groups=c.norm_num_groups,
                                          cross_attention_dim=c.cross_attention_dim)
            blocks = [module, other.get_submodule(parent)[int(idx)]]
            dual.transformers[0], dual.transformers[1] = blocks
            unet.get_submodule(parent)[int(idx)] = dual
            duals.append(dual)
    return unet, duals


@pytest.fixture()
def patched_dual(monkeypatch):
    # diffusers 0.42.1 bug: CrossAttn blocks pass `encoder_attention_mask`, which
    # DualTransformer2DModel.forward does not accept (environment.md §3)
    from diffusers.models import DualTransformer2DModel
    orig = DualTransformer2DModel.forward
    monkeypatch.setattr(DualTransformer2DModel, 'forward',
                        lambda self, *a, encoder_attention_mask=None, **k: orig(self, *a, **k))


@pytest.mark.slow
@pytest.mark.parametrize('xtype', ['image', 'text'])
def test_attention_mixing_matches_dual_transformer(refs, inputs, patched_dual, xtype):
    """Dual-guided attention-level mixing, for image output (diffusers' dual-guided pipeline
    construction) and for text output (which the original crashes on)."""
    from types import SimpleNamespace
    from diffusers.pipelines.deprecated.versatile_diffusion.pipeline_versatile_diffusion_dual_guided \
        import VersatileDiffusionDualGuidedPipeline
    i, model, params = inputs, refs['model'], refs['params']
    text_strength = 0.7
    if xtype == 'image':
        ns = SimpleNamespace(image_unet=copy.deepcopy(refs['image_unet']),
                             text_unet=copy.deepcopy(refs['text_unet']))
        VersatileDiffusionDualGuidedPipeline._convert_to_dual_attention(ns)
        unet = ns.image_unet
        from diffusers.models import DualTransformer2DModel
        duals = [m for m in unet.modules() if isinstance(m, DualTransformer2DModel)]
        x_t, x_j = i['x_img'], jnp.asarray(i['x_img'].numpy().transpose(0, 2, 3, 1))
    else:
        unet, duals = _dual(refs['text_unet'], refs['image_unet'])
        # _dual put [text block (own), image block]; index them accordingly
        for d in duals:
            d.transformers[0], d.transformers[1] = d.transformers[1], d.transformers[0]
        x_t, x_j = i['x_txt'], jnp.asarray(i['x_txt'].numpy())
    assert len(duals) == 7
    for d in duals:  # set_transformer_params(mix_ratio, ('text', 'image')) at our lengths
        d.mix_ratio = text_strength
        d.condition_lengths = [7, 9]
        d.transformer_index_for_condition = [1, 0]
    ref = _torch(unet, x_t, i['t'], torch.cat([i['c_txt'], i['c_img']], 1))
    ours = np.asarray(model.apply({'params': params}, x_j, jnp.asarray(i['t'].numpy()),
                                  [jnp.asarray(i['c_txt'].numpy()), jnp.asarray(i['c_img'].numpy())],
                                  ['text', 'image'], [text_strength, 1 - text_strength], xtype,
                                  method='mix'))
    if ours.ndim == 4:
        ours = ours.transpose(0, 3, 1, 2)
    assert np.abs(ours - ref).max() < TOL


@pytest.mark.slow
def test_layer_mixing_matches_per_layer_swap(refs, inputs):
    """Layer-level mixing runs, at context layer j, only the chosen context's layer."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    i, model, params = inputs, refs['model'], refs['params']
    choices = [0, 1, 1, 0, 1, 0, 0]  # 0 = text context, 1 = image context
    unet = copy.deepcopy(refs['image_unet'])
    names = [n for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]
    # execution order: down blocks, mid block, up blocks (registration order differs)
    names.sort(key=lambda n: ('down_blocks', 'mid_block', 'up_blocks').index(n.split('.')[0]))
    assert len(names) == 7
    text_blocks = {n: m for n, m in refs['text_unet'].named_modules() if n in names}
    for j, n in enumerate(names):
        if choices[j] == 0:
            parent, idx = n.rsplit('.', 1)
            unet.get_submodule(parent)[int(idx)] = copy.deepcopy(text_blocks[n])
    # text tokens and image tokens must reach their own blocks: feed each block its context
    hooks = []
    for n, m in unet.named_modules():
        if n in names:
            ctx = i['c_txt'] if choices[names.index(n)] == 0 else i['c_img']
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, kwargs, ctx=ctx: (args, {**kwargs, 'encoder_hidden_states': ctx}),
                with_kwargs=True))
    ref = _torch(unet, i['x_img'], i['t'], i['c_txt'])
    for h in hooks:
        h.remove()
    x = jnp.asarray(i['x_img'].numpy().transpose(0, 2, 3, 1))
    ctxs = [jnp.asarray(i['c_txt'].numpy()), jnp.asarray(i['c_img'].numpy())]
    ours = model.apply({'params': params}, x, jnp.asarray(i['t'].numpy()), ctxs, ['text', 'image'],
                       [0.5, 0.5], 'image', 'layer', layer_choices=choices, method='mix')
    assert np.abs(np.asarray(ours).transpose(0, 3, 1, 2) - ref).max() < TOL
    # traced choices (drawn from a key inside jit) run every context but keep the chosen one
    traced = jax.jit(lambda c: model.apply({'params': params}, x, jnp.asarray(i['t'].numpy()), ctxs,
                                           ['text', 'image'], [0.5, 0.5], 'image', 'layer',
                                           layer_choices=c, method='mix'))
    assert np.abs(np.asarray(traced(jnp.asarray(choices))) - np.asarray(ours)).max() < 1e-5


@pytest.mark.slow
def test_v10_and_legacy_layouts_give_identical_outputs(refs, inputs, run):
    cfg = refs['cfg']
    v10 = export_part(refs['params'], cfg, 'diffuser', 'vd-v1.0')
    legacy = export_part(refs['params'], cfg, 'diffuser', 'vd-legacy')
    assert set(v10) != set(legacy)
    assert all(k.startswith('diffuser.') for k in v10)
    assert all(k.startswith('model.diffusion_model.') for k in legacy)
    # the schedule buffers a real file carries are ignored by name
    v10.update({k: np.zeros(1000, np.float32) for k in ('betas', 'alphas_cumprod')})
    p10 = convert_checkpoint(v10, cfg)['diffuser']
    pleg = convert_checkpoint(legacy, cfg)['diffuser']
    f10, fleg, f0 = flatten(p10), flatten(pleg), flatten(refs['params'])
    assert set(f10) == set(fleg) == set(f0)
    for k in f0:
        np.testing.assert_array_equal(f10[k], fleg[k])
        np.testing.assert_array_equal(f10[k], f0[k])
    i = inputs
    for xt, x, ct, c in [('image', i['x_img'], 'text', i['c_txt']),
                         ('text', i['x_txt'], 'image', i['c_img'])]:
        np.testing.assert_array_equal(run(x, i['t'], c, xt, ct, p10), run(x, i['t'], c, xt, ct, pleg))


@pytest.mark.slow
def test_diffusers_export_round_trip(refs):
    out = export_part(refs['params'], refs['cfg'], 'diffuser', 'diffusers')
    sd = refs['sd']
    assert set(out) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(out[k], v.numpy(), err_msg=k)


@pytest.mark.slow
def test_full_size_v10_keys_all_map_with_matching_shapes():
    rows = listing.rows('vd_keys_fourflow.tsv')
    shapes = {r[0]: listing.shape(r[1]) for r in rows if r[0].startswith('diffuser.')}
    assert len(shapes) == 4 + 266 + 416 + 266 + 416
    schedule = {r[0]: listing.shape(r[1]) for r in rows if r[4] == 'schedule-buffer'}
    assert len(schedule) == 12
    layout, plans, targets, record = plan_conversion(ShapeSource({**shapes, **schedule}),
                                                     'vd_four_flow', parts=['diffuser'])
    assert layout.name == 'vd-v1.0'
    plan = plans['diffuser']
    assert len(plan.entries) == len(shapes) == len(targets['diffuser'])
    assert sum(int(np.prod(s)) for s in targets['diffuser'].values()) == 2_566_318_852
    assert {k for k, _ in record['ignored']} == set(schedule)


@pytest.mark.slow
def test_full_size_legacy_keys_map_like_the_reference_listing():
    rows = listing.rows('vd_keys_fourflow_legacy_map.tsv')
    assert len(rows) == 1368
    shapes = {r[0]: listing.shape(r[2]) for r in rows}
    v10_of = {r[0]: r[1] for r in rows}
    layout, plans, targets, _ = plan_conversion(ShapeSource(shapes), 'vd_four_flow')
    assert layout.name == 'vd-legacy'
    entries = plans['diffuser'].entries
    assert len(entries) == 1368 == len(targets['diffuser'])
    for e in entries:  # our layer walk reproduces the listing's legacy -> v1.0 mapping
        assert e.canonical_key == v10_of[e.source_key]


def _export_tiny_v10(refs):
    return {k: torch.from_numpy(np.ascontiguousarray(v))
            for k, v in export_part(refs['params'], refs['cfg'], 'diffuser', 'vd-v1.0').items()}


@pytest.mark.slow
def test_fp16_pth_file_converts_to_a_checkpoint_folder(refs, tmp_path, inputs, run):
    sd = {k: v.half() for k, v in _export_tiny_v10(refs).items()}
    src = tmp_path / 'vd-tiny-fp16.pth'
    torch.save(sd, src)
    out = tmp_path / 'converted'
    convert_checkpoint(str(src), 'tiny', str(out))
    assert sorted(os.listdir(out)) == ['config.json', 'diffuser.safetensors', 'manifest.json']
    assert read_config(str(out)).diffuser.global_layer_ptr == 'image'
    params = load_part(str(out), 'diffuser')
    for k, v in flatten(refs['params']).items():
        np.testing.assert_array_equal(np.asarray(flatten(params)[k]),
                                      np.asarray(v).astype(np.float16).astype(np.float32))
    # the safetensors file is standard: the reference library reads it
    from safetensors.numpy import load_file
    st = load_file(str(out / 'diffuser.safetensors'))
    assert set(st) == set(flatten(refs['params']))


@pytest.mark.slow
def test_bad_inputs_give_clear_errors_and_write_nothing(refs, tmp_path):
    sd = _export_tiny_v10(refs)
    cfg = refs['cfg']
    out = tmp_path / 'out'

    def fails(src, exc, *needles):
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(exc) as e:
            convert_checkpoint(src, cfg, str(out))
        for n in needles:
            assert n in str(e.value), str(e.value)
        assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temp folder left
        return e

    missing = dict(sd)
    del missing['diffuser.image.data_blocks.2.0.op.weight']
    fails(missing, CheckpointError, 'missing', 'image/data_blocks_2/op/kernel')
    extra = dict(sd, **{'diffuser.image.data_blocks.2.0.op.extra': torch.zeros(3)})
    fails(extra, CheckpointError, 'unexpected', 'diffuser.image.data_blocks.2.0.op.extra')
    wrong = dict(sd)
    wrong['diffuser.text.context_blocks.2.0.proj_in.weight'] = torch.zeros(64, 65, 1, 1)
    fails(wrong, CheckpointError, 'shape', 'diffuser.text.context_blocks.2.0.proj_in.weight')
    fails({'some.other.model.weight': torch.zeros(3)}, CheckpointError, 'unknown checkpoint layout')
    # part of a full checkpoint vd_jax cannot convert (here: an unknown part) is named
    bad = tmp_path / 'truncated.pth'
    full = tmp_path / 'full.pth'
    torch.save(sd, full)
    bad.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    fails(str(bad), CheckpointError, 'truncated.pth')
    bad.unlink()
    # an existing output is never overwritten unless asked
    out.mkdir()
    (out / 'keep.txt').write_text('user data')
    with pytest.raises(FileExistsError, match='already exists'):
        convert_checkpoint(sd, cfg, str(out))
    assert (out / 'keep.txt').read_text() == 'user data'
    convert_checkpoint(sd, cfg, str(out), overwrite=True)
    assert not (out / 'keep.txt').exists() and (out / 'diffuser.safetensors').exists()


@pytest.mark.slow
def test_unsupported_parts_are_named_and_skippable(refs):
    cfg = refs['cfg']
    sd = _export_tiny_v10(refs)
    sd['vae.nonsense.w'] = torch.zeros(2)  # claimed by no part of the v1.0 layout
    with pytest.raises(CheckpointError, match='vae.nonsense.w'):
        convert_checkpoint(sd, cfg)
    del sd['vae.nonsense.w']
    # the config has no VAE-text section of this shape: a part present but not wanted
    sd['vae.text.foo.weight'] = torch.zeros(2)
    with pytest.raises(CheckpointError, match='vae_text'):
        convert_checkpoint(sd, cfg)
    out = convert_checkpoint(sd, cfg, skip_parts=['vae_text'])
    assert set(out) == {'diffuser'}


@pytest.mark.slow
def test_cli_converts_and_refuses_to_overwrite(refs, tmp_path):
    src = tmp_path / 'tiny.pth'
    torch.save(_export_tiny_v10(refs), src)
    out = tmp_path / 'ck'
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    cmd = [sys.executable, '-m', 'vd_jax.convert', str(src), str(out), '--config', 'tiny']
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (out / 'diffuser.safetensors').exists()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and 'already exists' in r.stderr
