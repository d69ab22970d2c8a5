"""diffusers / PEFT LoRA files of an SD-style UNet, read as vd_jax adapters.

Key names understood (any one file):
  * PEFT as diffusers saves it (`save_lora_adapter`, `save_lora_weights`, PEFT's own
    `save_pretrained`): `[unet.|base_model.model.]<module>.lora_A[.<adapter>].weight` and
    `.lora_B...`; ranks from the shapes; alphas from the file's `lora_adapter_metadata`
    (`lora_alpha`, `alpha_pattern`, `use_rslora`; pipeline files prefix them with `unet.`), or
    `<module>.alpha` tensors, else alpha = rank (diffusers' convention: scale 1);
  * the older diffusers attention-processor names `<...>.processor.to_q_lora.down.weight`
    (`up`, `to_out_lora` = `to_out.0`).
<module> is a diffusers UNet2DConditionModel module name (`down_blocks.1.attentions.0.
transformer_blocks.0.attn2.to_k`, `mid_block.resnets.0.conv1`, ...), or the VersatileDiffusion
folder's `image_unet.<module>` / `text_unet.<module>` (`vd_jax.export` writes those).

Where an SD UNet maps onto VD: VD's text -> image flow is an SD UNet (the image stream's data
layers with the *text* stream's context layers), so an SD UNet's attention blocks
(`attentions.*`) go to the context layers of `attention_stream` (default 'text') and everything
else (resnets, samplers, conv_in/out, time embedding) to the image stream (`data_stream`).
Parameters map through the converter's own diffusers table (`vd_jax.convert.diffuser_rules`),
so a module maps exactly when its weight would convert. Linear layers and 1x1 / 3x3 convs are
supported; any key that does not map (another model's, a DoRA magnitude, a LoRA bias, the
flat text UNet's multi-dimensional layers) is an error that names them (`skip_unmapped=True`
leaves them out instead, with a warning).
"""
from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, Dict, Mapping, Optional

import numpy as np

from vd_jax.checkpoint import load_safetensors, safetensors_metadata
from vd_jax.errors import CheckpointError
from vd_jax.lora.adapters import Adapter

logger = logging.getLogger('vd_jax.lora')

_PREFIXES = ('base_model.model.', 'unet.')
_VD_PREFIXES = ('image_unet.', 'text_unet.')
_OLD_PROC = re.compile(r'^(?P<mod>.*)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.'
                       r'(?P<which>down|up)\.weight$')
_PEFT = re.compile(r'^(?P<mod>.*)\.lora_(?P<which>A|B)(\.[A-Za-z0-9_-]+)?\.weight$')


def _split(key: str):
    """(module, 'A' | 'B' | 'alpha') of one file key, or None."""
    m = _OLD_PROC.match(key)
    if m:
        proj = 'to_out.0' if m['proj'] == 'to_out' else m['proj']
        return f"{m['mod']}.{proj}", 'A' if m['which'] == 'down' else 'B'
    m = _PEFT.match(key)
    if m:
        return m['mod'], m['which']
    if key.endswith('.alpha'):
        return key[:-len('.alpha')], 'alpha'
    return None


def _strip(module: str) -> str:
    for p in _PREFIXES:
        if module.startswith(p):
            module = module[len(p):]
    return module


def _rows(diffuser_config):
    """{diffusers weight key: (flax kernel path, transform name)} of a diffuser config."""
    # lazy: vd_jax.convert.diffuser_rules pulls in jax, flax (+0.9 s)
    from vd_jax.convert.diffuser_rules import diffuser_rows  # noqa: PLC0415
    # lazy: vd_jax.models.unet pulls in jax, flax (+0.8 s)
    from vd_jax.models.unet import DiffuserConfig  # noqa: PLC0415
    cfg = diffuser_config if isinstance(diffuser_config, DiffuserConfig) else \
        DiffuserConfig.from_dict(dict(diffuser_config))
    return {r.diffusers: (r.path, r.transform.name) for r in diffuser_rows(cfg)
            if r.diffusers and r.path.endswith('/kernel')}


def _target(module: str, rows, attention_stream: str, data_stream: str):
    """(flax kernel path, transform name) of a diffusers module, or None."""
    if module.startswith(_VD_PREFIXES):
        return rows.get(f'{module}.weight')
    stream = attention_stream if '.attentions.' in f'.{module}' else data_stream
    return rows.get(f'{stream}_unet.{module}.weight')


def _as_numpy(v) -> np.ndarray:
    if hasattr(v, 'detach'):  # torch tensors (state dicts given in memory)
        v = v.detach().float().cpu().numpy()
    return np.asarray(v, np.float32)


def _factors(a: np.ndarray, b: np.ndarray, transform: str, module: str):
    """(down (in, r), up (r, out)) from PEFT's A / B in PyTorch layouts."""
    r = a.shape[0]
    if transform == 'linear' and a.ndim == 2 and b.ndim == 2:
        return a.T, b.T
    if transform == 'conv1x1' and a.reshape(r, -1).shape[1] == a.shape[1]:
        return a.reshape(r, -1).T, b.reshape(b.shape[0], r).T
    if transform == 'conv' and a.ndim == 4 and b.ndim == 4 and b.shape[2:] == (1, 1):
        # our conv kernel (kh, kw, in, out) is adapted as the (kh*kw*in, out) matrix
        return a.transpose(2, 3, 1, 0).reshape(-1, r), b[:, :, 0, 0].T
    raise CheckpointError(f"LoRA module '{module}': A {a.shape} / B {b.shape} cannot adapt a "
                          f"'{transform}' weight")


