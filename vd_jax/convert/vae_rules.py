"""Conversion tables of the image VAE (part `vae_image`, `vd_jax.models.vae.AutoencoderKL`).

Canonical names are the LDM state-dict names of `autokl.py:AutoencoderKL` (what
`kl-f8.pth` holds at top level and the v1.0 four-flow checkpoint under `vae.image.`).
One row per tensor, generated from the config by walking the model, carries the LDM
name, the diffusers names (modern first, then the pre-0.14 attention names) and the
transform. Source layouts:
  * `ldm-autokl`  stand-alone `kl-f8.pth`: `encoder.*`, `decoder.*`, `quant_conv.*`,
    `post_quant_conv.*` (a `loss.*` LPIPS/discriminator of a training checkpoint is ignored);
  * `vd-v1.0`     the same names under `vae.image.`;
  * `vd-legacy`   the same names under `autokl.` (the Nov-2022 `VD` module's attribute);
  * `diffusers`   a pipeline's `vae/` folder (`vae.` prefix), diffusers `AutoencoderKL` names;
  * `diffusers-autokl` a diffusers `AutoencoderKL` weights file opened directly (no prefix).
The mid-block attention q/k/v/proj_out are 1x1 convs in LDM files ((C, C, 1, 1)) and
Linear layers in diffusers files ((C, C)); both become Dense kernels (in, out).
"""
from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

from vd_jax.checkpoint import flatten
from vd_jax.convert.engine import Ignore, Rule
from vd_jax.convert.parts import Layout, PartConverter, register, register_layout
from vd_jax.convert.transforms import CONV, CONV1X1, IDENTITY, LINEAR, Transform

PART = 'vae_image'
LDM_PREFIXES = ('encoder.', 'decoder.', 'quant_conv.', 'post_quant_conv.')
# prefix of the part inside each layout's key space
PREFIX = {'ldm-autokl': '', 'vd-v1.0': 'vae.image.', 'vd-legacy': 'autokl.', 'diffusers': 'vae.',
          'diffusers-autokl': ''}
_DIFFUSERS_LAYOUTS = ('diffusers', 'diffusers-autokl')
# keys of other model families: a file holding any of these is not a stand-alone VAE file
_FOREIGN = ('diffuser.', 'model.diffusion_model.', 'vae.', 'ctx.', 'first_stage_model.',
            'cond_stage_model.', 'image_unet.', 'text_unet.', 'text_encoder.', 'image_encoder.',
            'autokl.', 'optimus.', 'clip.')


@dataclasses.dataclass(frozen=True)
class Row:
    """One tensor of the VAE."""
    ldm: str                      # canonical (LDM) name, e.g. encoder.down.0.block.0.conv1.weight
    path: str                     # Flax path, e.g. encoder/down_0/block_0/conv1/kernel
    ldm_transform: Transform      # from the LDM tensor
    diffusers: Tuple[str, ...]    # diffusers names: the modern one, then legacy aliases
    diffusers_transform: Transform

    def transform(self, layout: str) -> Transform:
        return self.diffusers_transform if layout in _DIFFUSERS_LAYOUTS else self.ldm_transform


def _add(rows, ldm, path, diff, kind, legacy=None):
    """weight + bias of one layer. kind: conv (3x3) | conv1x1 | attn | norm."""
    w_ldm, w_diff = {'conv': (CONV, CONV), 'conv1x1': (CONV1X1, CONV1X1),
                     'attn': (CONV1X1, LINEAR), 'norm': (IDENTITY, IDENTITY)}[kind]
    names = (diff,) + ((legacy,) if legacy else ())
    rows.append(Row(f'{ldm}.weight', f"{path}/{'scale' if kind == 'norm' else 'kernel'}", w_ldm,
                    tuple(f'{n}.weight' for n in names), w_diff))
    rows.append(Row(f'{ldm}.bias', f'{path}/bias', IDENTITY, tuple(f'{n}.bias' for n in names),
                    IDENTITY))


