"""Initialise a diffuser from other checkpoints: a smaller VD setting, SD, SD-variation.

VD is trained progressively (paper): VD-basic (image variation) -> VD-DC (+ text->image)
-> four-flow, each setting starting from the previous one; the first one's image layers come
from Stable Diffusion. SD's cross-attention layers attend to CLIP *text*, so they are VD's
*text*-context layers; the image-context layers came from SD-variation (an SD UNet
fine-tuned on CLIP image contexts) [paper; UNVERIFIED: VD's training code was never released].

A source is `{path, map}` in `cfg.init.sources.<name>`:
  path  a vd_jax checkpoint folder (`diffuser.safetensors`, e.g. a previous run's export),
        or anything `vd_jax.convert.convert_checkpoint` reads whose UNet is an image stream:
        a diffusers `UNet2DConditionModel` folder (SD's `unet/`), converted on the fly into
        a stream named 'image';
  map   'src_prefix->dst_prefix' pairs (comma separated or a list) over '/'-joined
        parameter paths; '*' copies every path present in both (same name).
Every target leaf is claimed by at most one source; a copied leaf must have the same shape;
a mapping that copies nothing is an error (a typo would otherwise be silent). Leaves no
source provides keep their fresh initialisation. The report lists, per parameter group,
where its values came from.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from vd_jax.checkpoint import flatten, load_safetensors, unflatten
from vd_jax.convert import convert_checkpoint
from vd_jax.errors import ConfigError
from vd_jax.train.optim import group_of

logger = logging.getLogger(__name__)


def parse_map(spec) -> List[Tuple[str, str]]:
    """'a->b, c->d' | ['a->b', ...] | '*' -> [(src_prefix, dst_prefix)]."""
    items = [s.strip() for s in (spec.split(',') if isinstance(spec, str) else spec)]
    items = [s for s in items if s]
    if not items:
        raise ConfigError('an init source needs a map (e.g. "*" or "image/data_blocks->'
                          'image/data_blocks")')
    out = []
    for it in items:
        if it == '*':
            out.append(('', ''))
            continue
        if '->' not in it:
            raise ConfigError(f"init map entry {it!r} is not 'src_prefix->dst_prefix' (or '*')")
        a, b = (x.strip() for x in it.split('->', 1))
        out.append((a, b))
    return out


def _image_only_model_cfg(model_cfg):
    """The target config reduced to its image stream with all three parts: what a converted
    SD-style UNet (time embedding + data + cross-attention layers) fills."""
    streams = dict(model_cfg.diffuser.streams)
    if 'image' not in streams:
        raise ConfigError("converting an SD-style UNet needs a diffuser stream named 'image'")
    image = dict(streams['image'])
    image['parts'] = ['global', 'data', 'context']
    cfg = copy.deepcopy(model_cfg)
    cfg['diffuser'] = dict(global_layer_ptr='image', streams={'image': image})
    return cfg


def load_source(path: str, model_cfg) -> Dict[str, np.ndarray]:
    """Flat {'/'-path: array} of a source's diffuser parameters."""
    if not os.path.exists(path):
        raise ConfigError(f"init source '{path}' does not exist")
    st = os.path.join(path, 'diffuser.safetensors')
    if os.path.isdir(path) and os.path.isfile(st):
        return dict(load_safetensors(st))
    # An SD pipeline folder keeps its UNet in unet/.
    unet = os.path.join(path, 'unet')
    if os.path.isdir(path) and os.path.isfile(os.path.join(unet, 'config.json')):
        logger.info("init source '%s': using its UNet folder '%s'", path, unet)
        path = unet
    params = convert_checkpoint(path, _image_only_model_cfg(model_cfg), out=None,
                                parts=['diffuser'])['diffuser']
    return flatten(params)


