"""Convert released PyTorch checkpoints of Versatile Diffusion into vd_jax checkpoints.

    from vd_jax.convert import convert_checkpoint
    convert_checkpoint('vd-four-flow-v1-0-fp16.pth', 'vd_four_flow', out='converted/vd4')

or `python -m vd_jax.convert SRC OUT [--config vd_four_flow]`. The layout (v1.0,
legacy, diffusers, ...) is detected from the keys; conversion is strict (see
`vd_jax.convert.engine`) and memory-bounded (one tensor at a time, memory-mapped source).

The way back is the same tables read backwards (`plan_export`, `export_part`); whole
checkpoints are exported by `vd_jax.export`.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from vd_jax import __version__
from vd_jax.checkpoint import SafetensorsWriter, atomic_dir, config_to_json, flatten, unflatten
from vd_jax.convert.diffusers_scheduler import with_folder_schedule
from vd_jax.convert.engine import (ConversionPlan, Ignore, Rule, build_plan,  # noqa: F401
                                   invert_rules, run_export, run_plan)
from vd_jax.convert.parts import (LAYOUTS, REGISTRY, Layout,  # noqa: F401
                                  detect_layout)
from vd_jax.convert.sources import DictSource, TensorSource, open_source  # noqa: F401
from vd_jax.errors import CheckpointError
from vd_jax.outputs import progress_bar

# Converters of the other model families register themselves on import.
for _mod in ('vae_rules', 'clip_rules', 'optimus_rules', 'inception_rules'):
    try:
        __import__(f'vd_jax.convert.{_mod}')
    except ModuleNotFoundError as _e:
        if _e.name != f'vd_jax.convert.{_mod}':
            raise


def _model_config(config):
    # lazy: vd_jax.config pulls in ml_collections (+42 ms)
    from vd_jax.config import load_config  # noqa: PLC0415
    if isinstance(config, str):
        config = load_config(config)
    if 'model' in config:
        config = config['model']
    return config


def _claims(layout: Layout, keys: Sequence[str]):
    """part -> claimed keys, plus keys ignored by the layout and keys nobody claims."""
    prefixes = {name: conv.claims[layout.name] for name, conv in REGISTRY.items()
                if layout.name in conv.claims}
    claimed: Dict[str, list] = {}
    ignored, orphans = [], []
    ign = [(re.compile(i.pattern), i.reason) for i in layout.ignore]
    for k in keys:
        owner = None
        for name, pre in prefixes.items():
            if k.startswith(tuple(pre)):
                owner = name
                break
        if owner is not None:
            claimed.setdefault(owner, []).append(k)
            continue
        reason = next((r for rx, r in ign if rx.fullmatch(k)), None)
        (ignored.append((k, reason)) if reason else orphans.append(k))
    return claimed, ignored, orphans


def plan_conversion(source: TensorSource, config, parts: Optional[Sequence[str]] = None,
                    skip_parts: Sequence[str] = ()):
    """Detect the layout and build a validated plan per part, reading no tensor data.

    Returns (layout, {part: ConversionPlan}, {part: target shapes}, record) where record lists
    ignored and skipped keys for the manifest. Raises `CheckpointError` on any problem.
    """
    model_cfg = _model_config(config)
    keys = source.keys()
    layout = detect_layout(keys, source.path)
    claimed, ignored, orphans = _claims(layout, keys)
    if orphans:
        raise CheckpointError(
            f"'{source.path}' ({layout.name} layout) has {len(orphans)} key(s) that belong to no "
            f"part vd_jax knows: {sorted(orphans)[:20]}")
    unknown = [p for p in (parts or ()) if p not in REGISTRY]
    if unknown:
        raise CheckpointError(f'unknown part(s) {unknown}; known: {sorted(REGISTRY)}')
    plans, targets, skipped = {}, {}, {}
    problems = []
    for part, pkeys in claimed.items():
        if part in skip_parts or (parts is not None and part not in parts):
            skipped[part] = len(pkeys)
            continue
        conv = REGISTRY.get(part)
        if conv is None:
            problems.append(f"  '{part}': {len(pkeys)} keys (e.g. {pkeys[0]}) that vd_jax cannot "
                            f'convert yet; skip them explicitly with skip_parts=[{part!r}] '
                            f'(--skip {part})')
            continue
        if not conv.has_part(model_cfg):
            problems.append(f"  '{part}': {len(pkeys)} keys, but the config has no '{part}' "
                            f'section; use a config that has it or skip_parts=[{part!r}]')
            continue
        targets[part] = conv.target(model_cfg)
        rules, ign, rename, tied = conv.tables(model_cfg, layout.name, pkeys)
        shapes = {k: tuple(source.shape(k)) for k in pkeys}
        try:
            plans[part] = build_plan(part, shapes, targets[part], rules, ign, rename, tied,
                                     where=f"'{source.path}' ({layout.name} layout)")
        except CheckpointError as e:
            problems.append(str(e))
    missing = [p for p in (parts or ()) if p not in claimed]
    if missing:
        problems.append(f"  requested part(s) {missing} are not in '{source.path}' "
                        f'(it has: {sorted(claimed)})')
    if problems:
        raise CheckpointError('\n'.join(problems))
    if not plans:
        raise CheckpointError(f"nothing to convert in '{source.path}' (parts present: "
                              f'{sorted(claimed)}, skipped: {sorted(skipped)})')
    record = dict(layout=layout.name, ignored=ignored, skipped=skipped)
    return layout, plans, targets, record


class _Progress:
    """The conversion's progress in tensors, through the command lines' one progress display
    (`vd_jax.outputs.progress_bar`: a bar on a terminal, else a whole line at most every 30 s
    and at the end, no carriage returns in a log); nothing when not enabled."""

    def __init__(self, total_tensors: int, enabled: bool):
        self.bar = None
        if enabled:
            self.bar = progress_bar('converting', unit='tensor', total=total_tensors)

    def update(self, part: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f'converting {part}')
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def convert_checkpoint(src: Union[str, TensorSource, Mapping], config='vd_four_flow',
                       out: Optional[str] = None, *, parts: Optional[Sequence[str]] = None,
                       skip_parts: Sequence[str] = (), dtype='float32', overwrite: bool = False,
                       progress: bool = False):
    """Convert a PyTorch VD checkpoint (file, diffusers folder, or in-memory state dict).

    Args:
      src: a `.pth`/`.bin`/`.ckpt`/`.safetensors` file, a diffusers pipeline or model
        folder, a `TensorSource`, or a mapping of name -> tensor.
      config: a config name ('vd_four_flow', 'vd_dc:tiny', ...), a file path, or a
        ConfigDict (whole run config or its `model` section).
        A diffusers folder's `scheduler/scheduler_config.json` replaces its `schedule`
        (`vd_jax.convert.diffusers_scheduler`).
      out: checkpoint folder to write (atomically; never over an existing path unless
        `overwrite`). If None, the params are returned in memory instead.
      parts: convert only these parts (default: every part in the source).
      skip_parts: parts present in the source to leave out on purpose.
      dtype: parameter dtype of the output (fp16 sources are cast).
    Returns:
      `out`, or {part: nested params dict of numpy arrays} when `out` is None.
    """

    if isinstance(src, TensorSource):
        source = src
    elif isinstance(src, Mapping):
        source = DictSource(src)
    else:
        source = open_source(src)
    model_cfg = _model_config(config)
    # a diffusers folder's scheduler config says how its model was trained (betas, zero
    # terminal SNR, prediction type): the checkpoint's config records it
    model_cfg = with_folder_schedule(model_cfg, src)
    layout, plans, targets, record = plan_conversion(source, model_cfg, parts, skip_parts)
    dtype = np.dtype(dtype)
    prog = _Progress(sum(len(plan.entries) for plan in plans.values()), progress)

    if out is None:
        result = {}
        for part, plan in plans.items():
            flat = {}
            for path, a in run_plan(plan, source.get, dtype):
                flat[path] = a
                prog.update(part)
            result[part] = unflatten(flat)
        prog.close()
        return result

    with atomic_dir(out, overwrite) as tmp:
        manifest = dict(format='vd_jax checkpoint v1', vd_jax_version=__version__,
                        source=os.path.abspath(source.path) if source.path != '<memory>' else None,
                        layout=layout.name, dtype=dtype.name, parts={},
                        ignored_keys=[{'key': k, 'reason': r} for k, r in record['ignored']],
                        skipped_parts=record['skipped'])
        for part, plan in plans.items():
            entries = [(e.path, targets[part][e.path], dtype) for e in plan.entries]
            w = SafetensorsWriter(os.path.join(tmp, f'{part}.safetensors'), entries,
                                  {'part': part, 'source_layout': layout.name})
            for path, a in run_plan(plan, source.get, dtype):
                w.write(path, a)
                prog.update(part)
            w.close()
            manifest['parts'][part] = dict(
                tensors=len(plan.entries),
                params=int(sum(np.prod(targets[part][e.path]) for e in plan.entries)),
                ignored=[{'key': k, 'reason': r} for k, r in plan.ignored],
                tied_copies=[{'key': k, 'copy_of': o} for k, o in plan.tied])
        with open(os.path.join(tmp, 'config.json'), 'w') as f:
            f.write(config_to_json(model_cfg if any(REGISTRY[p].uses_config for p in plans)
                                   else {}))
        with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
            json.dump(manifest, f, indent=1)
    prog.close()
    return out


# --------------------------------------------------------------------------------------------
# Export: vd_jax params -> PyTorch state dicts in a source layout
# --------------------------------------------------------------------------------------------

def export_layouts(part: str) -> Tuple[str, ...]:
    """The layouts `part` can be exported to."""
    if part not in REGISTRY:
        raise CheckpointError(f'unknown part {part!r}; known: {sorted(REGISTRY)}')
    conv = REGISTRY[part]
    return tuple(conv.claims) if conv.export_names is not None else ()


def _export_plan(model_cfg, part: str, layout: str):
    if layout not in export_layouts(part):
        raise CheckpointError(f"part '{part}' has no '{layout}' names (it exports to: "
                              f'{list(export_layouts(part))})')
    conv = REGISTRY[part]
    if not conv.has_part(model_cfg):
        raise CheckpointError(f"the config has no '{part}' section")
    target = conv.target(model_cfg)
    rules = conv.tables(model_cfg, layout, ())[0]
    inverse = invert_rules(rules, target, part)
    names, copies = conv.export_names(model_cfg, layout, [c for c, _ in inverse.values()])
    shapes = {names[c]: tuple(r.transform.source_shape(target[p])) for p, (c, r) in inverse.items()}
    shapes.update({k: shapes[other] for k, other in copies.items()})
    unclaimed = [k for k in shapes if not k.startswith(tuple(conv.claims[layout]))]
    if unclaimed:
        raise CheckpointError(f"export of '{part}' to {layout}: key(s) outside the part's "
                              f'prefixes {conv.claims[layout]}: {unclaimed[:5]}')
    rules, ign, rename, tied = conv.tables(model_cfg, layout, list(shapes))
    plan = build_plan(part, shapes, target, rules, ign, rename, tied,
                      where=f'its own {layout} export')
    return plan, target, shapes


def plan_export(config, part: str, layout: str) -> ConversionPlan:
    """The conversion plan of `part` from `layout`, built from names the tables produce.

    Every Flax leaf gets its source key from the rule table read backwards
    (`engine.invert_rules`) and the layout's names (`PartConverter.export_names`); the keys
    and their shapes are then planned FORWARD with the same tables as a conversion
    (`build_plan`: every key matched, every leaf filled once, shapes checked, keys claimed
    by this part), so an export always converts back to the same parameters. Running the
    plan backwards (`engine.run_export`) gives the state dict.
    """
    return _export_plan(_model_config(config), part, layout)[0]


def _params_getter(part: str, params, target) -> Callable[[str], np.ndarray]:
    """Flat access to a param tree (nested, or a flat '/'-joined mapping), checked against
    the model's shapes first: one error naming every missing, unexpected or misshapen leaf."""
    flat = flatten(params)  # a flat '/'-joined mapping flattens to itself
    missing = sorted(set(target) - set(flat))
    extra = sorted(set(flat) - set(target))
    wrong = sorted(f'{k} {tuple(np.shape(flat[k]))} != {tuple(target[k])}'
                   for k in set(target) & set(flat) if tuple(np.shape(flat[k])) != tuple(target[k]))
    if missing or extra or wrong:
        msg = [f"'{part}' params do not match the config:"]
        for what, items in (('missing', missing), ('unexpected', extra), ('wrong shape', wrong)):
            if items:
                msg.append(f'  {what} {len(items)}: {items[:10]}')
        raise CheckpointError('\n'.join(msg))
    return lambda path: flat[path]