def _resnet(rows, ldm, path, diff, cin, cout):
    for n, kind in (('norm1', 'norm'), ('conv1', 'conv'), ('norm2', 'norm'), ('conv2', 'conv')):
        _add(rows, f'{ldm}.{n}', f'{path}/{n}', f'{diff}.{n}', kind)
    if cin != cout:
        _add(rows, f'{ldm}.nin_shortcut', f'{path}/nin_shortcut', f'{diff}.conv_shortcut', 'conv1x1')


def _attn(rows, ldm, path, diff):
    _add(rows, f'{ldm}.norm', f'{path}/norm', f'{diff}.group_norm', 'norm')
    # diffusers >= 0.14 names, and the AttentionBlock names older hub files still carry
    for n, modern, legacy in (('q', 'to_q', 'query'), ('k', 'to_k', 'key'), ('v', 'to_v', 'value'),
                              ('proj_out', 'to_out.0', 'proj_attn')):
        _add(rows, f'{ldm}.{n}', f'{path}/{n}', f'{diff}.{modern}', 'attn', f'{diff}.{legacy}')


def _mid(rows, half, width):
    _resnet(rows, f'{half}.mid.block_1', f'{half}/mid/block_1', f'{half}.mid_block.resnets.0',
            width, width)
    _attn(rows, f'{half}.mid.attn_1', f'{half}/mid/attn_1', f'{half}.mid_block.attentions.0')
    _resnet(rows, f'{half}.mid.block_2', f'{half}/mid/block_2', f'{half}.mid_block.resnets.1',
            width, width)


def autokl_rows(config) -> List[Row]:
    """Every tensor of `AutoencoderKL(config)`, in LDM state-dict order."""
    # lazy: vd_jax.models.vae pulls in jax, flax (+0.9 s)
    from vd_jax.models.vae import as_autokl_config  # noqa: PLC0415
    cfg = as_autokl_config(config)
    n = cfg.num_levels
    rows: List[Row] = []
    widths = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult]
    # encoder
    _add(rows, 'encoder.conv_in', 'encoder/conv_in', 'encoder.conv_in', 'conv')
    for i in range(n):
        cin = widths[i]
        for j in range(cfg.num_res_blocks):
            _resnet(rows, f'encoder.down.{i}.block.{j}', f'encoder/down_{i}/block_{j}',
                    f'encoder.down_blocks.{i}.resnets.{j}', cin, widths[i + 1])
            cin = widths[i + 1]
            if cfg.level_has_attn(i):
                _attn(rows, f'encoder.down.{i}.attn.{j}', f'encoder/down_{i}/attn_{j}',
                      f'encoder.down_blocks.{i}.attentions.{j}')
        if i != n - 1:
            _add(rows, f'encoder.down.{i}.downsample.conv', f'encoder/down_{i}/downsample/conv',
                 f'encoder.down_blocks.{i}.downsamplers.0.conv', 'conv')
    _mid(rows, 'encoder', widths[-1])
    _add(rows, 'encoder.norm_out', 'encoder/norm_out', 'encoder.conv_norm_out', 'norm')
    _add(rows, 'encoder.conv_out', 'encoder/conv_out', 'encoder.conv_out', 'conv')
    # decoder: LDM `up.k` is the level at resolution / 2**k; diffusers lists the up blocks in
    # execution order, so `up_blocks.(n-1-k)` is the same level.
    _add(rows, 'decoder.conv_in', 'decoder/conv_in', 'decoder.conv_in', 'conv')
    _mid(rows, 'decoder', widths[-1])
    for k in reversed(range(n)):
        d = n - 1 - k
        cin = widths[min(k + 2, n)]
        for j in range(cfg.num_res_blocks + 1):
            _resnet(rows, f'decoder.up.{k}.block.{j}', f'decoder/up_{k}/block_{j}',
                    f'decoder.up_blocks.{d}.resnets.{j}', cin, widths[k + 1])
            cin = widths[k + 1]
            if cfg.level_has_attn(k):
                _attn(rows, f'decoder.up.{k}.attn.{j}', f'decoder/up_{k}/attn_{j}',
                      f'decoder.up_blocks.{d}.attentions.{j}')
        if k != 0:
            _add(rows, f'decoder.up.{k}.upsample.conv', f'decoder/up_{k}/upsample/conv',
                 f'decoder.up_blocks.{d}.upsamplers.0.conv', 'conv')
    _add(rows, 'decoder.norm_out', 'decoder/norm_out', 'decoder.conv_norm_out', 'norm')
    _add(rows, 'decoder.conv_out', 'decoder/conv_out', 'decoder.conv_out', 'conv')
    _add(rows, 'quant_conv', 'quant_conv', 'quant_conv', 'conv1x1')
    _add(rows, 'post_quant_conv', 'post_quant_conv', 'post_quant_conv', 'conv1x1')
    return rows


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def _vae_section(model_cfg):
    vae = model_cfg['vae'] if 'vae' in model_cfg else None
    return vae['image'] if vae is not None and 'image' in vae else None


