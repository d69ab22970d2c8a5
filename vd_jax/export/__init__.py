"""Export a vd_jax checkpoint folder back to PyTorch: the original VD layouts or diffusers.

    python -m vd_jax.export CKPT OUT --layout v1.0|legacy|diffusers [--dtype float16]
    from vd_jax.export import export_checkpoint

CKPT is a vd_jax checkpoint folder (`vd_jax.checkpoint`: config.json, manifest.json,
`<part>.safetensors`), e.g. a converted release or `train.py`'s `export/step_N`.

* `v1.0`, `legacy`: ONE file holding every part CKPT has, in the original key names. OUT's
  suffix picks the format: `.pth`/`.pt`/`.ckpt`/`.bin` = `torch.save` of a state dict
  (needs torch; the whole state dict is built in memory first), `.safetensors` = written one
  tensor at a time from the memory-mapped parts (no torch, bounded memory).

  Names per part, v1.0 (`VD_v2_0`) | legacy (Nov-2022 `VD`):
    diffuser    `diffuser.<stream>.*`  | `model.diffusion_model.*`
    vae_image   `vae.image.*`          | `autokl.*`      (LDM AutoencoderKL names)
    vae_text    `vae.text.*`           | `optimus.*`     (optimus_vae names)
    ctx_text    `ctx.text.model.`      | `clip.model.`   + CLIPModel's `text_model.*`,
                                                           `text_projection.weight`
    ctx_image   `ctx.image.model.`     | `clip.model.`   + CLIPModel's `vision_model.*`,
                                                           `visual_projection.weight`
  With a diffuser the file also gets the 12 DDPM schedule buffers (`betas`, ...; float32,
  from the config's schedule) that the released files and the original modules carry.
  Not written: what vd_jax does not keep (the CLIP tower each context does not use and
  `logit_scale`, CLIP's `position_ids` and GPT-2's mask buffers); load into the original
  modules with strict=False, as the v1.0 code does.
* `diffusers`: a folder diffusers' and transformers' own classes load (`from_pretrained`):
  `image_unet/`, `text_unet/`, `vae/`, `text_encoder/`, `image_encoder/` (each config.json +
  safetensors weights), `model_index.json`, `scheduler/`, `tokenizer/`,
  `image_feature_extractor/` (see `vd_jax.export.diffusers_folder`). diffusers has no
  Optimus class: the text VAE is written beside them as `vae_text.safetensors` in the v1.0
  names (`vae.text.*`); `python -m vd_jax.convert OUT CK` reads it back with the other parts
  (so does `python -m vd_jax.convert OUT/vae_text.safetensors CK`).

Weights go through the converter's own tables read backwards (`vd_jax.convert.export_stream`),
so converting the export gives back the same parameters, bit for bit in float32. Every input
is checked (CKPT, its config against its weights, the layout, OUT) before anything is
written; OUT is written atomically and an existing OUT is only replaced with `overwrite`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from typing import Dict, Iterator, Tuple

import ml_dtypes
import numpy as np

from vd_jax.checkpoint import (SafetensorsWriter, atomic_dir, available_parts, load_safetensors,
                               read_config)
from vd_jax.errors import CheckpointError, InputError
from vd_jax.export import diffusers_folder as df
from vd_jax.outputs import check_can_create

# CLI layout name -> converter layout name
LAYOUTS = {'v1.0': 'vd-v1.0', 'legacy': 'vd-legacy', 'diffusers': 'diffusers'}
TORCH_SUFFIXES = ('.pth', '.pt', '.ckpt', '.bin')
DTYPES = ('float32', 'float16', 'bfloat16')
# safetensors metadata that transformers/diffusers loaders expect of PyTorch weights
_PT_METADATA = {'format': 'pt'}


def _one_line(e: Exception) -> str:
    """The converter's multi-line reports (one line per problem) as one line."""
    return '; '.join(line.strip() for line in str(e).splitlines() if line.strip())