def export_stream(params, config, part: str, layout: str = 'vd-v1.0', dtype=None):
    """One part's params -> its state dict in `layout`, one tensor at a time.

    Args:
      params: the part's nested params, or a flat '/'-joined mapping (e.g. the memory-mapped
        arrays of a checkpoint's `<part>.safetensors`); checked against the config first.
      config: model config (name, file, ConfigDict, or its `model` section).
      part: 'diffuser', 'vae_image', 'vae_text', 'ctx_image' or 'ctx_text'.
      layout: one of `export_layouts(part)`: 'vd-v1.0', 'vd-legacy', 'diffusers' (the
        diffuser's time MLP is copied into every `<s>_unet`, as diffusers keeps it),
        'ldm-autokl' / 'diffusers-autokl' (stand-alone VAE files), 'optimus' (optimus-vae.pth).
      dtype: cast floating tensors to it (None keeps the params' dtype).
    Returns:
      ([(key, shape)] in the order they come, iterator of (key, numpy array)).
    """
    model_cfg = _model_config(config)
    plan, target, shapes = _export_plan(model_cfg, part, layout)
    get = _params_getter(part, params, target)
    order = [e.source_key for e in plan.entries] + [k for k, _ in plan.tied]
    return [(k, shapes[k]) for k in order], run_export(plan, get, dtype)


def export_part(params, config, part: str, layout: str = 'vd-v1.0', dtype=None,
                ) -> Dict[str, np.ndarray]:
    """One part's params -> a PyTorch-layout state dict (numpy arrays) in `layout`; the
    arguments are those of `export_stream`. Converting the result back gives `params`."""
    return dict(export_stream(params, config, part, layout, dtype)[1])
