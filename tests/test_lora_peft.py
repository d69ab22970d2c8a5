"""diffusers/PEFT LoRA files on VD (vd_jax.lora.peft_import) against diffusers' own loading.

Reference: a tiny SD-style `UNet2DConditionModel` (the tiny config's image stream: cross-
attention at two levels) with random weights; a PEFT LoRA on its attention projections, the
1x1 proj_in/out and a 3x3 resnet conv (random non-zero B), saved by diffusers
(`save_lora_adapter`, PEFT names + `lora_adapter_metadata`), then loaded by diffusers
(`load_lora_adapter`) into a fresh copy of the UNet. Our side: the converted base + the same
file through `load_lora`, image-context flow (= that UNet), merged and on the fly, at 1e-4.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft  # noqa: F401 -- in the test extra: a missing install fails, never skips
import torch

from vd_jax.config import load_config  # noqa: E402
from vd_jax.convert import convert_checkpoint  # noqa: E402
from vd_jax.errors import CheckpointError  # noqa: E402
from vd_jax.lora import import_peft  # noqa: E402
from vd_jax.lora.adapters import merge, sampling_weights  # noqa: E402
from vd_jax.lora.apply import LoraDiffuser  # noqa: E402
from vd_jax.models.unet import Diffuser  # noqa: E402

TARGETS = ['to_q', 'to_k', 'to_v', 'to_out.0', 'proj_in', 'proj_out',
           'down_blocks.1.resnets.0.conv1']


def _unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
        up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
        block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=32)
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().max() == 0:  # zero-inits would hide mistakes
                p.normal_(0, 0.05)
    return unet.eval()


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    from peft import LoraConfig
    out = tmp_path_factory.mktemp('peft')
    unet = _unet()
    base_sd = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS,
                                alpha_pattern={'proj_out': 2.0}, init_lora_weights=True))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if 'lora_B' in n:
                p.normal_(0, 0.05)
    unet.save_lora_adapter(str(out))
    path = str(out / 'pytorch_lora_weights.safetensors')
    # diffusers' own loading into a fresh UNet with the same base weights
    ref = _unet()
    ref.load_state_dict(base_sd)
    # (the folder, not the file: diffusers 0.42.1 reads the file's metadata, i.e. the alphas,
    # only when it finds the file in a folder)
    ref.load_lora_adapter(str(out), prefix=None, use_safetensors=True)
    conf = next(iter(ref.peft_config.values()))
    assert conf.lora_alpha == 6 and conf.alpha_pattern == {'proj_out': 2.0}
    cfg = load_config('tiny').model
    # the tiny config's image stream alone with all three parts: exactly this UNet
    image = dict(cfg.diffuser.streams.image, parts=['global', 'data', 'context'])
    dcfg = dict(global_layer_ptr='image', streams={'image': image})
    mcfg = cfg.copy_and_resolve_references()
    mcfg.diffuser = dcfg
    params = convert_checkpoint({f'image_unet.{k}': v for k, v in base_sd.items()}, mcfg,
                                parts=['diffuser'])['diffuser']
    return dict(path=path, ref=ref, base=unet, params=params, dcfg=dcfg, model=Diffuser(dcfg))


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([17, 801]), \
        torch.randn(2, 7, 32, generator=g)


@pytest.mark.slow
def test_peft_file_matches_diffusers_lora_loading(setup):
    x, t, c = _inputs()
    with torch.no_grad():
        want = setup['ref'](x, t, encoder_hidden_states=c).sample.numpy()
        no_lora = setup['ref']
        no_lora.disable_adapters()
        base = no_lora(x, t, encoder_hidden_states=c).sample.numpy()
        no_lora.enable_adapters()
    assert np.abs(want - base).max() > 1e-2   # the LoRA changes the output
    a = import_peft(setup['path'], setup['dcfg'], attention_stream='image')
    # every target of the file mapped: q/k/v/out of attn1+attn2, proj_in/out per transformer
    n_tf = sum(1 for m in a.weights if m.endswith('attn1/to_q'))
    assert len(a.weights) == n_tf * 10 + 1 and n_tf >= 5
    assert any(m.endswith('proj_out') and a.alphas[m] == 2.0 for m in a.weights)
    assert {a.alphas[m] for m in a.weights if not m.endswith('proj_out')} == {6.0}
    d, p = setup['model'], setup['params']
    xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    tj, cj = jnp.asarray(t.numpy()), jnp.asarray(c.numpy())
    merged = merge(p, [sampling_weights(a)], jnp.ones((1,)))
    got = np.asarray(jax.jit(lambda q: d.apply({'params': q}, xj, tj, cj, 'image', 'image'))(merged))
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, atol=1e-4, rtol=0)
    lora = {'weights': [sampling_weights(a)], 'scales': jnp.ones((1,))}
    fly = np.asarray(jax.jit(lambda q, lo: LoraDiffuser(d).apply(
        {'params': {'base': q, 'lora': lo}}, xj, tj, cj, 'image', 'image'))(p, lora))
    np.testing.assert_allclose(fly.transpose(0, 3, 1, 2), want, atol=1e-4, rtol=0)


def test_sd_attention_goes_to_the_text_context_layers_by_default(setup):
    from vd_jax.lora.peft_import import read_peft_file
    full = load_config('tiny').model.diffuser
    a = read_peft_file(setup['path'], full)
    streams = {m.split('/')[0] + '/' + m.split('/')[1].split('_')[0] for m in a.weights}
    assert streams == {'text/context', 'image/data'}


def test_keys_that_do_not_map_are_named(setup):
    from safetensors.torch import load_file
    sd = load_file(setup['path'])
    sd['text_encoder.layers.0.q_proj.lora_A.weight'] = torch.zeros(4, 8)
    sd['down_blocks.0.resnets.0.conv1.lora_magnitude_vector'] = torch.zeros(32)
    with pytest.raises(CheckpointError, match='2 LoRA key\\(s\\) do not map') as e:
        import_peft(sd, setup['dcfg'], attention_stream='image')
    assert 'text_encoder.layers.0.q_proj.lora_A.weight' in str(e.value)
    assert 'lora_magnitude_vector' in str(e.value)
    a = import_peft(sd, setup['dcfg'], attention_stream='image', skip_unmapped=True)
    assert len(a.weights) > 10
    # the old attention-processor names read the same
    old = {}
    for k, v in load_file(setup['path']).items():
        if '.attn1.to_q.lora_' in k:
            which = 'down' if 'lora_A' in k else 'up'
            old[k.replace('.to_q.lora_A.weight', f'.processor.to_q_lora.{which}.weight')
                 .replace('.to_q.lora_B.weight', f'.processor.to_q_lora.{which}.weight')] = v
    b = import_peft(old, setup['dcfg'], attention_stream='image',
                    metadata=json.loads('{"lora_alpha": 6}'))
    for m, (dn, up) in b.weights.items():
        np.testing.assert_array_equal(dn, a.weights[m][0])
        np.testing.assert_array_equal(up, a.weights[m][1])