def _np_dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise InputError(f'unknown dtype {name!r} (choose {", ".join(DTYPES)})')
    if name == 'bfloat16':
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _check_inputs(ckpt: str, out: str, layout: str, overwrite: bool):
    """(model config, parts, output kind 'torch'|'safetensors'|'folder'); InputError (layout,
    OUT) or CheckpointError (CKPT)."""
    if layout not in LAYOUTS:
        raise InputError(f'unknown layout {layout!r} (choose {", ".join(LAYOUTS)})')
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"checkpoint '{ckpt}' " + ('is not a folder' if os.path.exists(ckpt)
                                                         else 'does not exist'))
    try:
        model_cfg = read_config(ckpt)
    except (CheckpointError, ValueError) as e:  # json errors are ValueErrors
        raise CheckpointError(f"checkpoint '{ckpt}': unreadable config.json ({_one_line(e)})") from None
    parts = available_parts(ckpt)
    if not parts:
        raise CheckpointError(f"checkpoint '{ckpt}' has no part weights (<part>.safetensors)")
    # lazy: vd_jax.models.vae pulls in jax, flax (+0.7 s)
    from vd_jax.models.vae import NUM_GROUPS  # noqa: PLC0415
    groups = int(((model_cfg.get('vae') or {}).get('image') or {}).get('norm_groups', NUM_GROUPS))
    if layout != 'diffusers' and 'vae_image' in parts and groups != NUM_GROUPS:
        raise CheckpointError(f"checkpoint '{ckpt}': its AutoKL uses vae.image.norm_groups="
                              f"{groups}; the original code's GroupNorms have {NUM_GROUPS} groups, "
                              f'so a {layout} file would run wrongly there. Export with --layout '
                              'diffusers (its AutoencoderKL has norm_num_groups)')
    if layout == 'diffusers':
        kind = 'folder'
    else:
        suffix = os.path.splitext(out)[1].lower()
        if suffix == '.safetensors':
            kind = 'safetensors'
        elif suffix in TORCH_SUFFIXES:
            kind = 'torch'
        else:
            raise InputError(f"output '{out}': the {layout} layout is one file; end its name "
                             f"with .safetensors or {'/'.join(TORCH_SUFFIXES)}")
    if os.path.lexists(out) and not overwrite:
        raise InputError(f"output '{out}' already exists; choose another path or pass "
                         'overwrite=True (--overwrite)')
    check_can_create(out, 'output')
    if kind == 'torch':
        try:
            # lazy: optional dependency (torch)
            import torch  # noqa: PLC0415, F401
        except ImportError:
            raise CheckpointError(f"writing '{out}' needs PyTorch: pip install -e '.[convert]' "
                                  "(or write .safetensors)") from None
    return model_cfg, parts, kind


def _streams(ckpt, model_cfg, parts, layout: str, dtype) -> Dict[str, Tuple[list, Iterator]]:
    """part -> (declared (key, shape) list, lazy tensor iterator); everything checked now."""
    # lazy: vd_jax.convert pulls in 15 modules (+34 ms)
    from vd_jax.convert import export_stream  # noqa: PLC0415
    out = {}
    for part in parts:
        path = os.path.join(ckpt, f'{part}.safetensors')
        # diffusers has no Optimus: it keeps the v1.0 names in its own file
        part_layout = 'vd-v1.0' if layout == 'diffusers' and part == 'vae_text' else LAYOUTS[layout]
        try:
            out[part] = export_stream(load_safetensors(path), model_cfg, part, part_layout, dtype)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint '{ckpt}', part '{part}': {_one_line(e)}") from None
    return out


def _schedule_buffers(model_cfg) -> Dict[str, np.ndarray]:
    # lazy: vd_jax.diffusion.schedule pulls in jax, flax (+0.6 s)
    from vd_jax.diffusion.schedule import schedule_arrays  # noqa: PLC0415
    sched = model_cfg['schedule'].to_dict() if 'schedule' in model_cfg else {}
    return {k: v.astype(np.float32) for k, v in schedule_arrays(**sched).items()}


def _to_torch(a: np.ndarray):
    import torch  # noqa: PLC0415
    if a.dtype.name == 'bfloat16':  # numpy has no bfloat16 torch can read: reinterpret bits
        return torch.from_numpy(np.array(a).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))  # a copy: the source may be a read-only memmap


@contextlib.contextmanager
def _atomic_file(out: str):
    """Yield a temporary path beside `out`; on success it replaces `out` in one rename."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f'{out}.tmp-{os.getpid()}-{int(time.time() * 1000)}'
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if os.path.isdir(out):  # only reachable with overwrite
        shutil.rmtree(out)
    os.replace(tmp, out)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _write_file(out, kind, streams, extra, dtype, progress) -> None:
    with _atomic_file(out) as tmp:
        if kind == 'safetensors':
            entries = [(k, shape, dtype) for order, _ in streams.values() for k, shape in order]
            entries += [(k, v.shape, v.dtype) for k, v in extra.items()]
            w = SafetensorsWriter(tmp, entries, _PT_METADATA)
            for part, (order, it) in streams.items():
                for k, a in it:
                    w.write(k, a)
                _log(progress, f'  {part}: {len(order)} tensors')
            for k, v in extra.items():
                w.write(k, v)
            w.close()
        else:
            import torch  # noqa: PLC0415
            sd = {}
            for part, (order, it) in streams.items():
                sd.update((k, _to_torch(a)) for k, a in it)
                _log(progress, f'  {part}: {len(order)} tensors')
            sd.update((k, torch.from_numpy(v)) for k, v in extra.items())
            torch.save(sd, tmp)


def _diffusers_plan(model_cfg, parts) -> Dict[str, dict]:
    """folder -> its config.json, checking that diffusers' classes can express the config."""
    # jax and the networks load only when a diffusers folder is planned (`import
    # vd_jax.export` stays free of jax: ~3.5 s of start-up on the 2-core build host)
    # lazy: vd_jax.modalities pulls in jax (+0.6 s)
    from vd_jax import modalities as M  # noqa: PLC0415
    # lazy: vd_jax.models.unet pulls in jax, flax (+0.8 s)
    from vd_jax.models.unet import DiffuserConfig  # noqa: PLC0415
    configs = {}
    try:
        if 'diffuser' in parts:
            dcfg = DiffuserConfig.from_dict(model_cfg['diffuser'])
            g = next(s for s in dcfg.streams if s.name == dcfg.global_layer_ptr)
            for s in dcfg.streams:
                configs[f'{s.name}_unet'] = df.unet_config(s, g)
        if 'vae_image' in parts:
            scale = M.get('image').latent_scale_of(model_cfg)
            configs['vae'] = df.vae_config(model_cfg['vae']['image'], scale)
        if 'ctx_text' in parts:
            configs['text_encoder'] = df.clip_text_config(model_cfg['ctx']['text'])
        if 'ctx_image' in parts:
            configs['image_encoder'] = df.clip_vision_config(model_cfg['ctx']['image'])
    except (ValueError, KeyError) as e:  # what diffusers' classes cannot express
        raise CheckpointError(f'cannot export a diffusers folder: {_one_line(e)}') from None
    return configs


