"""Conversion table of the diffuser: v1.0 keys -> Flax paths, plus the legacy and diffusers
key layouts renamed onto v1.0 keys.

Per block type, a table of (PyTorch suffix, Flax suffix, transform); block prefixes come
from the layer plan of the config (`vd_jax.models.unet.plan_stream`), so any config the
original can express converts. The three layouts:
  * v1.0 (`VD_v2_0`, HEAD `app.py`): `diffuser.<s>.{time_embed,data_blocks.<i>.0,context_blocks.<j>.0}.*`
  * legacy (Nov-2022 `VD`, and what diffusers' converter reads): `model.diffusion_model.time_embed.*`,
    `model.diffusion_model.unet_<s>.{input_blocks.<k>.<m>,middle_block.<m>,output_blocks.<k>.<m>,out}.*`;
    walked in execution order, transformers go to the next context block, all else to the
    next data block (the final `out` -> `data_blocks.29`; `time_embed` -> the image stream);
  * diffusers (`image_unet` = UNet2DConditionModel, `text_unet` = UNetFlatConditionModel):
    `<s>_unet.{time_embedding,conv_in,down_blocks,mid_block,up_blocks,conv_norm_out,conv_out}.*`.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from vd_jax.convert.transforms import (CONV, CONV1X1, IDENTITY, LINEAR, FlatDense,
                                       FlatVector, Transform)
from vd_jax.models.unet import BlockSpec, DiffuserConfig, StreamConfig, plan_stream

Table = List[Tuple[str, str, Transform]]


def _wb(torch_name: str, flax_name: str, weight: Transform, bias: Transform = IDENTITY,
        norm: bool = False) -> Table:
    return [(f'{torch_name}.weight', f"{flax_name}/{'scale' if norm else 'kernel'}", weight),
            (f'{torch_name}.bias', f'{flax_name}/bias', bias)]


TIME_EMBED: Table = _wb('0', 'time_embed_0', LINEAR) + _wb('2', 'time_embed_2', LINEAR)

TRANSFORMER: Table = (
    _wb('norm', 'norm', IDENTITY, norm=True) + _wb('proj_in', 'proj_in', CONV1X1) +
    [(f'transformer_blocks.0.{a}.to_{p}.weight', f'transformer_blocks_0/{a}/to_{p}/kernel', LINEAR)
     for a in ('attn1', 'attn2') for p in 'qkv'] +
    _wb('transformer_blocks.0.attn1.to_out.0', 'transformer_blocks_0/attn1/to_out_0', LINEAR) +
    _wb('transformer_blocks.0.attn2.to_out.0', 'transformer_blocks_0/attn2/to_out_0', LINEAR) +
    [r for i in (1, 2, 3) for r in _wb(f'transformer_blocks.0.norm{i}', f'transformer_blocks_0/norm{i}',
                                         IDENTITY, norm=True)] +
    _wb('transformer_blocks.0.ff.net.0.proj', 'transformer_blocks_0/ff/net_0/proj', LINEAR) +
    _wb('transformer_blocks.0.ff.net.2', 'transformer_blocks_0/ff/net_2', LINEAR) +
    _wb('proj_out', 'proj_out', CONV1X1))


def data_table(s: StreamConfig, b: BlockSpec) -> Table:
    """(suffix after `data_blocks.<i>.0.`, Flax suffix, transform) for one data block."""
    if s.kind == '2d':
        if b.type == 'conv_in':
            return _wb('', 'conv', CONV)  # keys `data_blocks.0.0.weight` -> suffix '.weight'
        if b.type == 'res':
            t = (_wb('in_layers.0', 'in_layers_0', IDENTITY, norm=True) +
                 _wb('in_layers.2', 'in_layers_2', CONV) +
                 _wb('emb_layers.1', 'emb_layers_1', LINEAR) +
                 _wb('out_layers.0', 'out_layers_0', IDENTITY, norm=True) +
                 _wb('out_layers.3', 'out_layers_3', CONV))
            return t + (_wb('skip_connection', 'skip_connection', CONV1X1) if b.cin != b.cout else [])
        if b.type == 'down':
            return _wb('op', 'op', CONV)
        if b.type == 'up':
            return _wb('conv', 'conv', CONV)
        return _wb('0', 'out_0', IDENTITY, norm=True) + _wb('2', 'out_2', CONV)
    S = s.second_dim
    vec = FlatVector(S)
    if b.type == 'linear_in':
        return _wb('', 'linear', FlatDense(1, S), vec)
    if b.type == 'fc':
        conv = FlatDense(S, S, conv=True)
        t = (_wb('in_layers.0', 'in_layers_0', vec, vec, norm=True) +
             _wb('in_layers.2', 'in_layers_2', conv, vec) +
             _wb('emb_layers.1', 'emb_layers_1', FlatDense(1, S), vec) +
             _wb('out_layers.0', 'out_layers_0', vec, vec, norm=True) +
             _wb('out_layers.3', 'out_layers_3', conv, vec))
        return t + (_wb('skip_connection', 'skip_connection', conv, vec) if b.cin != b.cout else [])
    if b.type in ('down', 'up'):
        return _wb('', 'linear', FlatDense(S, S), vec)
    # out: per-channel GroupNorm on (B, C, S, 1) (no permutation), then Linear_MultiDim to 768
    return _wb('0', 'out_0', IDENTITY, norm=True) + _wb('2', 'out_2', FlatDense(S, 1))


def _join(prefix: str, suffix: str) -> str:
    # conv_in / Linear_MultiDim blocks have suffix '.weight' (the module is the block itself)
    return prefix[:-1] + suffix if suffix.startswith('.') else prefix + suffix


@dataclasses.dataclass(frozen=True)
class Row:
    canonical: str        # v1.0 key
    path: str             # Flax path
    transform: Transform
    legacy: str
    diffusers: Optional[str]


_DIFFUSERS_RES = {'in_layers.0': 'norm1', 'in_layers.2': 'conv1', 'emb_layers.1': 'time_emb_proj',
                  'out_layers.0': 'norm2', 'out_layers.3': 'conv2', 'skip_connection': 'conv_shortcut'}


def _diffusers_suffix(kind: str, btype: str, suffix: str) -> str:
    if btype in ('res', 'fc'):
        head, _, tail = suffix.rpartition('.')
        return f'{_DIFFUSERS_RES[head]}.{tail}'
    if kind == '2d' and btype == 'down':
        return suffix.replace('op.', 'conv.', 1)
    return suffix


def _block_prefixes(s: StreamConfig):
    """Per data block and per context block: (legacy prefix, diffusers prefix), in order."""
    n = len(s.channel_mult)
    data: List[Tuple[str, str]] = [('input_blocks.0.0.', 'conv_in.')]
    ctx: List[Tuple[str, str]] = []
    k = 1
    for lvl in range(n):
        for j in range(s.num_res_blocks[lvl]):
            data.append((f'input_blocks.{k}.0.', f'down_blocks.{lvl}.resnets.{j}.'))
            if s.attn_levels[lvl]:
                ctx.append((f'input_blocks.{k}.1.', f'down_blocks.{lvl}.attentions.{j}.'))
            k += 1
        if lvl != n - 1:
            data.append((f'input_blocks.{k}.0.', f'down_blocks.{lvl}.downsamplers.0.'))
            k += 1
    data.append(('middle_block.0.', 'mid_block.resnets.0.'))
    ctx.append(('middle_block.1.', 'mid_block.attentions.0.'))
    data.append(('middle_block.2.', 'mid_block.resnets.1.'))
    k = 0
    for b, lvl in enumerate(reversed(range(n))):
        for j in range(s.num_res_blocks[lvl] + 1):
            data.append((f'output_blocks.{k}.0.', f'up_blocks.{b}.resnets.{j}.'))
            m = 1
            if s.attn_levels[lvl]:
                ctx.append((f'output_blocks.{k}.1.', f'up_blocks.{b}.attentions.{j}.'))
                m = 2
            if lvl != 0 and j == s.num_res_blocks[lvl]:
                data.append((f'output_blocks.{k}.{m}.', f'up_blocks.{b}.upsamplers.0.'))
            k += 1
    data.append(('out.', None))  # diffusers splits it: conv_norm_out / conv_out
    return data, ctx


def diffuser_rows(config: DiffuserConfig) -> List[Row]:
    """Every diffuser parameter: v1.0 key, Flax path, transform, legacy and diffusers keys."""
    rows: List[Row] = []
    g = config.global_layer_ptr
    for s in config.streams:
        plan = plan_stream(s)
        dpre, cpre = _block_prefixes(s)
        assert len(dpre) == len(plan.data) and len(cpre) == len(plan.context)
        lp = f'model.diffusion_model.unet_{s.name}.'
        dp = f'{s.name}_unet.'
        if 'global' in s.parts:
            for suf, fsuf, tr in TIME_EMBED:
                diff = 'time_embedding.linear_1.' if suf.startswith('0') else 'time_embedding.linear_2.'
                rows.append(Row(f'diffuser.{s.name}.time_embed.{suf}', f'{s.name}/{fsuf}', tr,
                                f'model.diffusion_model.time_embed.{suf}' if s.name == g else
                                f'{lp}time_embed.{suf}', dp + diff + suf.split('.')[1]))
        if 'data' in s.parts:
            for i, (b, (leg, dif)) in enumerate(zip(plan.data, dpre)):
                for suf, fsuf, tr in data_table(s, b):
                    if b.type == 'out':
                        dk = dp + ('conv_norm_out.' if suf.startswith('0.') else 'conv_out.') + \
                            suf.split('.', 1)[1]
                    else:
                        dk = _join(dp + dif, _diffusers_suffix(s.kind, b.type, suf))
                    rows.append(Row(_join(f'diffuser.{s.name}.data_blocks.{i}.0.', suf),
                                    f'{s.name}/data_blocks_{i}/{fsuf}', tr, _join(lp + leg, suf), dk))
        if 'context' in s.parts:
            for j, (leg, dif) in enumerate(cpre):
                for suf, fsuf, tr in TRANSFORMER:
                    rows.append(Row(f'diffuser.{s.name}.context_blocks.{j}.0.{suf}',
                                    f'{s.name}/context_blocks_{j}/{fsuf}', tr, lp + leg + suf,
                                    dp + dif + suf))
    return rows