def _has_part(model_cfg) -> bool:
    return _vae_section(model_cfg) is not None


def _target(model_cfg):
    # lazy: vd_jax.models.init pulls in jax, flax (+0.6 s)
    from vd_jax.models.init import abstract_params  # noqa: PLC0415
    from vd_jax.models.vae import AutoencoderKL  # noqa: PLC0415
    tree = abstract_params(AutoencoderKL(_vae_section(model_cfg)))
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def _tables(model_cfg, layout: str, keys: Sequence[str]):
    rows = autokl_rows(_vae_section(model_cfg))
    rules = [Rule(r.ldm, r.path, r.transform(layout), exact=True) for r in rows]
    pre = PREFIX[layout]
    if layout in _DIFFUSERS_LAYOUTS:
        # both the modern and the legacy attention names map to the LDM name; a file with
        # both is reported as a parameter filled twice
        rename = {pre + d: r.ldm for r in rows for d in r.diffusers}
    else:
        rename = {pre + r.ldm: r.ldm for r in rows} if pre else {}
    return rules, [], rename, {}


def _export_names(model_cfg, layout: str, canonical: Sequence[str]):
    """LDM name -> name in `layout`; diffusers layouts get the modern attention names."""
    pre = PREFIX[layout]
    rows = autokl_rows(_vae_section(model_cfg))
    return {r.ldm: pre + (r.diffusers[0] if layout in _DIFFUSERS_LAYOUTS else r.ldm)
            for r in rows}, {}


def _stand_alone(required: Tuple[str, ...]):
    """Detect a stand-alone VAE file: all `required` keys at top level, nothing foreign."""
    def detect(keys: Sequence[str]) -> bool:
        ks = set(keys)
        return all(k in ks for k in required) and not any(k.startswith(_FOREIGN) for k in keys)
    return detect


# `quant_conv` exists only in the AutoKL (Optimus' `encoder.`/`decoder.` keys have none), and
# the mid-block names tell LDM from diffusers naming.
register_layout(Layout(
    'ldm-autokl', 'stand-alone LDM AutoencoderKL (`kl-f8.pth`: `encoder.*`, `decoder.*`, '
    '`quant_conv.*`, `post_quant_conv.*`)',
    _stand_alone(('encoder.conv_in.weight', 'decoder.conv_out.weight', 'quant_conv.weight',
                  'encoder.mid.block_1.conv1.weight')),
    (Ignore(r'loss\..*', 'LPIPS/discriminator of the VAE training loss (lossconfig); not part '
            'of the model'),)), first=True)
register_layout(Layout(
    'diffusers-autokl', 'stand-alone diffusers AutoencoderKL weights file (`encoder.down_blocks.*`, '
    '`decoder.up_blocks.*`, ...)',
    _stand_alone(('encoder.conv_in.weight', 'decoder.conv_out.weight', 'quant_conv.weight',
                  'encoder.mid_block.resnets.0.conv1.weight'))), first=True)

register(PartConverter(
    PART, {'ldm-autokl': LDM_PREFIXES, 'diffusers-autokl': LDM_PREFIXES,
           'vd-v1.0': ('vae.image.',), 'vd-legacy': ('autokl.',), 'diffusers': ('vae.',)},
    _has_part, _target, _tables, _export_names))