def _write_diffusers(out, model_cfg, parts, configs, streams, dtype, overwrite, progress) -> None:
    with atomic_dir(out, overwrite) as tmp:
        for part, (order, it) in streams.items():
            if part == 'vae_text':
                w = SafetensorsWriter(os.path.join(tmp, 'vae_text.safetensors'),
                                      [(k, s, dtype) for k, s in order], _PT_METADATA)
                for k, a in it:
                    w.write(k, a)
                w.close()
                _log(progress, f'  vae_text: {len(order)} tensors (vae_text.safetensors)')
                continue
            # one weights file per key prefix (`image_unet.`, `text_unet.`, `vae.`, ...)
            files: Dict[str, list] = {}
            for k, s in order:
                folder, name = k.split('.', 1)
                files.setdefault(folder, []).append((name, s, dtype))
            writers = {}
            for folder, entries in files.items():
                os.makedirs(os.path.join(tmp, folder))
                df.write_json(os.path.join(tmp, folder, 'config.json'), configs[folder])
                writers[folder] = SafetensorsWriter(
                    os.path.join(tmp, folder, df.MODEL_FOLDERS[folder][2]), entries, _PT_METADATA)
            for k, a in it:
                folder, name = k.split('.', 1)
                writers[folder].write(name, a)
            for folder, w in writers.items():
                w.close()
                _log(progress, f'  {part}: {len(files[folder])} tensors ({folder}/)')
        extras = []
        if 'diffuser' in parts:
            df.write_json(os.path.join(tmp, 'scheduler', 'scheduler_config.json'),
                          df.scheduler_config(model_cfg['schedule']))
            extras.append('scheduler')
        if 'ctx_text' in parts:
            df.write_tokenizer(os.path.join(tmp, 'tokenizer'),
                               model_cfg['ctx']['text'].get('max_position_embeddings', 77))
            extras.append('tokenizer')
        if 'ctx_image' in parts:
            df.write_image_processor(os.path.join(tmp, 'image_feature_extractor'),
                                     model_cfg['ctx']['image']['image_size'])
            extras.append('image_feature_extractor')
        df.write_json(os.path.join(tmp, 'model_index.json'),
                      df.model_index([f for f in df.MODEL_FOLDERS if f in configs], extras))


def export_checkpoint(ckpt: str, out: str, layout: str = 'v1.0', dtype: str = 'float32',
                      overwrite: bool = False, progress: bool = False) -> str:
    """Write vd_jax checkpoint folder `ckpt` as PyTorch weights (see the module docstring).

    Args:
      ckpt: vd_jax checkpoint folder.
      out: output file (v1.0/legacy: `.safetensors` or `.pth`/`.pt`/`.ckpt`/`.bin`) or folder
        (diffusers).
      layout: 'v1.0', 'legacy' or 'diffusers'.
      dtype: 'float32', 'float16' or 'bfloat16' for every weight (schedule buffers stay float32).
      overwrite: replace an existing `out` (only once the new one is complete).
    Returns:
      `out`. Raises, naming the problem, before writing anything: `InputError` (a bad layout,
      dtype or OUT) or `CheckpointError` (CKPT cannot be read or exported).
    """
    np_dtype = _np_dtype(dtype)
    model_cfg, parts, kind = _check_inputs(ckpt, out, layout, overwrite)
    configs = _diffusers_plan(model_cfg, parts) if kind == 'folder' else None
    streams = _streams(ckpt, model_cfg, parts, layout, np_dtype)
    _log(progress, f"exporting {', '.join(parts)} of '{ckpt}' to {layout} ({dtype})")
    if kind == 'folder':
        _write_diffusers(out, model_cfg, parts, configs, streams, np_dtype, overwrite, progress)
    else:
        extra = _schedule_buffers(model_cfg) if 'diffuser' in parts else {}
        _write_file(out, kind, streams, extra, np_dtype, progress)
    return out