def apply_init_sources(host_params: Mapping[str, Any], sources: Sequence[Tuple[str, str, Any]],
                       model_cfg, loaded: Mapping[str, Mapping[str, np.ndarray]] = None):
    """Copy source parameters into a (host, numpy) parameter tree.

    Args:
      host_params: nested dict of numpy arrays (fresh init); not modified. A leaf may also be
        abstract (anything with `shape` and `dtype` that is not an array, e.g. a
        `jax.ShapeDtypeStruct`): it comes back unchanged where no source provides it, so
        callers initialise only those leaves (`vd_jax.train.run.initial_state`).
      sources: (name, path, map spec) in order.
      loaded: optional {name: flat source params} (skips reading `path`).
    Returns:
      (new nested params, report dict).
    """
    target = {k: v if is_abstract(v) else np.asarray(v) for k, v in flatten(host_params).items()}
    owner: Dict[str, str] = {}
    report: Dict[str, Any] = {'sources': {}, 'groups': {}}
    for name, path, spec in sources:
        mapping = parse_map(spec)
        src = (loaded or {}).get(name)
        if src is None:
            src = load_source(path, model_cfg)
        used, per_group = set(), {}
        copied_by_entry = {m: 0 for m in mapping}
        for dst_path in sorted(target):
            for sp, dp in mapping:
                if not dst_path.startswith(dp):
                    continue
                src_path = sp + dst_path[len(dp):]
                if src_path not in src:
                    continue
                if dst_path in owner:
                    raise ConfigError(f"init: parameter '{dst_path}' is provided by both source "
                                      f"'{owner[dst_path]}' and source '{name}'; narrow a map")
                a = np.asarray(src[src_path])
                if a.shape != target[dst_path].shape:
                    raise ConfigError(f"init source '{name}' ({path}): '{src_path}' has shape "
                                      f"{a.shape} but '{dst_path}' needs "
                                      f'{target[dst_path].shape}')
                target[dst_path] = a.astype(target[dst_path].dtype)
                owner[dst_path] = name
                used.add(src_path)
                copied_by_entry[(sp, dp)] += 1
                g = group_of(dst_path)
                per_group[g] = per_group.get(g, 0) + int(a.size)
                break
        empty = [f'{sp or "*"}->{dp or "*"}' for (sp, dp), n in copied_by_entry.items() if n == 0]
        if empty:
            prefixes = sorted({_prefix(k) for k in src})
            raise ConfigError(f"init source '{name}' ({path}): map entries {empty} copied "
                              f'nothing; the source has {prefixes}')
        report['sources'][name] = {
            'path': str(path), 'map': [f'{a}->{b}' for a, b in mapping],
            'copied_tensors': len(used), 'copied_params': int(sum(per_group.values())),
            'copied_by_group': per_group,
            'unused_source_tensors': len(set(src) - used)}
    for path, a in target.items():
        g = group_of(path)
        entry = report['groups'].setdefault(g, {'params': 0, 'from': {}})
        size = int(np.prod(a.shape))
        entry['params'] += size
        src_name = owner.get(path, 'fresh init')
        entry['from'][src_name] = entry['from'].get(src_name, 0) + size
    return unflatten(target), report


def is_abstract(leaf) -> bool:
    """A leaf that only describes an array (shape and dtype, no values)."""
    return hasattr(leaf, 'shape') and hasattr(leaf, 'dtype') and not hasattr(leaf, '__array__')


def _prefix(path: str) -> str:
    # 'image/data_blocks_3/op/kernel' -> 'image/data_blocks_*'
    head = path.split('/')[:2]
    if len(head) == 2 and head[1].rstrip('0123456789') != head[1]:
        head[1] = head[1].rstrip('0123456789') + '*'
    return '/'.join(head)


def format_report(report: Mapping[str, Any]) -> str:
    lines = ['parameter initialisation:']
    for g, e in sorted(report['groups'].items()):
        parts = ', '.join(f'{n}: {c:,}' for n, c in sorted(e['from'].items()))
        lines.append(f'  {g:<16} {e["params"]:>13,} params <- {parts}')
    for n, s in report['sources'].items():
        lines.append(f"  source {n}: {s['copied_tensors']} tensors ({s['copied_params']:,} params) "
                     f"copied from {s['path']}; {s['unused_source_tensors']} source tensors unused")
    return '\n'.join(lines)


def configured_sources(cfg) -> List[Tuple[str, str, Any]]:
    """(name, path, map) of every `cfg.init.sources.<name>` with a path, in config order."""
    out = []
    for name, src in cfg.init.sources.items():
        if src.path:
            out.append((name, str(src.path), src.map))
    return out


def write_report(report, path: str):
    with open(path, 'w') as f:
        json.dump(report, f, indent=1, sort_keys=True)