def _metadata_alphas(metadata: Optional[Mapping[str, Any]]):
    """(default alpha or None, {module pattern: alpha}, use_rslora) from diffusers metadata."""
    if not metadata:
        return None, {}, False
    md = dict(metadata)
    if any(k.startswith('unet.') for k in md):  # pipeline files: '<component>.<field>'
        md = {k[len('unet.'):]: v for k, v in md.items() if k.startswith('unet.')}
    return (None if md.get('lora_alpha') is None else float(md['lora_alpha']),
            {str(k): float(v) for k, v in (md.get('alpha_pattern') or {}).items()},
            bool(md.get('use_rslora', False)))


def _pattern_alpha(module: str, patterns: Mapping[str, float]) -> Optional[float]:
    # PEFT matches a pattern as the module name's suffix (or a full regex match)
    for pat, a in patterns.items():
        if module == pat or module.endswith('.' + pat) or re.fullmatch(pat, module):
            return a
    return None


def import_state_dict(state_dict: Mapping[str, Any], diffuser_config, *,
                      metadata: Optional[Mapping[str, Any]] = None,
                      attention_stream: str = 'text', data_stream: str = 'image',
                      skip_unmapped: bool = False, source: str = '<state dict>') -> Adapter:
    """A diffusers/PEFT LoRA state dict (see the module docstring) as an `Adapter`.

    Args:
      state_dict: {key: tensor (torch or numpy)}.
      diffuser_config: the `model.diffuser` section (or a `DiffuserConfig`) to map onto.
      metadata: diffusers' `lora_adapter_metadata` (the PEFT LoraConfig as a dict), if any.
      attention_stream: the stream whose context layers an SD UNet's `attentions` adapt.
      data_stream: the stream whose data layers its resnets / samplers / convs adapt.
      skip_unmapped: leave keys that do not map out (logged) instead of raising.
    """
    rows = _rows(diffuser_config)
    groups: Dict[str, Dict[str, Any]] = {}
    unknown = []
    for key, value in state_dict.items():
        parts = _split(key)
        if parts is None:
            unknown.append(key)
            continue
        g = groups.setdefault(_strip(parts[0]), {'keys': []})
        g[parts[1]] = value
        g['keys'].append(key)
    default_alpha, patterns, rslora = _metadata_alphas(metadata)
    weights, alphas, unmapped = {}, {}, list(unknown)
    for module, g in sorted(groups.items()):
        if 'A' not in g or 'B' not in g:
            unmapped.extend(f"{k} (no lora_{'B' if 'A' in g else 'A'})" for k in g['keys'])
            continue
        hit = _target(module, rows, attention_stream, data_stream)
        if hit is None:
            unmapped.extend(g['keys'])
            continue
        path, transform = hit
        a, b = _as_numpy(g['A']), _as_numpy(g['B'])
        if transform not in ('linear', 'conv1x1', 'conv'):
            unmapped.extend(f'{k} (a {transform} weight)' for k in g['keys'])
            continue
        down, up = _factors(a, b, transform, module)
        r = down.shape[1]
        alpha = float(_as_numpy(g['alpha'])) if 'alpha' in g else \
            _pattern_alpha(module, patterns) or default_alpha or float(r)
        if rslora:  # PEFT's scaling alpha / sqrt(r) expressed as our alpha / r
            alpha = alpha * math.sqrt(r)
        m = path[:-len('/kernel')]
        if m in weights:
            raise CheckpointError(f"{source}: two LoRA modules map onto '{path}' (one is '{module}')")
        weights[m], alphas[m] = (down.astype(np.float32), up.astype(np.float32)), alpha
    if unmapped:
        msg = (f'{source}: {len(unmapped)} LoRA key(s) do not map onto this diffuser '
               f'(SD-style UNet attention/resnet layers map; attention_stream='
               f"'{attention_stream}', data_stream='{data_stream}'): {sorted(unmapped)[:12]}")
        if not skip_unmapped:
            raise CheckpointError(msg + ' (skip_unmapped=True loads the rest)')
        logger.warning(msg)
    if not weights:
        raise CheckpointError(f'{source}: no LoRA weights found (keys {list(state_dict)[:8]})')
    info = {'imported_from': source, 'attention_stream': attention_stream,
            'data_stream': data_stream, 'peft_metadata': dict(metadata or {})}
    return Adapter(weights, alphas, info)


def read_peft_file(path: str, diffuser_config, **kw) -> Adapter:
    """`import_state_dict` of a .safetensors file, with the metadata it carries."""
    meta = safetensors_metadata(path)
    raw = meta.get('lora_adapter_metadata')
    metadata = kw.pop('metadata', None) or (json.loads(raw) if raw else None)
    return import_state_dict(load_safetensors(path), diffuser_config, metadata=metadata,
                             source=path, **kw)
